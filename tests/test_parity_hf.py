"""Executor logits vs HF transformers on tiny random checkpoints (fp32, CPU, torch attention backend).

Tolerance: max abs logit difference <= 1e-4 (logits are O(5) here; fp32 differences come only from
fused vs separate matmuls and attention reduction order). Pages are handed out from a shuffled pool,
so every request's KV is non-contiguous.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers
from tiny_models import ARCHS, hf_model_class

from pie.drivers.executor import ModelExecutor
from pie.drivers.protocol import make_batch
from pie.drivers.spec import ExecutorSpec

ATOL = 1e-4
_HF: dict[str, torch.nn.Module] = {}


class PagedSeqs:
    """Test-side page bookkeeping: a shuffled free list and each sequence's pages and KV length."""

    def __init__(self, num_pages: int, page_size: int, seed: int = 0) -> None:
        self.page_size = page_size
        self.free = [int(p) for p in np.random.default_rng(seed).permutation(num_pages)]
        self.pages: dict[int, list[int]] = {}
        self.lens: dict[int, int] = {}

    def request(self, sid: int, token_ids, positions=None, mask=None, **extra) -> dict:
        """Request dict (for make_batch) appending token_ids to sequence sid; all rows output logits."""
        n, old = len(token_ids), self.lens.get(sid, 0)
        new = old + n
        pages = self.pages.setdefault(sid, [])
        while len(pages) * self.page_size < new:
            pages.append(self.free.pop())
        self.lens[sid] = new
        req = dict(
            state_slot=sid,  # hybrid models' recurrent-state slot (ignored by the others)
            token_ids=[int(t) for t in token_ids],
            positions=list(range(old, new)) if positions is None else [int(p) for p in positions],
            pages=list(pages),
            last_page_len=new - (len(pages) - 1) * self.page_size,
            outputs=list(range(n)),
            return_logits=True,
            **extra,
        )
        if mask is not None:
            req["mask"] = mask
        return req


def make_executor(path, page_size: int, num_pages: int = 160) -> ModelExecutor:
    spec = ExecutorSpec(
        model_path=str(path), page_size=page_size, num_pages=num_pages, attention_backend="torch"
    )
    return ModelExecutor(spec)


def hf_model(path) -> torch.nn.Module:
    key = str(path)
    if key not in _HF:
        cls = hf_model_class(transformers.AutoConfig.from_pretrained(key))
        # transformers' defaults on CPU (sdpa where the family allows it); the CUDA references of the GPU
        # tests force eager attention and experts instead (see test_gpu.EAGER)
        _HF[key] = cls.from_pretrained(key, dtype=torch.float32).eval()
    return _HF[key]


def hf_logits(path, ids) -> np.ndarray:
    with torch.no_grad():
        return hf_model(path)(torch.tensor([list(ids)], dtype=torch.int64)).logits[0].numpy()


def split_rows(result, batch) -> list[np.ndarray]:
    """Per-request logits rows of a batch where every token is an output with return_logits."""
    return np.split(result.logits, batch.qo_indptr[1:-1])


def paged_prefill_decode(
    ex, prompts: list[list[int]], page_size: int, steps: int = 4, seed: int | None = None
):
    """Prefill `prompts` in one batch on shuffled pages, then decode each sequence's greedy token `steps`
    times, all in one batch. Returns ([rows, V] logits per sequence, token list per sequence)."""
    seqs = PagedSeqs(ex.num_pages, page_size, seed=page_size if seed is None else seed)
    batch = make_batch([seqs.request(i, p) for i, p in enumerate(prompts)], page_size)
    res = ex.execute(batch)
    got = [[rows] for rows in split_rows(res, batch)]
    tokens = [list(p) for p in prompts]
    nxt = [int(r[-1]) for r in np.split(res.tokens, batch.qo_indptr[1:-1])]
    for _ in range(steps):
        batch = make_batch([seqs.request(i, [t]) for i, t in enumerate(nxt)], page_size)
        res = ex.execute(batch)
        for i, t in enumerate(nxt):
            tokens[i].append(t)
            got[i].append(res.logits[i : i + 1])
        nxt = [int(t) for t in res.tokens]
    return [np.concatenate(g) for g in got], tokens


