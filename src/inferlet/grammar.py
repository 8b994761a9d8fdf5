"""Constrained generation (Pie's `inferlet.grammar`): grammars compiled by llguidance, masks per step.

    text = await ctx.generate(Sampler.argmax(), constrain=JsonSchema(schema), max_tokens=256).collect_text()
    obj = await ctx.generate(Sampler.top_p()).collect_json(schema=schema)

Schemas (`JsonSchema`, `AnyJson`, `Regex`, `Ebnf`, or any object with `build_constraint(model)`) compile
to a `GrammarConstraint`: a `Matcher` (llguidance's LLMatcher over the model's token table) that, fed the
tokens generated so far, gives the set of tokens that keep the output inside the grammar. The generator
applies it as the step's logit mask, so a constrained output is valid by construction; the chat stop
tokens are allowed only where the grammar accepts (and forced when it cannot go on).

`Ebnf` takes Pie's GBNF syntax (`root ::= "yes" | "no"`) or Lark syntax (`start: "yes" | "no"`, see
llguidance's docs); GBNF is converted to Lark. JSON schemas compile with fixed separators (", ", ": ")
and no free whitespace, so a model cannot loop on blanks.

Masks cross the `Constraint` protocol as BRLE lists (Pie's wire format); a `GrammarConstraint` also hands
the generator a bool vector directly (`_mask_after`), which is what the generator uses: computed on the
host while the device runs the step (see generation.py).
"""

from __future__ import annotations

import json
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np

from pie.errors import PieError

from . import brle

if TYPE_CHECKING:
    from .model import Model, Tokenizer

# JSON: fixed separators and no free whitespace (llguidance's default lets a model emit blanks forever)
_JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


class GrammarError(PieError, ValueError):
    """A grammar, schema or regex that does not compile; the message has llguidance's diagnosis."""


def _llg():
    try:
        import llguidance
        import llguidance.hf  # noqa: F401
        import llguidance.numpy  # noqa: F401
    except ImportError as e:  # pragma: no cover - a dependency of the pie package
        raise PieError("constrained generation needs llguidance: pip install llguidance") from e
    return llguidance


# ---- the model's token table (built once per model: ~0.1 s for 8k tokens, ~1 s for 150k) ----------------
_TOKENIZERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # pie Tokenizer -> LLTokenizer


def _stop_ids(tok) -> list[int]:
    """Ids that end an output: the tokenizer's eos ids and the chat stop tokens (llguidance allows them
    where the grammar accepts)."""
    ids = set(getattr(tok, "eos_token_ids", []) or [])
    hf = tok.hf
    if hf.eos_token_id is not None:
        ids.add(int(hf.eos_token_id))
    for name in ("<|im_end|>", "<|eot_id|>", "<|end|>", "<|return|>", "<|call|>", "<end_of_turn>"):
        tid = tok.token_id(name) if hasattr(tok, "token_id") else None
        if tid is not None:
            ids.add(int(tid))
    return sorted(ids)


def _ll_tokenizer(tokenizer: Tokenizer, vocab_size: int):
    """llguidance's token table for pie's tokenizer (`Tokenizer._tok` is pie.models.tokenizer.Tokenizer)."""
    llg = _llg()
    pie_tok = tokenizer._tok
    cached = _TOKENIZERS.get(pie_tok)
    if cached is None or cached.vocab_size != vocab_size:
        eos = _stop_ids(pie_tok)
        try:
            cached = llg.hf.from_tokenizer(pie_tok.hf, n_vocab=vocab_size, eos_token=eos or None)
        except ValueError as e:
            raise PieError(
                f"constrained generation needs a fast (tokenizers-backed) tokenizer: {e}"
            ) from None
        _TOKENIZERS[pie_tok] = cached
    return cached


# =============================================================================
# Grammar / Matcher
# =============================================================================


