"""Batched token sampling for the drivers: one sampler per output row, vectorized, no host sync.

Per row r of logits [O, V] (float32):
  * temperature 0 (below GREEDY_TEMPERATURE) or top_k == 1 takes the argmax of the raw logits;
  * otherwise x = logits / temperature, then the filters compose like HF/vLLM warpers, in order
    top_k (keep tokens whose x is >= the k-th largest x; ties at the k-th value are all kept),
    top_p (on the renormalized top-k distribution, keep the smallest sorted prefix whose mass
    reaches p; the top token is always kept), min_p (keep p >= min_p * p_max); then one token is
    drawn from the renormalized survivors.

Drawing uses the exponential race: token = argmax_i(p_i / E_i) with E_i ~ Exp(1) i.i.d., which picks
i with probability p_i. It is computed in log space, argmax_i(x_i - log E_i) over the surviving
tokens, which has the same argmax (log is monotone, the normalizer is a per-row constant) and needs
no softmax, so it is free of reduction-order differences between devices.

Noise. Unseeded rows (seed -1) draw E from torch's global generator. A seeded row's E is a pure
function of (seed, vocab index), so the same seed and logits give the same token in any batch and at
any row on one device, exactly. Across devices (CPU vs CUDA) the same token is the rule but not a
promise: integer hashing is exact, but float32 `log` may differ by an ulp, and top_p's softmax and
cumulative sum reduce in a different order, so a row whose winner is a near-tie (two scores within
an ulp, or a token sitting on the top_p boundary) can flip. The tests hold both devices to the same
bound: at least 99.5% of seeded rows agree (tests/test_sampling.py SEEDED_CROSS_DEVICE_AGREEMENT). We hash with plain torch int64 ops rather than a
torch.Generator because generators are per device and produce one stream per call, not per row.
The hash, reimplementable anywhere (all values are unsigned 32-bit words held in int64):

    mix32(x)  = lowbias32 (Wellons): x ^= x >> 16; x *= 0x7FEB352D; x ^= x >> 15; x *= 0x846CA68B;
                x ^= x >> 16   (products mod 2^32)
    lo, hi    = seed & 0xFFFFFFFF, seed >> 32               (seed in [0, 2^63))
    ka        = mix32(lo ^ mix32(hi ^ 0x9E3779B9))
    kb        = mix32(hi ^ mix32(lo ^ 0x85EBCA6B))
    h(i)      = mix32(mix32(ka ^ i) ^ kb)                   (i = vocab index)
    u(i)      = ((h(i) >> 9) + 0.5) / 2^23                  (exact float32 in (0, 1))
    E(i)      = -log(u(i))                                  (> 0, so no division by zero)

Products are kept below 2^63 so int64 never overflows (the 0x846CA68B product is split in 16-bit
halves). A seed fixes the whole noise vector: callers wanting a seeded *sequence* must derive a new
seed per step (e.g. from seed and position); reusing one seed repeats the same noise every step.

A full sort happens only when some sampled row uses top_p (or top_k hints are unknown); top_k alone
uses torch.topk with k = max top_k. Such host decisions come from host hints in SamplingParams.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from pie.drivers.protocol import BatchError, ForwardBatch

__all__ = ["GREEDY_TEMPERATURE", "SampleOutput", "SamplingParams", "sample", "seeded_log_exponential"]

_M32 = 0xFFFFFFFF
_NEG_INF = float("-inf")
# Temperatures below this are argmax (as in vLLM): logits / T would overflow float32 long before T hits 0.
GREEDY_TEMPERATURE = 1e-5


@dataclass
class SamplingParams:
    """Device tensors, one entry per output row, plus host hints for branch-free dispatch.

    Invariants (checked by from_batch): temperature finite >= 0, top_k >= 0, top_p and min_p in [0, 1],
    seed >= -1, dist_k >= 0. The hints after all_greedy are conservative by default, so params built
    by hand stay correct (just slower); from_batch computes them exactly from the host arrays.
    """

    temperature: Tensor  # [O] float32; 0 (< GREEDY_TEMPERATURE) => argmax
    top_k: Tensor  # [O] int32/int64; 0 => off
    top_p: Tensor  # [O] float32; 1.0 => off
    min_p: Tensor  # [O] float32; 0.0 => off
    seed: Tensor  # [O] int64; -1 => unseeded
    dist_k: Tensor  # [O] int32; >0 => return top-k distribution
    max_dist_k: int  # host: max(dist_k), 0 if none
    all_greedy: bool  # host: every row argmax and no dist -> fast path
    max_top_k: int = -1  # host: max top_k over sampled rows, 0 if none; -1 unknown (forces a sort)
    any_top_p: bool = True  # host: some sampled row has top_p < 1
    seeded_rows: Tensor | None = None  # [S] int64 sampled rows with seed >= 0; None unknown (hash all rows)

    @classmethod
    def from_batch(cls, batch: ForwardBatch, device: torch.device | str) -> SamplingParams:
        """Validate the batch's sampler fields and copy them to `device` (one non-blocking copy each)."""
        n = batch.num_outputs
        arrays = {
            "temperature": np.float32,
            "top_k": np.int64,
            "top_p": np.float32,
            "min_p": np.float32,
            "seed": np.int64,
            "dist_k": np.int32,
        }
        host = {}
        for name, dtype in arrays.items():
            a = np.ascontiguousarray(getattr(batch, name), dtype=dtype)
            if a.shape != (n,):
                raise BatchError(f"{name} has shape {a.shape}, expected one entry per output row ({n},)")
            host[name] = a if a.flags.writeable else a.copy()  # torch.from_numpy wants writable memory
        _check_ranges(host)

        greedy = (host["temperature"] < GREEDY_TEMPERATURE) | (host["top_k"] == 1)
        sampled = ~greedy
        max_dist_k = int(host["dist_k"].max()) if n else 0
        seeded_rows = np.flatnonzero(sampled & (host["seed"] >= 0)).astype(np.int64)
        device = torch.device(device)
        return cls(
            **{k: torch.from_numpy(v).to(device, non_blocking=True) for k, v in host.items()},
            max_dist_k=max_dist_k,
            all_greedy=bool(greedy.all()) and max_dist_k == 0,
            max_top_k=int(host["top_k"][sampled].max()) if sampled.any() else 0,
            any_top_p=bool((host["top_p"][sampled] < 1).any()),
            seeded_rows=torch.from_numpy(seeded_rows).to(device, non_blocking=True),
        )


