"""FlashInfer backend, host side (no GPU, no flashinfer import): the plan arguments it builds, checked
against FlashInfer 0.6.3's plan signatures (copied below) and against FlashInfer's mask/causal conventions.

The kernels themselves are checked on CUDA by tests/test_gpu.py.
"""

from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch

from pie.attention.base import AttentionBackend, AttentionMetadata
from pie.attention.flashinfer_backend import (
    FlashInferBackend,
    decode_plan_args,
    decode_uses_tensor_cores,
    params_unsupported_reason,
    prefill_plan_args,
    unsupported_reason,
)
from pie.drivers.protocol import make_batch
from pie.errors import DriverError


# ---- FlashInfer 0.6.3 plan signatures (flashinfer/decode.py, flashinfer/prefill.py), bodies omitted ----
def fi_decode_plan(
    indptr, indices, last_page_len, num_qo_heads, num_kv_heads, head_dim, page_size,
    pos_encoding_mode="NONE", window_left=-1, logits_soft_cap=None, q_data_type="float16",
    kv_data_type=None, o_data_type=None, data_type=None, sm_scale=None, rope_scale=None, rope_theta=None,
    non_blocking=True, block_tables=None, seq_lens=None, fixed_split_size=None, disable_split_kv=False,
):  # fmt: skip
    pass


def fi_prefill_plan(
    qo_indptr, paged_kv_indptr, paged_kv_indices, paged_kv_last_page_len, num_qo_heads, num_kv_heads,
    head_dim_qk, page_size, head_dim_vo=None, custom_mask=None, packed_custom_mask=None, causal=False,
    pos_encoding_mode="NONE", use_fp16_qk_reduction=False, sm_scale=None, window_left=-1,
    logits_soft_cap=None, rope_scale=None, rope_theta=None, q_data_type="float16", kv_data_type=None,
    o_data_type=None, non_blocking=True, prefix_len_ptr=None, token_pos_in_items_ptr=None,
    token_pos_in_items_len=0, max_item_len_ptr=None, seq_lens=None, seq_lens_q=None, block_tables=None,
    max_token_per_sequence=None, max_sequence_kv=None, fixed_split_size=None, disable_split_kv=False,
):  # fmt: skip
    pass


def fi_page_mask_indptr(qo_indptr, paged_kv_indptr, paged_kv_last_page_len, page_size):
    """flashinfer.prefill._compute_page_mask_indptr (0.6.3): where each request's mask bits start."""
    out = torch.empty_like(qo_indptr)
    out[0] = 0
    out[1:] = torch.cumsum(
        (qo_indptr[1:] - qo_indptr[:-1])
        * ((paged_kv_indptr[1:] - paged_kv_indptr[:-1] - 1) * page_size + paged_kv_last_page_len),
        0,
    )
    return out


class _Params(AttentionBackend):
    """The attribute set plan-argument builders read (the real backend needs CUDA to construct)."""

    def plan(self, meta):  # pragma: no cover - not used
        raise NotImplementedError

    def run(self, q, kv_cache, layer_idx):  # pragma: no cover - not used
        raise NotImplementedError


PS = 4
B = _Params(
    num_qo_heads=8,
    num_kv_heads=2,
    head_dim=64,
    page_size=PS,
    dtype=torch.bfloat16,
    device=torch.device("cpu"),
)


def _req(pages, kv_len, n, mask=None):
    r = dict(
        token_ids=[1] * n,
        positions=list(range(kv_len - n, kv_len)),
        pages=pages,
        last_page_len=kv_len - (len(pages) - 1) * PS,
    )
    if mask is not None:
        r["mask"] = mask
    return r


def _meta(reqs):
    return AttentionMetadata.from_batch(make_batch(reqs, PS), PS, torch.device("cpu"))


