"""A served model as an inferlet sees it."""

from __future__ import annotations

from pie.drivers.protocol import Capabilities
from pie.errors import ModelError
from pie.models.tokenizer import Tokenizer
from pie.runtime.engine import ModelRuntime
from pie.runtime.scope import current_scope


class Model:
    def __init__(self, runtime: ModelRuntime) -> None:
        self._rt = runtime

    @classmethod
    def load(cls, name: str | None = None) -> Model:
        """The model called `name` in the config (None: this inferlet's default model)."""
        scope = current_scope()
        return cls(scope.engine.model(name or scope.default_model))

    @property
    def name(self) -> str:
        return self._rt.name

    @property
    def tokenizer(self) -> Tokenizer:
        if self._rt.tokenizer is None:
            raise ModelError(f"model {self.name!r} was started without a tokenizer; work with token ids")
        return self._rt.tokenizer

    @property
    def has_tokenizer(self) -> bool:
        return self._rt.tokenizer is not None

    @property
    def capabilities(self) -> Capabilities:
        return self._rt.capabilities

    @property
    def page_size(self) -> int:
        return self._rt.capabilities.page_size

    @property
    def vocab_size(self) -> int:
        return self._rt.capabilities.vocab_size

    @property
    def eos_token_ids(self) -> list[int]:
        return list(self._rt.tokenizer.eos_token_ids) if self._rt.tokenizer is not None else []

    def __repr__(self) -> str:
        caps = self._rt.capabilities
        return f"Model({self.name!r}, {caps.architecture}, {caps.device})"
