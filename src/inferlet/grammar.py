"""Pie's `inferlet.grammar`: constrained generation is not supported by pie yet. Importing works; every entry point raises
NotSupportedError (a PieError) that says so."""

from __future__ import annotations

from typing import Any

from ._errors import unsupported

_FEATURE = "constrained generation"


class Grammar:
    """Not supported yet: constrained generation."""

    @classmethod
    def from_json_schema(cls, *args: Any, **kwargs: Any) -> Any:
        unsupported(f"{_FEATURE} (inferlet.Grammar.from_json_schema)")

    @classmethod
    def json(cls, *args: Any, **kwargs: Any) -> Any:
        unsupported(f"{_FEATURE} (inferlet.Grammar.json)")

    @classmethod
    def from_regex(cls, *args: Any, **kwargs: Any) -> Any:
        unsupported(f"{_FEATURE} (inferlet.Grammar.from_regex)")

    @classmethod
    def from_ebnf(cls, *args: Any, **kwargs: Any) -> Any:
        unsupported(f"{_FEATURE} (inferlet.Grammar.from_ebnf)")


class Matcher:
    """Not supported yet: constrained generation."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        unsupported(f"{_FEATURE} (inferlet.Matcher)")

    def accept_tokens(self, *args: Any, **kwargs: Any) -> Any:
        unsupported(f"{_FEATURE} (inferlet.Matcher.accept_tokens)")

    def next_token_logit_mask(self, *args: Any, **kwargs: Any) -> Any:
        unsupported(f"{_FEATURE} (inferlet.Matcher.next_token_logit_mask)")

    def is_terminated(self, *args: Any, **kwargs: Any) -> Any:
        unsupported(f"{_FEATURE} (inferlet.Matcher.is_terminated)")

    def reset(self, *args: Any, **kwargs: Any) -> Any:
        unsupported(f"{_FEATURE} (inferlet.Matcher.reset)")


class GrammarConstraint:
    """Not supported yet: constrained generation."""

    @classmethod
    def from_grammar(cls, *args: Any, **kwargs: Any) -> Any:
        unsupported(f"{_FEATURE} (inferlet.GrammarConstraint.from_grammar)")

    @classmethod
    def from_json_schema(cls, *args: Any, **kwargs: Any) -> Any:
        unsupported(f"{_FEATURE} (inferlet.GrammarConstraint.from_json_schema)")

    @classmethod
    def json(cls, *args: Any, **kwargs: Any) -> Any:
        unsupported(f"{_FEATURE} (inferlet.GrammarConstraint.json)")

    @classmethod
    def from_regex(cls, *args: Any, **kwargs: Any) -> Any:
        unsupported(f"{_FEATURE} (inferlet.GrammarConstraint.from_regex)")

    @classmethod
    def from_ebnf(cls, *args: Any, **kwargs: Any) -> Any:
        unsupported(f"{_FEATURE} (inferlet.GrammarConstraint.from_ebnf)")

    def step(self, *args: Any, **kwargs: Any) -> Any:
        unsupported(f"{_FEATURE} (inferlet.GrammarConstraint.step)")


class JsonSchema:
    """Not supported yet: constrained generation."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        unsupported(f"{_FEATURE} (inferlet.JsonSchema)")


class AnyJson:
    """Not supported yet: constrained generation."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        unsupported(f"{_FEATURE} (inferlet.AnyJson)")


class Regex:
    """Not supported yet: constrained generation."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        unsupported(f"{_FEATURE} (inferlet.Regex)")


class Ebnf:
    """Not supported yet: constrained generation."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        unsupported(f"{_FEATURE} (inferlet.Ebnf)")


from typing import Protocol  # noqa: E402


class Constraint(Protocol):
    """Per-step BRLE logit mask from the tokens accepted since the last step."""

    def step(self, accepted: list[int]) -> list[int]: ...


class Schema(Protocol):
    """A grammar source that compiles to a constraint for a model."""

    def build_constraint(self, model: Any) -> Any: ...
