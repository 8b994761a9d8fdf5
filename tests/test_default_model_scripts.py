"""Tests of the default model's build scripts (scripts/) and of its shipped tokenizer assets."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT / "src" / "pie" / "assets" / "default-model"
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TEXTS = [
    "Héllo wörld ✓ 日本語 🍕 Ελληνικά عربى",
    "  def f(x):\r\n\treturn x ** 2  # trailing   \n\n\n",
    "e\u0301 (decomposed) vs \u00e9, NBSP\u00a0and zero\u200bwidth",
    "",
    " leading space, 12345678901234567890, 'quotes' \"and\" `ticks`",
]


def _script(name: str):
    """Import scripts/<name>.py as a module (scripts/ is not a package)."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


# ----------------------------------------------------------------------------- shipped tokenizer
def test_tokenizer_round_trips_and_specials_are_single_ids():
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(ASSETS / "tokenizer.json"))
    assert tok.get_vocab_size() == 8192
    for text in TEXTS:
        ids = tok.encode(text).ids
        assert tok.decode(ids, skip_special_tokens=False) == text
    for i, special in enumerate(SPECIALS):
        assert tok.encode(special).ids == [i]
    mixed = "<|im_start|>user\nhi<|im_end|>\n"
    ids = tok.encode(mixed).ids
    assert ids[0] == 1 and ids.count(2) == 1 and tok.decode(ids, skip_special_tokens=False) == mixed
    # Ordinary text never produces special ids, even when it looks close to one.
    assert not {0, 1, 2} & set(tok.encode("<|im_end| > <|endoftext").ids)


def test_auto_tokenizer_loads_with_expected_special_tokens():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(ASSETS)
    assert len(tok) == 8192
    assert (tok.eos_token, tok.eos_token_id) == ("<|im_end|>", 2)
    assert (tok.pad_token, tok.pad_token_id) == ("<|endoftext|>", 0)
    assert tok.bos_token is None and tok.model_max_length == 2048
    for text in TEXTS:
        assert tok.decode(tok.encode(text, add_special_tokens=False)) == text


