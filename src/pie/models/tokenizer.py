"""The tokenizer of a local model directory: a thin wrapper over transformers' AutoTokenizer.

transformers does the hard parts (tokenizer.json / sentencepiece loading, added tokens, the chat
template from tokenizer_config.json or chat_template.jinja rendered in its sandboxed jinja2
environment), so pie renders conversations exactly as the model's authors intended.
Only local files are read; nothing is downloaded.
"""

from __future__ import annotations

import json
from pathlib import Path

from pie.errors import ModelError


class Tokenizer:
    def __init__(self, hf_tokenizer, eos_token_ids: list[int], name: str = "") -> None:
        self.hf = hf_tokenizer
        self.eos_token_ids = eos_token_ids  # every id that ends a generation
        self.name = name

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        path = Path(path)
        if not path.is_dir():
            raise ModelError(f"tokenizer directory {path} does not exist")
        from pie.models.check import read_config_json, tokenizer_problem

        # Say what is really wrong: transformers reads config.json too and would report a broken
        # one as a tokenizer failure, and without tokenizer files it may load a useless tokenizer.
        if (path / "config.json").exists():
            read_config_json(path)
        if (problem := tokenizer_problem(path)) is not None:
            raise ModelError(problem)
        from transformers import AutoTokenizer

        try:
            hf = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        except Exception as e:
            raise ModelError(f"cannot load the tokenizer in {path}: {type(e).__name__}: {e}") from e
        return cls(hf, _eos_ids(path, hf), name=path.name)

    @property
    def vocab_size(self) -> int:
        """Ids the tokenizer can produce, added tokens included (the model's may be padded larger)."""
        return len(self.hf)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of `text`. Special-token strings in it ("<|im_end|>") become control tokens,
        except inside the `plain` spans of a pie.sdk.chat.ChatText (message contents), which are
        tokenized as the plain text they are."""
        from pie.models.text import unicode_problem

        if (problem := unicode_problem(text)) is not None:
            raise ModelError(
                f"cannot tokenize text: {problem}; decode input bytes as UTF-8 (errors='replace' keeps "
                "going past bad bytes) before passing them to pie"
            )
        plain = getattr(text, "plain", ())
        if not plain:
            return list(self.hf.encode(text, add_special_tokens=add_special_tokens))
        ids: list[int] = []
        pos = 0
        for a, b in [*plain, (len(text), len(text))]:
            if a > pos:  # the template's own text: its special tokens are structure
                ids += self.hf.encode(str(text[pos:a]), add_special_tokens=False)
            if b > a:
                ids += self.hf.encode(str(text[a:b]), add_special_tokens=False, split_special_tokens=True)
            pos = max(pos, b)
        if add_special_tokens:
            ids = self.hf.build_inputs_with_special_tokens(ids)
        return [int(i) for i in ids]

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return self.hf.decode(
            [int(i) for i in ids], skip_special_tokens=skip_special_tokens, clean_up_tokenization_spaces=False
        )

    def token_id(self, token: str) -> int | None:
        """The id of a token string such as "<|im_end|>" (None when it is not in the vocabulary)."""
        tid = self.hf.convert_tokens_to_ids(token)
        return None if tid is None or tid == self.hf.unk_token_id and token != self.hf.unk_token else int(tid)

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.hf, "chat_template", None))

    def render_chat(
        self, messages: list[dict], add_generation_prompt: bool = False, **template_kwargs
    ) -> str:
        """The conversation as text, through the model's chat template (no tokenization)."""
        if not self.has_chat_template:
            raise ModelError(
                f"the tokenizer of {self.name or 'this model'} has no chat template (none in "
                "tokenizer_config.json or chat_template.jinja); use ctx.append(tokenizer.encode(...)) instead"
            )
        return self.hf.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt, **template_kwargs
        )

    def detokenizer(self, prefix_ids=(), skip_special_tokens: bool = True) -> Detokenizer:
        return Detokenizer(self, prefix_ids, skip_special_tokens)


class Detokenizer:
    """Streams text from tokens without splitting a UTF-8 character or a merged word.

    Keeps two offsets into the ids (the algorithm of HF text-generation-inference): text is
    emitted only when decoding ids[prefix:] grows past ids[prefix:read] and does not end in the
    replacement character (an incomplete byte sequence). `prefix_ids` (e.g. the last prompt tokens)
    give sentencepiece tokenizers the context that decides a leading space.
    """

    def __init__(self, tok: Tokenizer, prefix_ids=(), skip_special_tokens: bool = True) -> None:
        self.tok = tok
        self.skip = skip_special_tokens
        self.ids = [int(i) for i in prefix_ids]
        self.prefix = 0
        self.read = len(self.ids)

    def _decode(self, ids) -> str:
        return self.tok.decode(ids, skip_special_tokens=self.skip)

    def push(self, ids) -> str:
        """Add tokens; return the text that became final."""
        self.ids.extend(int(i) for i in ids)
        before = self._decode(self.ids[self.prefix : self.read])
        after = self._decode(self.ids[self.prefix :])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return after[len(before) :]
        return ""

    def flush(self) -> str:
        """Whatever is left at the end (an incomplete character decodes as U+FFFD)."""
        before = self._decode(self.ids[self.prefix : self.read])
        after = self._decode(self.ids[self.prefix :])
        self.prefix = self.read = len(self.ids)
        return after[len(before) :]


def _eos_ids(path: Path, hf) -> list[int]:
    """eos ids from generation_config.json (int or list) and the tokenizer's eos token, in that order."""
    ids: list[int] = []
    gen = path / "generation_config.json"
    if gen.is_file():
        try:
            value = json.loads(gen.read_text()).get("eos_token_id")
        except (OSError, json.JSONDecodeError) as e:
            raise ModelError(f"cannot read {gen}: {e}") from e
        ids += [value] if isinstance(value, int) else list(value or [])
    if hf.eos_token_id is not None:
        ids.append(int(hf.eos_token_id))
    return list(dict.fromkeys(int(i) for i in ids))
