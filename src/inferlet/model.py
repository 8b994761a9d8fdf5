"""Model and Tokenizer as Pie's SDK names them, over pie.sdk.Model and pie's Hugging Face tokenizer."""

from __future__ import annotations

import json
from functools import cached_property

from pie.models.tokenizer import Tokenizer as _PieTokenizer
from pie.sdk.model import Model as _PieModel

from ._errors import unsupported


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level BPE alphabet: the printable character standing for each byte, inverted."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = list(bs)
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs, strict=True)}


class Tokenizer:
    """encode / decode / vocabs / special_tokens / split_regex of Pie's SDK."""

    __slots__ = ("_tok", "__dict__")

    def __init__(self, tok: _PieTokenizer) -> None:
        self._tok = tok

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` (special-token strings in it become control tokens; no BOS is added)."""
        return self._tok.encode(text)

    def decode(self, tokens: list[int]) -> str:
        """Text of `tokens` (special tokens included, as their strings)."""
        return self._tok.decode(tokens)

    def vocabs(self) -> tuple[list[int], list[bytes]]:
        """(token ids, token bytes) of the whole vocabulary."""
        return self._vocab

    def special_tokens(self) -> tuple[list[int], list[bytes]]:
        """(token ids, token bytes) of the special (control) tokens."""
        hf = self._tok.hf
        ids = sorted(
            {int(i) for i, t in hf.added_tokens_decoder.items() if t.special} | set(hf.all_special_ids)
        )
        return ids, [hf.convert_ids_to_tokens(i).encode("utf-8") for i in ids]

    def split_regex(self) -> str:
        """The pre-tokenizer's split regular expression ("" when the tokenizer has none)."""
        backend = getattr(self._tok.hf, "backend_tokenizer", None)
        if backend is None:
            return ""

        def find(node) -> str:
            if isinstance(node, dict):
                pat = node.get("pattern")
                if node.get("type") == "Split" and isinstance(pat, dict) and "Regex" in pat:
                    return pat["Regex"]
                for v in node.values():
                    if found := find(v):
                        return found
            elif isinstance(node, list):
                for v in node:
                    if found := find(v):
                        return found
            return ""

        return find(json.loads(backend.to_str()).get("pre_tokenizer"))

    @cached_property
    def _vocab(self) -> tuple[list[int], list[bytes]]:
        hf = self._tok.hf
        special = set(self.special_tokens()[0])
        dec = _byte_decoder()
        ids, out = [], []
        for tok, i in sorted(hf.get_vocab().items(), key=lambda kv: kv[1]):
            ids.append(int(i))
            out.append(_token_bytes(tok, i in special, dec))
        return ids, out


def _token_bytes(tok: str, special: bool, dec: dict[str, int]) -> bytes:
    """The bytes a token stands for: byte-level BPE (GPT-2 alphabet), SentencePiece (▁, <0xNN>), or text."""
    if special:
        return tok.encode("utf-8")
    if len(tok) == 6 and tok.startswith("<0x") and tok.endswith(">"):
        return bytes([int(tok[3:5], 16)])
    if all(c in dec for c in tok):
        return bytes(dec[c] for c in tok)
    return tok.replace("▁", " ").encode("utf-8")


class Model:
    """A served model: Model.load(name) (None: this inferlet's default model)."""

    __slots__ = ("_pie", "_tokenizer")

    def __init__(self, pie_model: _PieModel) -> None:
        self._pie = pie_model
        self._tokenizer: Tokenizer | None = None

    @staticmethod
    def load(name: str | None = None) -> Model:
        """The model called `name` in the config (None: this inferlet's default model)."""
        return Model(_PieModel.load(name))

    @property
    def name(self) -> str:
        return self._pie.name

    @property
    def vocab_size(self) -> int:
        return self._pie.vocab_size

    @property
    def page_size(self) -> int:
        return self._pie.page_size

    def tokenizer(self) -> Tokenizer:
        if self._tokenizer is None:
            self._tokenizer = Tokenizer(self._pie.tokenizer)
        return self._tokenizer

    def default_system_speculation(self) -> bool:
        """Whether greedy generation drafts with the system n-gram speculator by default (it does)."""
        return True

    def speak(self, text: str):
        unsupported("speech synthesis (Model.speak)")

    def __eq__(self, other) -> bool:
        return isinstance(other, Model) and other._pie._rt is self._pie._rt

    def __hash__(self) -> int:
        return id(self._pie._rt)

    def __repr__(self) -> str:
        return f"inferlet.Model({self.name!r})"
