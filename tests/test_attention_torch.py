"""TorchBackend against a direct per-token reference (float64 softmax over gathered slots)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pie.attention import create_backend
from pie.attention.base import AttentionMetadata, AttentionParams, append_kv
from pie.attention.torch_backend import TorchBackend
from pie.drivers.protocol import make_batch
from pie.errors import DriverError

D = 8


def _setup(qo_lens, kv_lens, page_size, num_kv_heads, masks=None, seed=0):
    """Random paged cache + batch; returns (batch, kv_cache, per-request slot -> (page, offset) tables)."""
    rng = np.random.default_rng(seed)
    num_pages = sum(-(-n // page_size) for n in kv_lens) + 3
    free = list(rng.permutation(num_pages))
    reqs = []
    for r, (n, kv) in enumerate(zip(qo_lens, kv_lens, strict=True)):
        pages = [int(free.pop()) for _ in range(-(-kv // page_size))]
        req = dict(
            token_ids=[0] * n,
            positions=list(range(kv - n, kv)),
            pages=pages,
            last_page_len=kv - (len(pages) - 1) * page_size,
        )
        if masks is not None:
            req["mask"] = masks[r]
        reqs.append(req)
    batch = make_batch(reqs, page_size)
    g = torch.Generator().manual_seed(seed)
    kv_cache = torch.randn(num_pages, 2, page_size, num_kv_heads, D, generator=g)
    return batch, kv_cache


def _reference(q, kv_cache, batch, page_size, num_kv_heads) -> torch.Tensor:
    out = torch.zeros_like(q, dtype=torch.float64)
    Hq = q.shape[1]
    kv_lens, qo = batch.kv_lens(page_size), batch.qo_indptr
    for r in range(batch.num_requests):
        pages = batch.kv_page_indices[batch.kv_page_indptr[r] : batch.kv_page_indptr[r + 1]]
        kv, n = int(kv_lens[r]), int(qo[r + 1] - qo[r])
        slots = [(int(pages[s // page_size]), s % page_size) for s in range(kv)]
        k = torch.stack([kv_cache[p, 0, o] for p, o in slots]).double()  # [kv, Hkv, D]
        v = torch.stack([kv_cache[p, 1, o] for p, o in slots]).double()
        if batch.mask is not None:
            m = torch.from_numpy(batch.mask[batch.mask_indptr[r] : batch.mask_indptr[r + 1]].reshape(n, kv))
        else:
            m = torch.from_numpy(np.tril(np.ones((n, kv), dtype=bool), k=kv - n))
        for h in range(Hq):
            kh = h // (Hq // num_kv_heads)
            s = q[qo[r] : qo[r + 1], h].double() @ k[:, kh].T * D**-0.5  # [n, kv]
            p = torch.softmax(s.masked_fill(~m, float("-inf")), dim=-1)
            out[qo[r] : qo[r + 1], h] = p @ v[:, kh]
    return out


def _run(batch, kv_cache, page_size, num_qo_heads, num_kv_heads, seed=0) -> tuple[torch.Tensor, torch.Tensor]:
    be = TorchBackend(num_qo_heads, num_kv_heads, D, page_size, torch.float32, torch.device("cpu"))
    meta = AttentionMetadata.from_batch(batch, page_size, torch.device("cpu"))
    be.plan(meta)
    q = torch.randn(batch.num_tokens, num_qo_heads, D, generator=torch.Generator().manual_seed(seed + 1))
    return be.run(q, kv_cache, 0), q


CASES = [
    ([1, 5, 1, 7], [9, 5, 1, 20]),  # decodes and prefills mixed, one fresh prefill (n == kv)
    ([1, 1, 1], [3, 17, 40]),  # pure decode, different lengths
    ([12], [12]),  # single fresh prefill
    ([4, 6], [30, 6]),  # chunked prefill next to a fresh one
]


@pytest.mark.parametrize("page_size", [1, 3, 16])
@pytest.mark.parametrize("num_qo_heads,num_kv_heads", [(4, 2), (4, 4), (6, 1)])
@pytest.mark.parametrize("case", CASES)
def test_matches_reference_causal(case, page_size, num_qo_heads, num_kv_heads):
    batch, kv_cache = _setup(*case, page_size, num_kv_heads)
    out, q = _run(batch, kv_cache, page_size, num_qo_heads, num_kv_heads)
    ref = _reference(q, kv_cache, batch, page_size, num_kv_heads)
    assert torch.allclose(out.double(), ref, atol=1e-5)


@pytest.mark.parametrize("page_size", [1, 4])
@pytest.mark.parametrize("case", CASES)
def test_matches_reference_custom_mask(case, page_size):
    rng = np.random.default_rng(3)
    masks = []
    for n, kv in zip(*case, strict=True):
        m = rng.random((n, kv)) < 0.5
        m[np.arange(n), rng.integers(0, kv, n)] = True  # every row sees at least one slot
        masks.append(m)
    batch, kv_cache = _setup(*case, page_size, 2, masks=masks)
    out, q = _run(batch, kv_cache, page_size, 4, 2)
    ref = _reference(q, kv_cache, batch, page_size, 2)
    assert torch.allclose(out.double(), ref, atol=1e-5)


def test_append_then_run_sees_new_tokens():
    """append_kv writes each new token where the backend gathers it (slot kv_len - n + i)."""
    page_size = 3
    batch, kv_cache = _setup([4, 1], [7, 5], page_size, 2)
    meta = AttentionMetadata.from_batch(batch, page_size, torch.device("cpu"))
    k = torch.randn(batch.num_tokens, 2, D)
    v = torch.randn(batch.num_tokens, 2, D)
    append_kv(kv_cache, k, v, meta)
    out, q = _run(batch, kv_cache, page_size, 2, 2)
    ref = _reference(q, kv_cache, batch, page_size, 2)
    assert torch.allclose(out.double(), ref, atol=1e-5)
    # request 0's last token is at slot 6 = page index 2 of its list, offset 0
    p = int(batch.kv_page_indices[2])
    assert torch.equal(kv_cache[p, 0, 0], k[3])


def test_create_backend_by_name():
    kw = dict(
        num_qo_heads=4,
        num_kv_heads=2,
        head_dim=D,
        page_size=4,
        dtype=torch.float32,
        device=torch.device("cpu"),
    )
    assert isinstance(create_backend("torch", **kw), TorchBackend)
    assert isinstance(create_backend("auto", **kw), TorchBackend)  # CPU never picks FlashInfer
    with pytest.raises(DriverError, match="unknown attention backend 'nope'"):
        create_backend("nope", **kw)
    try:
        import flashinfer  # noqa: F401
    except ImportError:
        with pytest.raises(DriverError, match="pip install flashinfer-python"):
            create_backend("flashinfer", **kw)
    else:
        with pytest.raises(DriverError, match="CUDA only"):
            create_backend("flashinfer", **kw)


# ---- per-layer params: window, soft-cap, scale, sinks ------------------------------------------------


def _reference_params(q, kv_cache, batch, page_size, p, sinks=None) -> torch.Tensor:
    """Per token: slots the causal / custom mask allows AND within the window; float64 softmax of
    cap * tanh(scale * q.k / cap), with the sink logit in the denominator."""
    out = torch.zeros_like(q, dtype=torch.float64)
    Hq = q.shape[1]
    kv_lens, qo = batch.kv_lens(page_size), batch.qo_indptr
    for r in range(batch.num_requests):
        pages = batch.kv_page_indices[batch.kv_page_indptr[r] : batch.kv_page_indptr[r + 1]]
        kv, n = int(kv_lens[r]), int(qo[r + 1] - qo[r])
        slots = [(int(pages[s // page_size]), s % page_size) for s in range(kv)]
        k = torch.stack([kv_cache[pg, 0, o] for pg, o in slots]).double()
        v = torch.stack([kv_cache[pg, 1, o] for pg, o in slots]).double()
        if batch.mask is not None:
            m = torch.from_numpy(batch.mask[batch.mask_indptr[r] : batch.mask_indptr[r + 1]].reshape(n, kv))
        else:
            m = torch.from_numpy(np.tril(np.ones((n, kv), dtype=bool), k=kv - n))
        if p.window_left >= 0:
            q_slot = np.arange(kv - n, kv)[:, None]
            m = m & torch.from_numpy(np.arange(kv)[None, :] >= q_slot - p.window_left)
        for h in range(Hq):
            kh = h // (Hq // p.num_kv_heads)
            s = q[qo[r] : qo[r + 1], h].double() @ k[:, kh].T * p.sm_scale
            if p.logits_soft_cap:
                s = torch.tanh(s / p.logits_soft_cap) * p.logits_soft_cap
            s = s.masked_fill(~m, float("-inf"))
            if sinks is not None:
                s = torch.cat([s, torch.full((n, 1), float(sinks[h]), dtype=torch.float64)], dim=-1)
                out[qo[r] : qo[r + 1], h] = torch.softmax(s, dim=-1)[:, :-1] @ v[:, kh]
            else:
                out[qo[r] : qo[r + 1], h] = torch.softmax(s, dim=-1) @ v[:, kh]
    return out


PARAMS = {
    "window": AttentionParams(4, 2, D, 0.3, window_left=3),
    "window1": AttentionParams(4, 2, D, 0.3, window_left=0),  # sees only itself
    "softcap": AttentionParams(4, 2, D, 0.7, logits_soft_cap=1.5),
    "window_softcap": AttentionParams(4, 2, D, 0.7, window_left=5, logits_soft_cap=1.5),
    "sinks": AttentionParams(4, 2, D, 0.5, window_left=4, has_sinks=True),
}


@pytest.mark.parametrize("page_size", [1, 3])
@pytest.mark.parametrize("name", list(PARAMS))
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("masked", [False, True])
def test_window_softcap_scale_sinks_match_reference(case, name, page_size, masked):
    p = PARAMS[name]
    masks = None
    if masked:
        rng = np.random.default_rng(5)
        masks = []
        for n, kv in zip(*case, strict=True):
            m = rng.random((n, kv)) < 0.6
            m[np.arange(n), np.arange(kv - n, kv)] = True  # each token sees itself (inside any window)
            masks.append(m)
    batch, kv_cache = _setup(*case, page_size, 2, masks=masks)
    be = TorchBackend(4, 2, D, page_size, torch.float32, torch.device("cpu"), layer_params=[p])
    be.plan(AttentionMetadata.from_batch(batch, page_size, torch.device("cpu")))
    q = torch.randn(batch.num_tokens, 4, D, generator=torch.Generator().manual_seed(9))
    sinks = torch.tensor([0.5, -1.0, 2.0, 0.0]) if p.has_sinks else None
    out = be.run(q, kv_cache, 0, p, sinks)
    ref = _reference_params(q, kv_cache, batch, page_size, p, sinks)
    assert torch.allclose(out.double(), ref, atol=1e-5)
    if p.window_left >= 0 and max(case[1]) > p.window_left + 1:  # the window changes the result
        full = be.run(q, kv_cache, 0, AttentionParams(4, 2, D, p.sm_scale, logits_soft_cap=p.logits_soft_cap,
                                                      has_sinks=p.has_sinks), sinks)  # fmt: skip
        assert not torch.allclose(out, full, atol=1e-3)


def test_sinks_without_a_tensor_is_an_error():
    batch, kv_cache = _setup([2], [2], 4, 2)
    be = TorchBackend(4, 2, D, 4, torch.float32, torch.device("cpu"))
    be.plan(AttentionMetadata.from_batch(batch, 4, torch.device("cpu")))
    with pytest.raises(ValueError, match="sink"):
        be.run(torch.zeros(2, 4, D), kv_cache, 0, PARAMS["sinks"])