def _check_ranges(h: dict[str, np.ndarray]) -> None:
    checks = [
        ("temperature", np.isfinite(h["temperature"]) & (h["temperature"] >= 0), "a finite number >= 0"),
        ("top_k", h["top_k"] >= 0, ">= 0 (0 turns it off)"),
        ("top_p", (h["top_p"] >= 0) & (h["top_p"] <= 1), "in [0, 1] (1 turns it off)"),
        ("min_p", (h["min_p"] >= 0) & (h["min_p"] <= 1), "in [0, 1] (0 turns it off)"),
        ("seed", h["seed"] >= -1, ">= 0, or -1 for unseeded"),
        ("dist_k", h["dist_k"] >= 0, ">= 0 (0 returns no distribution)"),
    ]
    for name, ok, want in checks:
        if not ok.all():
            row = int(np.flatnonzero(~ok)[0])
            raise BatchError(f"{name}[{row}] = {h[name][row]!r} is invalid: it must be {want}")


@dataclass
class SampleOutput:
    tokens: Tensor  # [O] int64
    logprobs: Tensor | None  # [O] float32: log softmax (temperature 1, unfiltered) of the sampled token
    entropies: Tensor | None  # [O] float32: entropy (nats) of the temperature-1 distribution
    dist_ids: Tensor | None  # [O, max_dist_k] int64, -1 padded beyond each row's dist_k
    dist_probs: Tensor | None  # [O, max_dist_k] float32, 0 padded


# ---- counter-based noise ----------------------------------------------------------------------