def test_decode_args_bind_to_the_0_6_3_signature_and_use_host_indptrs():
    meta = _meta([_req([3, 7], 6, 1), _req([0], 1, 1), _req([9, 2, 5], 12, 1)])
    assert meta.is_decode
    args, kwargs = decode_plan_args(B, meta)
    bound = inspect.signature(fi_decode_plan).bind(*args, **kwargs).arguments
    assert bound["indptr"].device.type == "cpu" and bound["indptr"].dtype == torch.int32
    assert bound["indptr"].tolist() == [0, 2, 3, 6]
    assert bound["last_page_len"].tolist() == [2, 1, 4]
    assert bound["indices"] is meta.kv_page_indices  # the device copy: plan only moves it to the device
    assert (bound["num_qo_heads"], bound["num_kv_heads"], bound["head_dim"], bound["page_size"]) == (
        8,
        2,
        64,
        PS,
    )
    assert bound["pos_encoding_mode"] == "NONE"  # RoPE is applied by the model
    assert bound["q_data_type"] == bound["kv_data_type"] == torch.bfloat16
    assert bound["sm_scale"] == pytest.approx(64**-0.5)


def test_causal_prefill_args_use_host_indptrs_and_causal_mode():
    meta = _meta([_req([1, 2], 7, 7), _req([4], 3, 1), _req([5, 6, 8], 10, 4)])
    assert not meta.is_decode and meta.mask is None
    args, kwargs = prefill_plan_args(B, meta)
    bound = inspect.signature(fi_prefill_plan).bind(*args, **kwargs).arguments
    assert bound["causal"] is True and bound["custom_mask"] is None
    for name, want in (
        ("qo_indptr", [0, 7, 8, 12]),
        ("paged_kv_indptr", [0, 2, 3, 6]),
        ("paged_kv_last_page_len", [3, 3, 2]),
    ):
        assert bound[name].device.type == "cpu" and bound[name].dtype == torch.int32
        assert bound[name].tolist() == want
    assert bound["paged_kv_indices"] is meta.kv_page_indices
    assert bound["head_dim_qk"] == 64 and "head_dim_vo" not in bound  # vo defaults to qk
    assert bound["q_data_type"] == torch.bfloat16 and bound["pos_encoding_mode"] == "NONE"


def test_masked_prefill_passes_pie_mask_unchanged_with_device_indptrs():
    rng = np.random.default_rng(0)
    m0 = rng.random((3, 6)) < 0.5
    m0[:, 0] = True
    reqs = [_req([1, 2], 6, 3, mask=m0), _req([4], 1, 1), _req([5, 6, 8], 9, 2)]  # causal default for 2 and 3
    meta = _meta(reqs)
    args, kwargs = prefill_plan_args(B, meta)
    bound = inspect.signature(fi_prefill_plan).bind(*args, **kwargs).arguments
    assert bound["custom_mask"] is meta.mask and bound["causal"] is False
    # FlashInfer packs the mask on the device with these indptrs, so they are meta's device tensors
    assert bound["qo_indptr"] is meta.qo_indptr
    assert bound["paged_kv_indptr"] is meta.kv_page_indptr
    assert bound["paged_kv_last_page_len"] is meta.kv_last_page_len
    # FlashInfer's per-request mask offsets equal pie's mask_indptr: the flat layouts agree
    fi = fi_page_mask_indptr(
        bound["qo_indptr"], bound["paged_kv_indptr"], bound["paged_kv_last_page_len"], PS
    )
    assert fi.tolist() == meta.mask_indptr.tolist()
    assert torch.equal(meta.mask[: m0.size], torch.from_numpy(m0.reshape(-1)))