class Grammar:
    """What an output must look like, as llguidance's grammar text; build with the factories:

    Grammar.from_json_schema('{"type": "object", ...}'), Grammar.json(), Grammar.from_regex(r"\\d+"),
    Grammar.from_ebnf('root ::= "yes" | "no"')."""

    __slots__ = ("_source", "_what")

    def __init__(self, source: str, what: str = "grammar") -> None:
        self._source = source  # llguidance grammar (Lark, or its JSON grammar list)
        self._what = what

    @classmethod
    def from_json_schema(cls, schema: str | dict) -> Grammar:
        """JSON conforming to a JSON Schema (a string, or a dict: pie's extension)."""
        llg = _llg()
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except json.JSONDecodeError as e:
                raise GrammarError(f"the JSON schema is not valid JSON: {e}") from None
        if not isinstance(schema, dict | bool):
            raise GrammarError(f"a JSON schema is a JSON object, got {type(schema).__name__}")
        try:
            src = llg.LLMatcher.grammar_from_json_schema(schema, defaults=_JSON_OPTIONS)
        except ValueError as e:
            raise GrammarError(f"the JSON schema does not compile: {e}") from None
        return cls(src, "JSON schema").check()

    @classmethod
    def json(cls) -> Grammar:
        """Any JSON value."""
        return cls.from_json_schema({})

    @classmethod
    def from_regex(cls, pattern: str) -> Grammar:
        """Strings that fully match a regular expression (Rust regex syntax, anchored at both ends)."""
        if not isinstance(pattern, str):
            raise GrammarError(f"a regex is a string, got {type(pattern).__name__}")
        return cls(_llg().LLMatcher.grammar_from_regex(pattern), "regex").check()

    @classmethod
    def from_ebnf(cls, ebnf: str) -> Grammar:
        """A grammar in Pie's GBNF syntax (`root ::= ...`) or Lark syntax (`start: ...`)."""
        if not isinstance(ebnf, str) or not ebnf.strip():
            raise GrammarError('an EBNF grammar is a non-empty string, e.g. \'root ::= "yes" | "no"\'')
        from llguidance.gbnf_to_lark import any_to_lark

        try:
            lark = any_to_lark(ebnf)
        except Exception as e:  # the converter raises bare Exception for unknown rules
            raise GrammarError(f"the EBNF grammar does not parse: {e}") from None
        return cls(_llg().LLMatcher.grammar_from_lark(lark), "EBNF grammar").check()

    def check(self) -> Grammar:
        """Raise GrammarError unless the grammar compiles."""
        is_error, messages = _llg().LLMatcher.validate_grammar_with_warnings(self._source)
        if is_error:
            raise GrammarError(f"the {self._what} does not compile: {messages[0] if messages else '?'}")
        return self

    def __repr__(self) -> str:
        return f"inferlet.Grammar({self._what})"


class Matcher:
    """A grammar's state over one output: accept_tokens(ids), then next_token_logit_mask() (BRLE)."""

    __slots__ = ("_m", "_vocab", "_bits", "_grammar", "_tokenizer")

    def __init__(self, grammar: Grammar, tokenizer: Tokenizer, vocab_size: int | None = None) -> None:
        llg = _llg()
        if not isinstance(grammar, Grammar):
            raise TypeError(f"Matcher(grammar, tokenizer) needs an inferlet.Grammar, got {grammar!r}")
        # the mask covers the model's rows (vocab_size >= tokenizer length: padded embedding rows)
        self._vocab = int(vocab_size or tokenizer._tok.vocab_size)
        ll_tok = _ll_tokenizer(tokenizer, self._vocab)
        self._m = llg.LLMatcher(ll_tok, grammar._source, log_level=0)
        if self._m.is_error():
            raise GrammarError(f"the {grammar._what} does not compile: {self._m.get_error()}")
        self._bits = llg.numpy.allocate_token_bitmask(1, self._vocab)  # [1, ceil(V/32)] int32
        self._grammar, self._tokenizer = grammar, tokenizer

    def accept_tokens(self, token_ids: list[int]) -> None:
        """Advance over tokens the model produced; a token the grammar forbids raises GrammarError."""
        if token_ids and not self._m.consume_tokens([int(t) for t in token_ids]):
            raise GrammarError(f"token(s) {list(token_ids)} are not allowed here: {self._m.get_error()}")

    def allowed(self) -> np.ndarray:
        """[V] bool: the tokens that may come next (eos / chat stop tokens where the grammar accepts)."""
        _llg().numpy.fill_next_token_bitmask(self._m, self._bits, 0)
        return np.unpackbits(self._bits.view(np.uint8), bitorder="little")[: self._vocab].view(bool)

    def next_token_logit_mask(self) -> list[int]:
        """The allowed next tokens as a BRLE mask (Pie's format)."""
        return brle.encode(self.allowed())

    @property
    def is_terminated(self) -> bool:
        """True when the grammar cannot go on (the output is complete)."""
        return self._m.is_stopped()

    @property
    def is_accepting(self) -> bool:
        """True when the output so far is a complete sentence of the grammar (it may still go on)."""
        return self._m.is_accepting()

    def rollback(self, n: int) -> None:
        """Undo the last n accepted tokens (pie's extension, for speculative drafts)."""
        if n and not self._m.rollback(int(n)):
            raise GrammarError(f"cannot roll back {n} tokens: {self._m.get_error()}")

    def reset(self) -> None:
        """Back to the start of the grammar."""
        self._m.reset()