def _mul32_(x: Tensor, c: int) -> Tensor:
    """x = (x * c) mod 2^32 in place, for x in [0, 2^32); every intermediate stays below 2^63."""
    if c < 2**31:
        return x.mul_(c).bitwise_and_(_M32)
    hi = (x * (c >> 16)).bitwise_and_(0xFFFF).bitwise_left_shift_(16)  # (x * c_hi mod 2^16) << 16
    return x.mul_(c & 0xFFFF).add_(hi).bitwise_and_(_M32)


def _mix32_(x: Tensor) -> Tensor:
    """lowbias32 in place (a good 32-bit avalanche mix); x >= 0 so >> is a logical shift."""
    x.bitwise_xor_(x >> 16)
    _mul32_(x, 0x7FEB352D)
    x.bitwise_xor_(x >> 15)
    _mul32_(x, 0x846CA68B)
    return x.bitwise_xor_(x >> 16)


def seeded_log_exponential(seed: Tensor, vocab_size: int) -> Tensor:
    """[O, V] float32 log(E) with E ~ Exp(1) a pure function of (seed[r], vocab index); seed [O] int64 >= 0.

    See the module docstring for the exact hash.
    """
    seed = seed.to(torch.int64)
    lo, hi = seed & _M32, (seed >> 32) & _M32
    ka = _mix32_(lo ^ _mix32_(hi ^ 0x9E3779B9))
    kb = _mix32_(hi ^ _mix32_(lo ^ 0x85EBCA6B))
    idx = torch.arange(vocab_size, device=seed.device, dtype=torch.int64)
    h = _mix32_(ka[:, None] ^ idx[None, :])  # [O, V]
    _mix32_(h.bitwise_xor_(kb[:, None]))
    u = h.bitwise_right_shift_(9).to(torch.float32).add_(0.5).mul_(2.0**-23)  # exact, in (0, 1)
    return u.log_().neg_().log_()


def _log_exponential(params: SamplingParams, shape: tuple[int, int], device: torch.device) -> Tensor:
    """[O, V] log(E), E ~ Exp(1): seeded rows from the hash, others from torch's global generator."""
    rows, V = shape
    if params.seeded_rows is None:
        # Seeded rows unknown on the host: hash every row; unseeded ones get a random key from the
        # global generator (so the stream still comes from it).
        keys = torch.randint(0, 2**62, (rows,), device=device, dtype=torch.int64)
        keys = torch.where(params.seed >= 0, params.seed.to(torch.int64), keys)
        return seeded_log_exponential(keys, V)
    e = torch.empty(rows, V, device=device, dtype=torch.float32).exponential_()
    # exponential_ may return exactly 0; -log(0) = inf would turn a masked -inf score into nan.
    log_e = e.clamp_min_(torch.finfo(torch.float32).tiny).log_()
    if params.seeded_rows.numel():  # host-side shape: hash only the S seeded rows ([S, V] work)
        seeds = params.seed.index_select(0, params.seeded_rows)
        log_e.index_copy_(0, params.seeded_rows, seeded_log_exponential(seeds, V))
    return log_e


# ---- filters ----------------------------------------------------------------------------------


def _keep_mask(x: Tensor, params: SamplingParams) -> Tensor:
    """[O, V] bool: tokens that survive top_k, then top_p, then min_p, for temperature-scaled x [O, V]."""
    _, V = x.shape
    top_k = params.top_k.to(torch.int64)
    k_off = (top_k <= 0) | (top_k >= V)
    k = torch.where(k_off, V, top_k)  # [O] in 1..V

    if params.any_top_p or params.max_top_k < 0:
        vals, order = x.sort(dim=-1, descending=True)  # [O, V]
        keep = vals >= vals.gather(1, (k - 1)[:, None])  # top_k (ties at the k-th value kept)
        probs = torch.softmax(vals.masked_fill(~keep, _NEG_INF), dim=-1)  # renormalized over top-k
        mass_before = probs.cumsum(dim=-1) - probs  # exclusive prefix mass
        top_p = params.top_p.to(torch.float32)[:, None]
        keep &= (mass_before < top_p) | (top_p >= 1)
        keep[:, 0] = True  # the top token always survives, even for tiny p
        keep = torch.zeros_like(keep).scatter_(1, order, keep)  # back to vocab order
    elif params.max_top_k > 0:
        kk = min(params.max_top_k, V)
        top = x.topk(kk, dim=-1).values  # [O, kk], descending
        kth = top.gather(1, (k.clamp(max=kk) - 1)[:, None])
        keep = x >= kth.masked_fill(k_off[:, None], _NEG_INF)
    else:
        keep = torch.ones_like(x, dtype=torch.bool)

    # p >= min_p * p_max  <=>  x - max(x) >= log(min_p); renormalizing after top_k/top_p does not
    # change this ratio and p_max's token always survives them, so it composes as the last filter.
    floor = x.amax(dim=-1, keepdim=True) + params.min_p.to(torch.float32).log()[:, None]  # log 0 = -inf
    return keep & (x >= floor)


