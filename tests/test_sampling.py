"""Tests for pie.drivers.sampling: rules per row, seeded reproducibility, distributions, extras."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pie.drivers.protocol import BatchError, make_batch
from pie.drivers.sampling import SamplingParams, sample, seeded_log_exponential

# Seeded sampling is exact on one device; across devices a near-tie may flip (see the module doc of
# pie.drivers.sampling). Every CPU-vs-CUDA comparison of seeded tokens uses this one bound.
SEEDED_CROSS_DEVICE_AGREEMENT = 0.995

FIELDS = {"temperature": 0.0, "top_k": 0, "top_p": 1.0, "min_p": 0.0, "seed": -1, "dist_k": 0}

# V = 10, spaced so every filter boundary below is far from a tie.
LOGITS10 = torch.tensor([2.0, 1.5, 1.2, 0.9, 0.5, 0.2, 0.0, -0.4, -1.0, -2.0])


def batch_of(n: int, **kw):
    """A ForwardBatch with n output rows; each kw is a scalar (broadcast) or a length-n sequence."""
    fields = {k: kw.get(k, v) for k, v in FIELDS.items()}
    fields = {k: list(v) if isinstance(v, (list, tuple, np.ndarray)) else [v] * n for k, v in fields.items()}
    req = {"token_ids": [0] * n, "positions": list(range(n)), "pages": [0], "last_page_len": n}
    return make_batch([{**req, "outputs": list(range(n)), **fields}], page_size=max(n, 1))


def params_of(n: int, **kw) -> SamplingParams:
    return SamplingParams.from_batch(batch_of(n, **kw), "cpu")


def ref_filter(logits: np.ndarray, t: float, top_k: int, top_p: float, min_p: float) -> np.ndarray:
    """Plain float64 HF-style warpers, one row: renormalized probabilities of the survivors."""
    x = logits.astype(np.float64) / t
    p = np.exp(x - x.max())
    p /= p.sum()
    order = np.argsort(-x)
    keep = np.ones(len(x), bool)
    if 0 < top_k < len(x):
        keep[order[top_k:]] = False
    if top_p < 1:
        q = np.where(keep, p, 0) / p[keep].sum()
        before = np.cumsum(q[order]) - q[order]
        drop = before >= top_p
        drop[0] = False
        keep[order[drop]] = False
    if min_p > 0:
        keep &= p >= min_p * p[keep].max()
    q = np.where(keep, p, 0)
    return q / q.sum()


def freqs(tokens: torch.Tensor, V: int) -> np.ndarray:
    return np.bincount(tokens.numpy(), minlength=V) / len(tokens)


def test_greedy_rows_equal_argmax():
    logits = torch.randn(7, 50)
    params = params_of(7)
    assert params.all_greedy
    out = sample(logits, params, return_logprobs=False)
    assert out.tokens.dtype == torch.int64
    assert torch.equal(out.tokens, logits.argmax(-1))
    assert out.logprobs is None and out.dist_ids is None
    # Greedy rows inside a sampled batch still take the argmax of the raw logits (so do tiny
    # temperatures, where logits / T would overflow).
    mixed = params_of(7, temperature=[0, 1.5, 1e-30, 2.0, 0, 0.3, 1e-6], seed=list(range(7)))
    assert not mixed.all_greedy
    got = sample(logits, mixed, False).tokens
    assert torch.equal(got[::2], logits.argmax(-1)[::2])


def test_top_k_1_is_argmax_at_any_temperature():
    logits = torch.randn(200, 40)
    params = params_of(200, temperature=np.linspace(0.1, 50, 200), top_k=1, seed=list(range(200)))
    assert params.all_greedy  # top_k == 1 takes the fast path
    assert torch.equal(sample(logits, params, False).tokens, logits.argmax(-1))
    with_dist = params_of(200, temperature=5.0, top_k=1, dist_k=2)
    assert torch.equal(sample(logits, with_dist, False).tokens, logits.argmax(-1))


def test_seeded_rows_deterministic_and_seed_dependent():
    logits = torch.zeros(1, 1000).expand(64, 1000).contiguous()  # uniform: token = argmin of E
    params = params_of(64, temperature=1.0, seed=list(range(64)))
    a = sample(logits, params, False).tokens
    b = sample(logits, params, False).tokens
    assert torch.equal(a, b)
    assert len(set(a.tolist())) > 55  # 64 seeds over 1000 tokens: different seeds, different draws


def test_same_seed_same_token_in_another_batch_and_row():
    torch.manual_seed(0)
    row = torch.randn(300)
    batch_a = torch.stack([row, torch.randn(300)])
    batch_b = torch.cat([torch.randn(5, 300), row[None], torch.randn(2, 300)])
    pa = params_of(2, temperature=[0.9, 1.3], top_p=[0.95, 1.0], seed=[4242, 7])
    pb = params_of(
        8,
        temperature=[0.2] * 5 + [0.9, 0.0, 1.0],
        top_k=[3] * 5 + [0, 3, 3],
        top_p=[1.0] * 5 + [0.95, 1.0, 1.0],
        seed=[-1] * 5 + [4242, -1, 5],
    )
    assert sample(batch_a, pa, False).tokens[0] == sample(batch_b, pb, False).tokens[5]


def test_seeded_distribution_matches_softmax():
    V, n, t = 8, 20_000, 0.7
    logits = torch.tensor([1.0, 0.3, -0.5, 2.0, 0.0, -1.5, 0.8, 1.2])
    want = torch.softmax(logits.double() / t, -1).numpy()
    tokens = sample(
        logits.expand(n, V), params_of(n, temperature=t, seed=np.arange(n) * 7919 + 3), False
    ).tokens
    assert np.abs(freqs(tokens, V) - want).max() < 0.02
    torch.manual_seed(1)  # unseeded rows use the global generator
    tokens = sample(logits.expand(n, V), params_of(n, temperature=t), False).tokens
    assert np.abs(freqs(tokens, V) - want).max() < 0.02


FILTER_CASES = [
    dict(temperature=1.0, top_k=3),
    dict(temperature=0.8, top_p=0.6),
    dict(temperature=1.2, min_p=0.2),
    dict(temperature=1.0, top_k=3, top_p=0.7),  # order matters: see test body
    dict(temperature=2.0, top_k=6, top_p=0.9, min_p=0.3),
]


@pytest.mark.parametrize("case", FILTER_CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_filters_allowed_set_and_distribution(case):
    n, V = 8000, len(LOGITS10)
    full = {"top_k": 0, "top_p": 1.0, "min_p": 0.0, **case}
    want = ref_filter(LOGITS10.numpy(), full["temperature"], full["top_k"], full["top_p"], full["min_p"])
    allowed = want > 0
    assert 1 < allowed.sum() < V  # the case really filters
    if case == FILTER_CASES[3]:  # top_p on the renormalized top-k set keeps fewer than on the full one
        unrenormalized = ref_filter(LOGITS10.numpy(), 1.0, 0, 0.7, 0.0) > 0
        assert allowed.sum() < (allowed | unrenormalized).sum()
    got = freqs(sample(LOGITS10.expand(n, V), params_of(n, seed=np.arange(n), **case), False).tokens, V)
    assert np.all(got[~allowed] == 0)  # never outside the allowed set
    assert np.all(got[allowed] > 0)  # every allowed token shows up
    assert np.abs(got - want).max() < 0.025


def test_hints_change_speed_not_results():
    """Hand-built params (default hints: sort path, every row hashed) give the same seeded tokens."""
    torch.manual_seed(3)
    logits = torch.randn(300, 64)
    seed = np.where(np.arange(300) % 4 == 0, -1, np.arange(300) + 11)
    kw = dict(temperature=np.linspace(0.3, 2, 300), top_k=np.arange(300) % 7, seed=seed)
    fast = params_of(300, **kw)
    assert fast.max_top_k == 6 and not fast.any_top_p
    seeded = fast.seeded_rows
    assert 0 < len(seeded) < 300 and torch.all(fast.seed[seeded] >= 0)
    slow = SamplingParams(
        fast.temperature, fast.top_k, fast.top_p, fast.min_p, fast.seed, fast.dist_k, 0, False
    )
    assert torch.equal(sample(logits, fast, False).tokens[seeded], sample(logits, slow, False).tokens[seeded])


@pytest.mark.parametrize("top_p", [0.0, 1e-6, 0.03])
def test_top_p_keeps_top_token(top_p):
    logits = torch.randn(500, 30) * 0.1  # flat; the top token always has >= 1/30 > 0.03 of the mass
    tokens = sample(logits, params_of(500, temperature=1.0, top_p=top_p, seed=np.arange(500)), False).tokens
    assert torch.equal(tokens, logits.argmax(-1))


def test_min_p_1_keeps_only_the_top_token():
    logits = torch.randn(300, 30)
    tokens = sample(logits, params_of(300, temperature=1.3, min_p=1.0, seed=np.arange(300)), False).tokens
    assert torch.equal(tokens, logits.argmax(-1))


def test_logprobs_and_entropies_match_float64():
    torch.manual_seed(4)
    logits = torch.randn(6, 100) * 3
    logits[2, 10:] = float("-inf")  # masked vocabulary: entropy must stay finite
    params = params_of(6, temperature=[0, 0.5, 1, 2, 0, 1], seed=[1, 2, 3, -1, -1, 9])
    out = sample(logits, params, return_logprobs=True)
    logp = torch.log_softmax(logits.double(), -1)
    want_lp = logp.gather(1, out.tokens[:, None]).squeeze(1)
    p = logp.exp()
    want_h = -torch.where(p > 0, p * logp, 0.0).sum(-1)
    assert out.logprobs.dtype == torch.float32 and out.entropies.dtype == torch.float32
    torch.testing.assert_close(out.logprobs.double(), want_lp, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.entropies.double(), want_h, atol=1e-5, rtol=1e-5)
    assert out.tokens[2] < 10


def test_dist_matches_topk_of_softmax_with_padding():
    torch.manual_seed(5)
    logits = torch.randn(4, 50)
    temps, ks = [0.0, 0.7, 1.5, 1.0], [5, 0, 2, 3]
    out = sample(logits, params_of(4, temperature=temps, dist_k=ks), False)
    assert out.dist_ids.shape == (4, 5) and out.dist_probs.shape == (4, 5)
    assert out.dist_ids.dtype == torch.int64 and out.dist_probs.dtype == torch.float32
    for r, (t, k) in enumerate(zip(temps, ks, strict=True)):
        probs, ids = torch.softmax(logits[r] / (t or 1.0), -1).topk(5)
        assert torch.equal(out.dist_ids[r, :k], ids[:k])
        torch.testing.assert_close(out.dist_probs[r, :k], probs[:k])
        assert torch.all(out.dist_ids[r, k:] == -1) and torch.all(out.dist_probs[r, k:] == 0)
    # dist_k beyond the vocabulary: every token, the rest padding.
    small = sample(logits[:1, :3], params_of(1, dist_k=6), False)
    assert small.dist_ids[0, 3:].tolist() == [-1, -1, -1]
    torch.testing.assert_close(small.dist_probs[0, :3].sum(), torch.tensor(1.0))


def test_mixed_rows_each_follow_their_rule():
    rules = [
        dict(temperature=0.0),
        dict(temperature=1.0, top_k=3),
        dict(temperature=0.8, top_p=0.6),
        dict(temperature=1.2, min_p=0.2),
        dict(temperature=1.0, seeded=True),
        dict(temperature=1.0),  # unseeded
    ]
    reps, V = 4000, len(LOGITS10)
    n = reps * len(rules)
    cols = {k: [r.get(k, FIELDS[k]) for r in rules] * reps for k in FIELDS}
    cols["seed"] = np.where([r.get("seeded", False) for r in rules] * reps, np.arange(n) + 100, -1)
    params = params_of(n, **cols)
    torch.manual_seed(6)
    tokens = sample(LOGITS10.expand(n, V), params, False).tokens.view(reps, len(rules))
    for j, rule in enumerate(rules):
        full = {**FIELDS, **rule}
        if full["temperature"] == 0:
            assert torch.all(tokens[:, j] == LOGITS10.argmax())
            continue
        want = ref_filter(LOGITS10.numpy(), full["temperature"], full["top_k"], full["top_p"], full["min_p"])
        got = freqs(tokens[:, j], V)
        assert np.all(got[want == 0] == 0) and np.all(got[want > 0] > 0)
        assert np.abs(got - want).max() < 0.03
    # Seeded rows give the same token when sampled alone.
    alone = sample(LOGITS10[None], params_of(1, temperature=1.0, seed=int(cols["seed"][4])), False).tokens
    assert alone[0] == tokens[0, 4]


def test_zero_rows():
    out = sample(torch.empty(0, 17), params_of(0), return_logprobs=True)
    assert out.tokens.shape == (0,) and out.logprobs.shape == (0,) and out.entropies.shape == (0,)
    assert out.dist_ids is None


def test_from_batch_fields_and_hints():
    batch = make_batch(
        [
            {"token_ids": [5, 6, 7], "positions": [0, 1, 2], "pages": [3], "last_page_len": 3, "outputs": [2],
             "temperature": 0.7, "top_k": 20, "seed": 11, "dist_k": 4},
            {"token_ids": [8], "positions": [9], "pages": [1, 2], "last_page_len": 2, "outputs": [0],
             "top_p": 0.5, "min_p": 0.1},
        ],
        page_size=4,
    )  # fmt: skip
    p = SamplingParams.from_batch(batch, torch.device("cpu"))
    assert p.temperature.tolist() == pytest.approx([0.7, 0.0])
    assert p.top_k.tolist() == [20, 0] and p.seed.tolist() == [11, -1] and p.dist_k.tolist() == [4, 0]
    assert p.top_p.dtype == torch.float32 and p.seed.dtype == torch.int64 and p.dist_k.dtype == torch.int32
    assert p.max_dist_k == 4 and not p.all_greedy
    # Hints come from sampled rows only: the greedy row's top_p does not force a sort.
    assert p.max_top_k == 20 and not p.any_top_p and p.seeded_rows.tolist() == [0]
    assert sample(torch.randn(2, 30), p, True).dist_ids.shape == (2, 4)


@pytest.mark.parametrize(
    "field,value,match",
    [("temperature", -1.0, "temperature"), ("temperature", math.inf, "temperature"), ("top_p", 1.5, "top_p"),
     ("min_p", -0.1, "min_p"), ("top_k", -2, "top_k"), ("seed", -3, "seed"), ("dist_k", -1, "dist_k")],
)  # fmt: skip
def test_from_batch_rejects_bad_values(field, value, match):
    with pytest.raises(BatchError, match=rf"{match}\[1\]"):
        params_of(2, **{field: [FIELDS[field], value]})


def test_bad_logits_shape_is_a_clear_error():
    with pytest.raises(ValueError, match="rows"):
        sample(torch.randn(3, 10), params_of(2), False)
    with pytest.raises(ValueError, match=r"\[O, V\]"):
        sample(torch.randn(10), params_of(2), False)


def _mix32(x: int) -> int:
    m = 0xFFFFFFFF
    x ^= x >> 16
    x = (x * 0x7FEB352D) & m
    x ^= x >> 15
    x = (x * 0x846CA68B) & m
    return x ^ (x >> 16)


def test_hash_matches_python_reference():
    """Integer hashing is exact, so CPU and CUDA agree; pin it to the documented algorithm."""
    seeds = [0, 1, 12345, 2**32 - 1, 2**32, 2**62 + 987654321, 2**63 - 1]
    V = 70_000
    got = seeded_log_exponential(torch.tensor(seeds), V)
    for r, s in enumerate(seeds):
        lo, hi = s & 0xFFFFFFFF, s >> 32
        ka, kb = _mix32(lo ^ _mix32(hi ^ 0x9E3779B9)), _mix32(hi ^ _mix32(lo ^ 0x85EBCA6B))
        for i in (0, 1, 2, 4097, V - 1):
            u = ((_mix32(_mix32(ka ^ i) ^ kb) >> 9) + 0.5) / 2**23
            assert got[r, i].item() == pytest.approx(math.log(-math.log(u)), abs=1e-6)
    e = got.exp()
    assert abs(e.mean().item() - 1) < 0.01 and abs(e.var().item() - 1) < 0.03  # Exp(1) moments


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu_and_never_syncs():
    torch.manual_seed(7)
    n = 512
    logits = torch.randn(n, 32_000) * 2
    kw = dict(
        temperature=np.linspace(0, 1.5, n), top_k=np.arange(n) % 50, top_p=np.where(np.arange(n) % 3, 1.0, 0.9),
        min_p=np.where(np.arange(n) % 5, 0.0, 0.05), seed=np.arange(n), dist_k=np.arange(n) % 4,
    )  # fmt: skip
    cpu = sample(logits, params_of(n, **kw), True)
    params = SamplingParams.from_batch(batch_of(n, **kw), "cuda")
    logits_cuda = logits.cuda()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        gpu = sample(logits_cuda, params, True)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert (gpu.tokens.cpu() == cpu.tokens).float().mean() >= SEEDED_CROSS_DEVICE_AGREEMENT
    torch.testing.assert_close(gpu.logprobs.cpu(), cpu.logprobs, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(gpu.dist_probs.cpu(), cpu.dist_probs, atol=1e-5, rtol=1e-4)