def assert_greedy_matches_generate(ex, path, prompts: list[list[int]], page_size: int, n: int = 16) -> None:
    """n greedy tokens of the prompts decoded together, paged, equal transformers' generate one by one."""
    seqs = PagedSeqs(ex.num_pages, page_size, seed=2)
    batch = make_batch([seqs.request(i, p, temperature=0.0) for i, p in enumerate(prompts)], page_size)
    res = ex.execute(batch)
    gen = [[int(r[-1])] for r in np.split(res.tokens, batch.qo_indptr[1:-1])]
    for _ in range(n - 1):  # no EOS stop: random weights, and generate below runs a fixed count too
        batch = make_batch([seqs.request(i, g[-1:], temperature=0.0) for i, g in enumerate(gen)], page_size)
        for g, t in zip(gen, ex.execute(batch).tokens, strict=True):
            g.append(int(t))
    model = hf_model(path)
    for p, g in zip(prompts, gen, strict=True):
        ids = torch.tensor([p])
        with torch.no_grad():
            ref = model.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n, do_sample=False
            )
        assert g == ref[0, len(p) :].tolist()


def assert_close(ours: np.ndarray, ref: np.ndarray) -> None:
    assert ours.shape == ref.shape
    err = float(np.abs(ours - ref).max())
    assert err <= ATOL, f"max abs logit diff {err:.3g} > {ATOL}"


@pytest.mark.parametrize("page_size", [1, 16])
@pytest.mark.parametrize("arch", ARCHS)
def test_prefill_then_decode_matches_hf(tiny_checkpoint, arch, page_size):
    path = tiny_checkpoint(arch)
    ex = make_executor(path, page_size)
    seqs = PagedSeqs(ex.num_pages, page_size, seed=page_size)
    rng = np.random.default_rng(7)
    prompts = [rng.integers(0, ex.model_config.vocab_size, n).tolist() for n in (5, 17, 33)]
    batch = make_batch([seqs.request(i, p) for i, p in enumerate(prompts)], page_size)
    res = ex.execute(batch)
    got = [[rows] for rows in split_rows(res, batch)]
    tokens = [list(p) for p in prompts]
    nxt = np.split(res.tokens, batch.qo_indptr[1:-1])
    for _ in range(4):  # decode the greedy token of each sequence, all three in one batch
        step = [int(n[-1]) for n in nxt]
        batch = make_batch([seqs.request(i, [t]) for i, t in enumerate(step)], page_size)
        res = ex.execute(batch)
        for i, t in enumerate(step):
            tokens[i].append(t)
            got[i].append(res.logits[i : i + 1])
        nxt = [[t] for t in res.tokens]
    for i in range(3):
        ref = hf_logits(path, tokens[i])
        assert_close(np.concatenate(got[i]), ref)
        assert np.array_equal(np.concatenate(got[i]).argmax(-1)[len(prompts[i]) - 1 :], ref.argmax(-1)[-5:])


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_mixed_prefill_and_decode_batch(tiny_checkpoint, arch):
    path = tiny_checkpoint(arch)
    ex = make_executor(path, page_size=4)
    seqs = PagedSeqs(ex.num_pages, 4, seed=3)
    rng = np.random.default_rng(11)
    V = ex.model_config.vocab_size
    a, b, c = (rng.integers(0, V, n).tolist() for n in (9, 6, 17))
    ex.execute(make_batch([seqs.request(0, a), seqs.request(1, b)], 4))
    # pass 2: sequences 0 and 1 decode one token each while sequence 2 prefills 17
    a2, b2 = [int(rng.integers(V))], [int(rng.integers(V))]
    batch = make_batch([seqs.request(0, a2), seqs.request(2, c), seqs.request(1, b2)], 4)
    rows = split_rows(ex.execute(batch), batch)
    assert_close(rows[0], hf_logits(path, a + a2)[-1:])
    assert_close(rows[1], hf_logits(path, c))
    assert_close(rows[2], hf_logits(path, b + b2)[-1:])