# ---- entry point ------------------------------------------------------------------------------


def sample(logits: Tensor, params: SamplingParams, return_logprobs: bool) -> SampleOutput:
    """Sample one token per row of logits [O, V] under params; all work stays on logits.device."""
    if logits.dim() != 2:
        raise ValueError(f"logits must be [O, V], got shape {tuple(logits.shape)}")
    rows, V = logits.shape
    if params.temperature.shape != (rows,):
        raise ValueError(f"params have {params.temperature.shape[0]} rows but logits have {rows}")
    if V == 0:
        raise ValueError("logits have an empty vocabulary dimension")
    logits = logits.to(torch.float32)
    device = logits.device
    kd = params.max_dist_k

    if rows == 0:
        empty_f = torch.empty(0, dtype=torch.float32, device=device)
        return SampleOutput(
            tokens=torch.empty(0, dtype=torch.int64, device=device),
            logprobs=empty_f if return_logprobs else None,
            entropies=empty_f if return_logprobs else None,
            dist_ids=torch.empty(0, kd, dtype=torch.int64, device=device) if kd > 0 else None,
            dist_probs=torch.empty(0, kd, dtype=torch.float32, device=device) if kd > 0 else None,
        )

    tokens = logits.argmax(dim=-1)  # [rows]
    scaled = None
    if not params.all_greedy or kd > 0:
        temp = params.temperature.to(torch.float32)
        greedy = (temp < GREEDY_TEMPERATURE) | (params.top_k == 1)
        scaled = logits / torch.where(greedy, 1.0, temp)[:, None]  # [rows, V]; greedy rows at temperature 1
    if not params.all_greedy:
        keep = _keep_mask(scaled, params)
        scores = scaled.masked_fill(~keep, _NEG_INF).sub_(_log_exponential(params, (rows, V), device))
        tokens = torch.where(greedy, tokens, scores.argmax(dim=-1))

    logprobs = entropies = None
    if return_logprobs:
        logp = torch.log_softmax(logits, dim=-1)  # [O, V], temperature 1, unfiltered
        logprobs = logp.gather(1, tokens[:, None]).squeeze(1)
        p = logp.exp()
        entropies = -torch.where(p > 0, p * logp, 0.0).sum(dim=-1)  # 0 * -inf counts as 0

    dist_ids = dist_probs = None
    if kd > 0:
        kt = min(kd, V)  # a row cannot have more than V tokens; the rest stays padding
        vals, ids = scaled.topk(kt, dim=-1)  # [O, kt]
        probs = (vals - scaled.logsumexp(dim=-1, keepdim=True)).exp()
        if kt < kd:
            ids = torch.nn.functional.pad(ids, (0, kd - kt), value=-1)
            probs = torch.nn.functional.pad(probs, (0, kd - kt), value=0.0)
        valid = torch.arange(kd, device=device)[None, :] < params.dist_k[:, None]  # [O, kd]
        dist_ids = ids.masked_fill(~valid, -1)
        dist_probs = probs.masked_fill(~valid, 0.0)

    return SampleOutput(tokens, logprobs, entropies, dist_ids, dist_probs)