# =============================================================================
# Constraint protocol + GrammarConstraint
# =============================================================================


@runtime_checkable
class Constraint(Protocol):
    """A per-step logit mask: step(tokens accepted since the last call, [] at first) -> BRLE mask for
    the next position ([] = no restriction)."""

    def step(self, accepted: list[int]) -> list[int]: ...


class GrammarConstraint:
    """A Constraint driven by a grammar Matcher (what every Schema compiles to)."""

    __slots__ = ("_matcher",)

    def __init__(self, matcher: Matcher) -> None:
        if not isinstance(matcher, Matcher):
            raise TypeError(f"GrammarConstraint(matcher) needs an inferlet.Matcher, got {matcher!r}")
        self._matcher = matcher

    @classmethod
    def from_grammar(cls, grammar: Grammar, model: Model) -> GrammarConstraint:
        """A constraint from a compiled grammar (compile once, build one constraint per output)."""
        return cls(Matcher(grammar, model.tokenizer(), model.vocab_size))

    @classmethod
    def from_json_schema(cls, schema: str, model: Model) -> GrammarConstraint:
        return cls.from_grammar(Grammar.from_json_schema(schema), model)

    @classmethod
    def json(cls, model: Model) -> GrammarConstraint:
        return cls.from_grammar(Grammar.json(), model)

    @classmethod
    def from_regex(cls, pattern: str, model: Model) -> GrammarConstraint:
        return cls.from_grammar(Grammar.from_regex(pattern), model)

    @classmethod
    def from_ebnf(cls, ebnf: str, model: Model) -> GrammarConstraint:
        return cls.from_grammar(Grammar.from_ebnf(ebnf), model)

    @property
    def matcher(self) -> Matcher:
        return self._matcher

    def step(self, accepted: list[int]) -> list[int]:
        return brle.encode(self._mask_after(accepted))

    def _mask_after(self, accepted: list[int]) -> np.ndarray:
        """[V] bool allowed next tokens after feeding `accepted` (the generator's fast path: no BRLE)."""
        self._matcher.accept_tokens(accepted)
        return self._matcher.allowed()


# =============================================================================
# Schema protocol + built-in schemas
# =============================================================================


@runtime_checkable
class Schema(Protocol):
    """Anything with build_constraint(model) -> Constraint; passed as generate(constrain=...)."""

    def build_constraint(self, model: Model) -> Any: ...


@dataclass(frozen=True, slots=True)
class JsonSchema:
    """JSON conforming to a JSON Schema string."""

    schema: str

    def build_constraint(self, model: Model) -> GrammarConstraint:
        return GrammarConstraint.from_json_schema(self.schema, model)


@dataclass(frozen=True, slots=True)
class AnyJson:
    """Any valid JSON value."""

    def build_constraint(self, model: Model) -> GrammarConstraint:
        return GrammarConstraint.json(model)


@dataclass(frozen=True, slots=True)
class Regex:
    """Strings matching a regular expression."""

    pattern: str

    def build_constraint(self, model: Model) -> GrammarConstraint:
        return GrammarConstraint.from_regex(self.pattern, model)


@dataclass(frozen=True, slots=True)
class Ebnf:
    """A grammar in Pie's GBNF syntax (`root ::= ...`) or Lark syntax (`start: ...`)."""

    source: str

    def build_constraint(self, model: Model) -> GrammarConstraint:
        return GrammarConstraint.from_ebnf(self.source, model)


def build(c: Any, model: Model) -> Any:
    """A Constraint from a Schema or Constraint (clear TypeError otherwise)."""
    if hasattr(c, "build_constraint"):
        return c.build_constraint(model)
    if hasattr(c, "step"):
        return c
    raise TypeError(
        f"constrain= takes a Schema (JsonSchema, AnyJson, Regex, Ebnf, or anything with "
        f"build_constraint(model)) or a Constraint (with step(accepted)), got {c!r}"
    )


__all__ = [
    "AnyJson",
    "Constraint",
    "Ebnf",
    "Grammar",
    "GrammarConstraint",
    "GrammarError",
    "JsonSchema",
    "Matcher",
    "Regex",
    "Schema",
]