def test_chunked_prefill_equals_single_pass(tiny_checkpoint):
    path = tiny_checkpoint("qwen2")
    ex = make_executor(path, page_size=8)
    seqs = PagedSeqs(ex.num_pages, 8, seed=5)
    prompt = np.random.default_rng(2).integers(0, ex.model_config.vocab_size, 33).tolist()
    whole = ex.execute(make_batch([seqs.request(0, prompt)], 8)).logits
    first = ex.execute(make_batch([seqs.request(1, prompt[:20])], 8)).logits
    second = ex.execute(make_batch([seqs.request(1, prompt[20:])], 8)).logits
    chunked = np.concatenate([first, second])
    assert float(np.abs(chunked - whole).max()) <= 1e-5
    assert_close(chunked, hf_logits(path, prompt))


def test_causal_custom_mask_equals_no_mask(tiny_checkpoint):
    path = tiny_checkpoint("llama")
    outs = []
    for use_mask in (False, True):
        ex = make_executor(path, page_size=4)
        seqs = PagedSeqs(ex.num_pages, 4, seed=1)
        rng = np.random.default_rng(4)
        p0, p1, t = rng.integers(0, 400, 10).tolist(), rng.integers(0, 400, 7).tolist(), [3]
        ex.execute(make_batch([seqs.request(0, p0)], 4))
        reqs = [seqs.request(0, t), seqs.request(1, p1)]
        if use_mask:  # explicit causal-over-slots masks; kv lens 11 and 7
            reqs[0]["mask"] = np.ones((1, 11), dtype=bool)
            reqs[1]["mask"] = np.tril(np.ones((7, 7), dtype=bool))
        batch = make_batch(reqs, 4)
        assert (batch.mask is not None) == use_mask
        outs.append(ex.execute(batch).logits)
    assert float(np.abs(outs[0] - outs[1]).max()) <= 1e-6


def test_mask_hiding_a_token_equals_hf_without_it(tiny_checkpoint):
    path = tiny_checkpoint("qwen3")
    ex = make_executor(path, page_size=4)
    seqs = PagedSeqs(ex.num_pages, 4, seed=9)
    ids = np.random.default_rng(5).integers(0, ex.model_config.vocab_size, 12).tolist()
    hidden = 4
    # slot 4 is invisible to every later token; later tokens shift their positions down by one so the
    # remaining sequence has the positions it would have without the hidden token
    mask = np.tril(np.ones((12, 12), dtype=bool))
    mask[hidden + 1 :, hidden] = False
    positions = [i if i <= hidden else i - 1 for i in range(12)]
    got = ex.execute(make_batch([seqs.request(0, ids, positions=positions, mask=mask)], 4)).logits
    without = ids[:hidden] + ids[hidden + 1 :]
    keep = [i for i in range(12) if i != hidden]
    assert_close(got[keep], hf_logits(path, without))
    # a decode step that keeps hiding it
    step_mask = np.ones((1, 13), dtype=bool)
    step_mask[0, hidden] = False
    got = ex.execute(make_batch([seqs.request(0, [7], positions=[11], mask=step_mask)], 4)).logits
    assert_close(got, hf_logits(path, without + [7])[-1:])


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_generation_matches_hf_generate(tiny_checkpoint, arch):
    path = tiny_checkpoint(arch)
    tok = transformers.AutoTokenizer.from_pretrained(str(path))
    text = tok.apply_chat_template([{"role": "user", "content": "Hello there, how are you?"}], tokenize=False)
    prompt = tok(text, add_special_tokens=False).input_ids
    page_size = 3  # odd size: decode steps cross page boundaries often
    ex = make_executor(path, page_size)
    seqs = PagedSeqs(ex.num_pages, page_size, seed=2)
    eos = set(ex.model_config.eos_token_ids)
    res = ex.execute(make_batch([seqs.request(0, prompt, temperature=0.0)], page_size))
    generated = [int(res.tokens[-1])]
    while len(generated) < 32 and generated[-1] not in eos:
        res = ex.execute(make_batch([seqs.request(0, generated[-1:], temperature=0.0)], page_size))
        generated.append(int(res.tokens[0]))
    ids = torch.tensor([prompt])
    with torch.no_grad():
        ref = hf_model(path).generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=32, do_sample=False
        )
    assert generated == ref[0, len(prompt) :].tolist()
