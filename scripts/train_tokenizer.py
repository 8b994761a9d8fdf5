#!/usr/bin/env python3
"""Train the byte-level BPE tokenizer of pie's embedded default model.

Invariants of the result (tests/test_default_model_scripts.py checks them):
- 8192 ids in all; ``<|endoftext|>``, ``<|im_start|>``, ``<|im_end|>`` are ids 0, 1, 2 and are
  never split, and no other string encodes to them;
- ``decode(encode(x)) == x`` for any text: no normalizer (Qwen's NFC would change non-NFC text),
  Qwen2's split regex then ByteLevel(add_prefix_space=False), and a ByteLevel decoder;
- ``tokenizer_config.json`` names PreTrainedTokenizerFast, eos ``<|im_end|>``, pad
  ``<|endoftext|>``, no bos, and carries the ChatML chat template (also ``chat_template.jinja``).

Usage: python scripts/train_tokenizer.py [--corpus .data/corpus] [--out src/pie/assets/default-model]
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 0, 1, 2
VOCAB_SIZE = 8192
MODEL_MAX_LENGTH = 2048
# Qwen2/Qwen3's pre-tokenizer regex: contractions, letter runs with one leading non-letter,
# single digits, punctuation runs, newlines, and whitespace runs that leave one space for the next word.
QWEN_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# ChatML as Qwen writes it, minus tools and thinking: each message is
# "<|im_start|>{role}\n{content}<|im_end|>\n"; the generation prompt opens an assistant turn.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- endif %}"
)
EOT = SPECIAL_TOKENS[0]


def build_tokenizer() -> Tokenizer:
    """An untrained BPE tokenizer with the pipeline described in the module docstring."""
    tok = Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok


def corpus_texts(corpus: Path) -> Iterator[str]:
    """Plain documents of corpus.txt, then every message of chat.jsonl (special tokens are added separately)."""
    plain, chat = corpus / "corpus.txt", corpus / "chat.jsonl"
    if not plain.is_file():
        raise SystemExit(
            f"error: {plain} not found; build it first: python scripts/build_corpus.py --out {corpus}"
        )
    for doc in plain.read_text(encoding="utf-8").split(EOT):
        if doc.strip():
            yield doc.strip()
    if chat.is_file():
        with open(chat, encoding="utf-8") as f:
            for line in f:
                for msg in json.loads(line)["messages"]:
                    yield msg["content"]


def train(corpus: Path, vocab_size: int = VOCAB_SIZE) -> Tokenizer:
    tok = build_tokenizer()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes: any text encodes
        show_progress=False,
    )
    tok.train_from_iterator(corpus_texts(corpus), trainer=trainer)
    for i, t in enumerate(SPECIAL_TOKENS):
        if tok.token_to_id(t) != i:
            raise RuntimeError(f"special token {t!r} got id {tok.token_to_id(t)}, expected {i}")
    return tok


def tokenizer_config() -> dict:
    """tokenizer_config.json for transformers (4.x and 5.x): special tokens and the chat template."""
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
        "model_max_length": MODEL_MAX_LENGTH,
        "clean_up_tokenization_spaces": False,
        "add_bos_token": False,
        "split_special_tokens": False,
        "chat_template": CHAT_TEMPLATE,
        "added_tokens_decoder": {
            str(i): {
                "content": t,
                "lstrip": False,
                "normalized": False,
                "rstrip": False,
                "single_word": False,
                "special": True,
            }  # fmt: skip
            for i, t in enumerate(SPECIAL_TOKENS)
        },
    }


def save(tok: Tokenizer, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(), indent=2) + "\n")
    (out / "chat_template.jinja").write_text(
        CHAT_TEMPLATE.replace("%}{", "%}\n{").replace("}}{", "}}\n{") + "\n"
    )
    special_map = {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
                   "additional_special_tokens": ["<|im_start|>", "<|im_end|>"]}  # fmt: skip
    (out / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2) + "\n")


def chars_per_token(tok: Tokenizer, corpus: Path) -> float:
    texts = list(corpus_texts(corpus))
    n_tokens = sum(len(e.ids) for e in tok.encode_batch(texts, add_special_tokens=False))
    return sum(len(t) for t in texts) / max(n_tokens, 1)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Train the default model's byte-level BPE tokenizer.")
    p.add_argument("--corpus", type=Path, default=Path(".data/corpus"), help="folder from build_corpus.py")
    p.add_argument("--out", type=Path, default=Path("src/pie/assets/default-model"))
    p.add_argument("--vocab-size", type=int, default=VOCAB_SIZE, help="total ids, special tokens included")
    args = p.parse_args(argv)
    tok = train(args.corpus, args.vocab_size)
    save(tok, args.out)
    stats = {
        "vocab_size": tok.get_vocab_size(),
        "chars_per_token": round(chars_per_token(tok, args.corpus), 3),
    }
    print(json.dumps(stats))
    return 0


if __name__ == "__main__":
    sys.exit(main())