def test_chat_template_renders_chatml_with_generation_prompt():
    import jinja2
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(ASSETS)
    msgs = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What does str.split do?"},
        {"role": "assistant", "content": "It splits a string."},
        {"role": "user", "content": "And str.join?"},
    ]
    expected = (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat does str.split do?<|im_end|>\n"
        "<|im_start|>assistant\nIt splits a string.<|im_end|>\n<|im_start|>user\nAnd str.join?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == expected
    assert tok.apply_chat_template(msgs, tokenize=False) == expected.removesuffix("<|im_start|>assistant\n")
    # The standalone .jinja file is the same template as the one in tokenizer_config.json.
    jinja = (ASSETS / "chat_template.jinja").read_text()
    assert jinja2.Template(jinja).render(messages=msgs, add_generation_prompt=True) == expected
    ids = tok.encode(expected, add_special_tokens=False)
    assert ids.count(1) == 5 and ids.count(2) == 4  # one <|im_start|> / <|im_end|> id per turn


# ----------------------------------------------------------------------------- build_corpus.py
def test_docstring_collection_survives_hanging_and_noisy_modules(tmp_path, monkeypatch):
    bc = _script("build_corpus")
    (tmp_path / "pie_hang_mod.py").write_text('"""Hangs on import."""\nimport time\ntime.sleep(60)\n')
    (tmp_path / "pie_noisy_mod.py").write_text(
        '"""A module that prints on import."""\nimport os\nprint("noise")\nos.write(1, b"raw noise\\n")\n'
        "def helper(a, b=2):\n    '''Add two numbers and return the sum.'''\n    return a + b\n"
    )
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    records, skipped = bc.collect_docstrings(
        ["pie_hang_mod", "pie_missing_mod", "pie_noisy_mod"], timeout_s=3.0
    )
    assert skipped == ["pie_hang_mod", "pie_missing_mod"]
    by_name = {r["name"]: r for r in records}
    assert by_name["pie_noisy_mod"]["doc"] == "A module that prints on import."
    assert by_name["helper"]["sig"] == "(a, b=2)"


def test_build_corpus_outputs(tmp_path):
    bc = _script("build_corpus")
    stats = bc.build(tmp_path / "c", seed=0, max_doc_chars=20000)
    assert stats["documents"] > 1000 and stats["chat_examples"] > 1000
    text = (tmp_path / "c" / "corpus.txt").read_text(encoding="utf-8")
    docs = [d.strip() for d in text.split("<|endoftext|>")]
    assert len(docs) == stats["documents"] and all(docs)
    assert any(d.startswith("The Zen of Python") and "Beautiful is better than ugly." in d for d in docs)
    assert any('The "for" statement is used to iterate' in d for d in docs)  # pydoc_data topic
    assert any(d.startswith("class str\n") and "\n\nstr.split(self, /, sep=None" in d for d in docs)
    assert not any(s in d for d in docs for s in SPECIALS[1:])
    lines = (tmp_path / "c" / "chat.jsonl").read_text(encoding="utf-8").splitlines()
    convs = [json.loads(line)["messages"] for line in lines]
    for msgs in convs:
        roles = [m["role"] for m in msgs if m["role"] != "system"]
        assert roles and roles == ["user", "assistant"] * (len(roles) // 2)
        assert all(m["content"] for m in msgs)
    users = {m["content"] for msgs in convs for m in msgs if m["role"] == "user"}
    assert any(u.startswith("What is the `for` statement") or "`for`" in u for u in users)
    # Deterministic for a given seed.
    bc.build(tmp_path / "c2", seed=0, max_doc_chars=20000)
    assert (tmp_path / "c2" / "chat.jsonl").read_bytes() == (tmp_path / "c" / "chat.jsonl").read_bytes()


# ----------------------------------------------------------------------------- train_tokenizer.py
def _tiny_corpus(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    docs = [
        f"Document {i}. The for statement iterates over a sequence; str.split returns a list of words. "
        f"Unicode: café ñ 日本 {i * 7}."
        for i in range(200)
    ]
    (path / "corpus.txt").write_text("\n<|endoftext|>\n".join(docs) + "\n", encoding="utf-8")
    chats = [
        {
            "messages": [
                {"role": "user", "content": f"What is item {i}?"},
                {"role": "assistant", "content": docs[i]},
            ]
        }
        for i in range(50)
    ]
    (path / "chat.jsonl").write_text("".join(json.dumps(c) + "\n" for c in chats), encoding="utf-8")
    return path


def test_train_tokenizer_on_tiny_corpus(tmp_path):
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    tt = _script("train_tokenizer")
    corpus = _tiny_corpus(tmp_path / "corpus")
    assert tt.main(["--corpus", str(corpus), "--out", str(tmp_path / "tok"), "--vocab-size", "400"]) == 0
    tok = Tokenizer.from_file(str(tmp_path / "tok" / "tokenizer.json"))
    assert [tok.token_to_id(s) for s in SPECIALS] == [0, 1, 2]
    assert 259 < tok.get_vocab_size() <= 400  # 3 specials + 256 bytes + merges
    for text in TEXTS:
        assert tok.decode(tok.encode(text).ids) == text
    hf = AutoTokenizer.from_pretrained(tmp_path / "tok")
    assert hf.eos_token_id == 2 and hf.pad_token_id == 0


def test_train_tokenizer_missing_corpus_is_a_clear_error(tmp_path):
    tt = _script("train_tokenizer")
    with pytest.raises(SystemExit, match="build_corpus.py"):
        tt.main(["--corpus", str(tmp_path / "nope"), "--out", str(tmp_path / "tok")])


# ----------------------------------------------------------------------------- train_default_model.py
def test_train_default_model_tiny_cpu_checkpoint_loads(tmp_path, capsys):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tdm = _script("train_default_model")
    corpus = _tiny_corpus(tmp_path / "corpus")
    out = tmp_path / "model"
    args = ["--device", "cpu", "--tiny", "--steps", "3", "--corpus", str(corpus)]
    args += ["--tokenizer", str(ASSETS), "--out", str(out), "--sample-tokens", "4"]
    assert tdm.main(args) == 0
    printed = capsys.readouterr().out
    assert "held-out loss" in printed and "[greedy]" in printed and "[sampled]" in printed

    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "qwen3" and cfg["architectures"] == ["Qwen3ForCausalLM"]
    assert cfg["tie_word_embeddings"] is True and cfg["torch_dtype"] == "bfloat16"
    assert cfg["eos_token_id"] == 2 and cfg["pad_token_id"] == 0 and cfg["vocab_size"] == 8192
    assert cfg["attention_dropout"] == 0.0
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen["eos_token_id"] == 2
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        assert (out / name).is_file()

    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.dtype == torch.bfloat16 and model.config.model_type == "qwen3"
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # tied
    tok = AutoTokenizer.from_pretrained(out)
    ids = torch.tensor([tok.encode("The for statement")])
    logits = model(input_ids=ids).logits
    assert logits.shape == (1, ids.shape[1], 8192) and torch.isfinite(logits).all()


def test_train_default_model_missing_corpus_is_a_clear_error(tmp_path):
    tdm = _script("train_default_model")
    with pytest.raises(SystemExit, match="build_corpus.py"):
        tdm.main(["--device", "cpu", "--tiny", "--steps", "1", "--corpus", str(tmp_path / "nope")])


# ----------------------------------------------------------------------------- shipped model (once committed)
@pytest.mark.skipif(not (ASSETS / "model.safetensors").is_file(), reason="default model not trained yet")
def test_shipped_default_model_fits_budget_and_is_qwen3():
    size = sum(p.stat().st_size for p in ASSETS.rglob("*") if p.is_file())
    assert size <= 30 * 1024 * 1024, f"default-model folder is {size / 2**20:.1f} MiB (> 30 MiB)"
    cfg = json.loads((ASSETS / "config.json").read_text())
    assert cfg["model_type"] == "qwen3" and cfg["tie_word_embeddings"] is True
    assert cfg["eos_token_id"] == 2 and cfg["vocab_size"] == 8192
    assert (ASSETS / "generation_config.json").is_file()