@pytest.mark.parametrize("n,kv", [(1, 1), (3, 3), (2, 9), (5, 7)])
def test_pie_causal_rule_is_flashinfer_bottom_right_causal(n, kv):
    # make_batch's default mask for a request is pie's causal-over-slots rule; FlashInfer's causal mode
    # lets query i (of n) see kv slot j iff j <= i + kv - n.
    pages = list(range(-(-kv // PS)))
    other = _req([20], 2, 2, mask=np.ones((2, 2), bool))  # forces masks into the batch
    batch = make_batch([_req(pages, kv, n), other], PS)
    pie_mask = batch.mask[: n * kv].reshape(n, kv)
    i, j = np.mgrid[0:n, 0:kv]
    assert np.array_equal(pie_mask, j <= i + kv - n)


def test_unsupported_shapes_and_dtypes_have_reasons():
    assert unsupported_reason(16, 8, 128, torch.bfloat16) is None
    assert unsupported_reason(32, 8, 64, torch.float16) is None
    assert "float32" in unsupported_reason(16, 8, 128, torch.float32)
    assert "head_dim" in unsupported_reason(4, 2, 16, torch.bfloat16)
    assert "multiple" in unsupported_reason(6, 4, 64, torch.bfloat16)


def test_tensor_cores_from_group_size_four():
    # the CUDA-core decode kernel is built for group sizes 1, 2, 3, 4, 8 only
    assert [decode_uses_tensor_cores(g * 2, 2) for g in (1, 2, 3, 4, 5, 8, 16)] == [
        False,
        False,
        False,
        True,
        True,
        True,
        True,
    ]


def test_backend_refuses_cpu_with_a_hint():
    with pytest.raises(DriverError, match="CUDA only.*torch"):
        FlashInferBackend(4, 2, 64, 16, torch.bfloat16, torch.device("cpu"))


def test_plan_dispatches_to_one_wrapper_per_batch():
    """plan() picks the decode wrapper for pure decode batches and the prefill wrapper otherwise,
    and run() uses the one planned (wrappers replaced by recorders with the 0.6.3 signatures)."""

    class Recorder:
        def __init__(self, sig):
            self.sig, self.calls, self.runs = inspect.signature(sig), [], 0

        def plan(self, *a, **k):
            self.calls.append(self.sig.bind(*a, **k).arguments)

        def run(self, q, kv):
            self.runs += 1
            return q.clone()

    be = object.__new__(FlashInferBackend)
    AttentionBackend.__init__(be, 8, 2, 64, PS, torch.bfloat16, torch.device("cpu"))
    dec, pre = Recorder(fi_decode_plan), Recorder(fi_prefill_plan)
    be._wrappers, be._active, be._fallback, be._sink_wrappers = {be.default_params: (dec, pre)}, {}, None, {}
    be._planned = False
    with pytest.raises(RuntimeError, match="before plan"):
        be.run(torch.zeros(1, 8, 64), torch.zeros(1), 0)
    be.plan(_meta([_req([0], 2, 1), _req([1], 3, 1)]))
    q = torch.randn(2, 8, 64, dtype=torch.float32)
    out = be.run(q, torch.zeros(1), 0)
    assert dec.runs == 1 and pre.runs == 0
    assert out.dtype == torch.float32 and torch.allclose(
        out, q.to(torch.bfloat16).float()
    )  # cast in, back out
    be.plan(_meta([_req([0], 2, 2)]))
    be.run(torch.randn(2, 8, 64, dtype=torch.bfloat16), torch.zeros(1), 0)
    assert pre.runs == 1 and len(pre.calls) == 1 and pre.calls[0]["causal"] is True


def test_plan_once_per_attention_kind_with_window_softcap_and_scale():
    """A model with sliding and full layers (Gemma 2): each batch plans each kind's wrapper once, with its
    window_left / logits_soft_cap / sm_scale; each layer runs on its kind's wrapper; a kind FlashInfer cannot
    run (sinks) goes to the torch fallback."""
    from pie.attention.base import AttentionParams

    class Recorder:
        def __init__(self, sig):
            self.sig, self.calls, self.runs = inspect.signature(sig), [], 0

        def plan(self, *a, **k):
            self.calls.append(self.sig.bind(*a, **k).arguments)

        def run(self, q, kv):
            self.runs += 1
            return q.clone()

    class Fallback:
        planned, runs = 0, []

        def plan(self, meta):
            Fallback.planned += 1

        def run(self, q, kv, layer, p, sinks):
            Fallback.runs.append((layer, p, sinks))
            return q

    full = AttentionParams(8, 2, 64, 0.2, logits_soft_cap=50.0)
    sliding = AttentionParams(8, 2, 64, 0.2, window_left=4095, logits_soft_cap=50.0)
    sinks = AttentionParams(8, 2, 64, 0.2, has_sinks=True)
    be = object.__new__(FlashInferBackend)
    AttentionBackend.__init__(be, 8, 2, 64, PS, torch.bfloat16, torch.device("cpu"), 0.2, [sliding, full])
    rec = {p: (Recorder(fi_decode_plan), Recorder(fi_prefill_plan)) for p in (sliding, full)}
    be._wrappers, be._active, be._fallback, be._sink_wrappers = rec, {}, Fallback(), {}
    be.plan(_meta([_req([0], 2, 2), _req([1], 3, 1)]))  # mixed: prefill wrappers
    for p in (sliding, full):
        dec, pre = rec[p]
        assert not dec.calls and len(pre.calls) == 1
        call = pre.calls[0]
        assert call["sm_scale"] == 0.2 and call["logits_soft_cap"] == 50.0
        assert call.get("window_left", -1) == p.window_left  # unset = 0.6.3 default -1
    be.plan(_meta([_req([0], 2, 1)]))  # decode
    assert rec[sliding][0].calls[0]["window_left"] == 4095 and "window_left" not in rec[full][0].calls[0]
    q = torch.randn(1, 8, 64, dtype=torch.bfloat16)
    for layer, p in enumerate((sliding, full, sliding)):
        be.run(q, torch.zeros(1), layer, p)
    assert rec[sliding][0].runs == 2 and rec[full][0].runs == 1
    s = torch.zeros(8)
    be.run(q, torch.zeros(1), 3, sinks, s)
    assert Fallback.planned == 2 and Fallback.runs == [(3, sinks, s)]


def test_sink_kinds_run_on_the_sink_wrapper_for_causal_batches_and_fall_back_when_masked():
    """GPT-OSS: a sink kind plans FlashInfer's attention-sink wrapper (a prefill-style wrapper, also for
    decode) with its window; run passes the sink logits in fp32 and the softmax scale; a batch with a custom
    mask (which that wrapper cannot take) runs the kind on the torch fallback."""
    from pie.attention.base import AttentionParams

    class SinkRecorder:
        def __init__(self):
            self.sig, self.calls, self.runs = inspect.signature(fi_prefill_plan), [], []

        def plan(self, *a, **k):
            self.calls.append(self.sig.bind(*a, **k).arguments)

        def run(self, q, kv, *extra):
            self.runs.append(extra)
            return q.clone()

    class Fallback:
        runs: list = []

        def plan(self, meta):
            pass

        def run(self, q, kv, layer, p, sinks):
            Fallback.runs.append(layer)
            return q

    sliding = AttentionParams(8, 2, 64, 0.125, window_left=127, has_sinks=True)
    assert params_unsupported_reason(sliding, torch.bfloat16) is None
    capped = AttentionParams(8, 2, 64, 0.125, logits_soft_cap=30.0, has_sinks=True)
    assert "soft-cap" in params_unsupported_reason(capped, torch.bfloat16)
    be = object.__new__(FlashInferBackend)
    AttentionBackend.__init__(be, 8, 2, 64, PS, torch.bfloat16, torch.device("cpu"), 0.125, [sliding])
    sink = SinkRecorder()
    be._wrappers, be._active, be._fallback, be._sink_wrappers = {}, {}, Fallback(), {sliding: sink}
    q, s = torch.randn(1, 8, 64, dtype=torch.float32), torch.randn(8, dtype=torch.bfloat16)
    for meta in (_meta([_req([0], 2, 1)]), _meta([_req([0], 3, 2)])):  # decode, prefill
        be.plan(meta)
        assert sink.calls[-1]["window_left"] == 127 and sink.calls[-1]["causal"] is True
        out = be.run(q, torch.zeros(1), 0, sliding, s)
        assert out.dtype == torch.float32  # back in q's dtype
        sinks, scale = sink.runs[-1]
        assert sinks.dtype == torch.float32 and torch.equal(sinks, s.float()) and scale == 0.125
    be.plan(_meta([_req([0], 3, 2, mask=[True, False, False, True, True, False])]))
    be.run(q, torch.zeros(1), 5, sliding, s)
    assert Fallback.runs == [5] and len(sink.runs) == 2
