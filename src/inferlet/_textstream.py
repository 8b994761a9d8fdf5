"""Generated tokens as text with the control tokens kept (what the reasoning and tool decoders scan)."""

from __future__ import annotations

from ._formats import Format, detect
from .model import Model

_FORMATS: dict[int, tuple[object, Format]] = {}  # id(tokenizer) -> (tokenizer, its format)


def model_format(model: Model) -> Format:
    tok = model._pie.tokenizer
    got = _FORMATS.get(id(tok))
    if got is None or got[0] is not tok:
        hf = tok.hf
        fmt = detect(set(hf.get_vocab()), str(getattr(hf, "chat_template", "") or ""))
        got = _FORMATS[id(tok)] = (tok, fmt)
    return got[1]


class TextStream:
    """Streams text from token batches, control tokens included (never splits a UTF-8 character)."""

    def __init__(self, model: Model) -> None:
        self._tok = model._pie.tokenizer
        self.reset()

    def push(self, tokens: list[int]) -> str:
        return self._detok.push([int(t) for t in tokens])

    def reset(self) -> None:
        self._detok = self._tok.detokenizer(skip_special_tokens=False)


def held_back(buf: str, markers: tuple[str, ...]) -> int:
    """How many trailing chars of buf may be the start of one of `markers` (kept until the next batch)."""
    best = 0
    for m in markers:
        for k in range(min(len(m) - 1, len(buf)), best, -1):
            if buf.endswith(m[:k]):
                best = k
                break
    return best
