"""Quantized linear layers: weights stored in 8 or 4 bits, quantized as the checkpoint loads (the
quantizers themselves: pie.layers.quant_formats).

Formats (config `weight_dtype`; cuda_native's `runtime_quant = "fp8"` is `float8`):
  int8    symmetric per output channel:  W[o, :] ~= q[o, :] * s[o],          q int8
  int4    asymmetric per group of 128 inputs (tinygemm's convention, which torch's int4 kernels take):
          W[o, g*128 + j] ~= (q - 8) * s[o, g] + z[o, g],                    q in 0..15
  float8  e4m3 per output channel:       W[o, :] ~= q[o, :] * s[o],          q float8_e4m3fn; activations
          are quantized per token at run time (W8A8), so the GEMM itself runs in FP8
  fp8_block  an FP8 checkpoint kept as shipped: e4m3 weights with one scale per 128 x 128 block
          (`weight_scale_inv`, Mistral 3 / Ministral / DeepSeek style); activations per token and 128 columns

Kernels (maintained ones, all in torch; chosen once per device by `kernel_for`, which runs each on a small
random problem and compares it with the dequantized reference before trusting it):
  int8    torch._weight_int8pack_mm (weight-only; CPU), else torch._int_mm (cuBLAS int8 GEMM: activations
          quantized to int8 per token, W8A8; CUDA, where torch 2.x has no int8 weight-only kernel)
  int4    torch._weight_int4pack_mm (CUDA, bf16, sm80+) / torch._weight_int4pack_mm_for_cpu (CPU)
  float8  torch._scaled_mm with row-wise scales (CUDA sm89+; torch's CPU build has it too)
  fp8_block  torch.nn.functional.scaled_mm with BlockWise1x128 x BlockWise128x128 scales (CUDA sm90)
Where the kernel is missing or fails its check, the layer dequantizes its weight for each call and runs a
plain matmul ("dequant"): correct, and the stored weights still take 1/2 to 1/4 of the memory, but slower
than the full-precision model. `QuantLinear.kernel` says which path a layer took.

Loading: `quantize_model_(model, fmt)` swaps the projections (`*_proj`: qkv/o/gate_up/down, not the routers,
embeddings or LM head) for QuantLinear on the meta device, before the model is materialized, so the full
precision weights never exist as a whole. The weight loader (models/weights.py) hands each checkpoint tensor to
`module.load_weight(tensor, shard_id, scale)` (any module with that method), which quantizes the rows it covers (fused shards are rows too);
`finalize_quantized_(model)` then repacks int4 into its kernel layout and picks each layer's kernel.

Tensor parallelism: the parallel linears (pie.layers.parallel) become QuantLinears that keep the rank's
layout; each rank quantizes only its shard (column-parallel: its output rows, whose per-channel scales are the
whole matrix's; row-parallel: its input columns, all-reduced after the quantized matmul). `split_problem` says
when a split would cut int4's groups of 128 inputs; the config (drivers/quantization.py) and
`quantize_model_` refuse it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from pie.distributed import all_reduce, tp_rank, tp_size
from pie.layers.parallel import (
    ColumnParallelMerged,
    RowParallelLinear,
    Source,
    TensorSource,
    column_pieces,
    copy_pieces,
    whole,
)
from pie.layers.quant_formats import (
    FP8,
    FP8_BLOCK,
    INT4_GROUP,
    TINY,
    dequantize_fp8_blocks,
    dequantized_input,
    quantize_fp8,
    quantize_fp8_blocks,
    quantize_fp8_groups,
    quantize_fp8_rows,
    quantize_int4,
    quantize_int8,
    unpack_int4,
)

log = logging.getLogger(__name__)

FORMATS = ("int8", "int4", "float8")  # what weight_dtype can ask for; fp8_block comes from checkpoints


# ---- the layer -----------------------------------------------------------------------------------------


class QuantLinear(nn.Module):
    """y = x @ dequant(W).T (+ b), with W stored quantized; a drop-in for nn.Linear / MergedLinear / QKVLinear
    (keeps their `shard_slices` and `split_sizes`, so the loader and the attention layer see no difference).

    Parameters: `weight` (codes; int8 [O, I], e4m3 [O, I], or int4 as uint8 [O, I // 2] until finalize packs
    it), `bias` (activation dtype). Buffers: `weight_scale` (fp32 [O], [O, G] or the checkpoint's blocks)
    and, for int4, `weight_zero` (fp32 [O, G]).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool,
        fmt: str,
        dtype: torch.dtype,
        shard_slices: dict[str | int, tuple[int, int]] | None = None,
        split_sizes: list[int] | None = None,
    ) -> None:
        super().__init__()
        if fmt not in (*FORMATS, "fp8_block"):
            raise ValueError(f"unknown quantized format {fmt!r}; use one of {', '.join(FORMATS)}")
        self.in_features, self.out_features, self.fmt, self.act_dtype = in_features, out_features, fmt, dtype
        self.shard_slices = dict(shard_slices or {})
        if split_sizes is not None:
            self.split_sizes = list(split_sizes)
        n_out, n_in = out_features, in_features
        self.group = INT4_GROUP if fmt == "int4" else 0
        if fmt == "int8":
            w, s = torch.empty(n_out, n_in, dtype=torch.int8), torch.empty(n_out)
        elif fmt == "float8":
            w, s = torch.empty(n_out, n_in, dtype=FP8), torch.empty(n_out)
        elif fmt == "fp8_block":
            w, s = (
                torch.empty(n_out, n_in, dtype=FP8),
                torch.empty(-(-n_out // FP8_BLOCK), -(-n_in // FP8_BLOCK)),
            )
        else:
            w, s = torch.empty(n_out, n_in // 2, dtype=torch.uint8), torch.empty(n_out, n_in // INT4_GROUP)
            self.register_buffer("weight_zero", torch.empty(n_out, n_in // INT4_GROUP), persistent=False)
        self.weight = nn.Parameter(w, requires_grad=False)
        self.register_buffer("weight_scale", s, persistent=False)
        self.bias = nn.Parameter(torch.empty(n_out, dtype=dtype), requires_grad=False) if bias else None
        # set by finalize(): a key of _RUN ("int8pack", "int_mm", "int4pack", "scaled_mm", ... or "dequant")
        self.kernel = "unfinalized"
        # tensor parallelism (pie.layers.parallel), set by from_linear: a column-parallel layer's
        # {shard_id: (full rows, this rank's first row, rows)}; a row-parallel one's (full inputs, first input)
        self.parts: dict[str | int, tuple[int, int, int]] | None = None
        self.row_parallel: tuple[int, int] | None = None
        self._packed: torch.Tensor | None = None  # int4 in the kernel's tiled layout
        self._scales_zeros: torch.Tensor | None = None  # int4: [G, O, 2] (scale, zero) in the kernel's dtype

    @classmethod
    def from_linear(cls, linear: nn.Linear, fmt: str) -> QuantLinear:
        """The quantized twin of an (unloaded, usually meta) nn.Linear, MergedLinear or parallel linear
        (pie.layers.parallel): it keeps the rank's slice of the layout (`parts` of a column-parallel one, the
        input columns of a row-parallel one) and the attributes the layers read (`num_heads`, ...)."""
        m = cls(
            linear.in_features,
            linear.out_features,
            linear.bias is not None,
            fmt,
            linear.weight.dtype,
            getattr(linear, "shard_slices", None),
            getattr(linear, "split_sizes", None),
        )
        if isinstance(linear, ColumnParallelMerged):
            m.parts = dict(linear.parts)
        if isinstance(linear, RowParallelLinear):
            m.row_parallel = (linear.full_in, linear.in_start)
        for attr in ("num_heads", "num_kv_heads", "local_intermediate"):
            if hasattr(linear, attr):
                setattr(m, attr, getattr(linear, attr))
        return m

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, fmt={self.fmt}, kernel={self.kernel}"

    # ---- loading (rows of a shard at a time) ----

    def rows(self, shard_id: str | int | None, n: int) -> tuple[int, int]:
        """(offset, size) of the output rows a tensor of n rows fills (ValueError on a size mismatch)."""
        if shard_id is None:
            if n != self.out_features:
                raise ValueError(f"expected {self.out_features} rows, got {n}")
            return 0, n
        offset, size = self.shard_slices[shard_id]
        if n != size:
            raise ValueError(f"shard {shard_id!r}: expected {size} rows, got {n}")
        return offset, size

    def load_shard(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: str | int) -> None:
        """MergedLinear's interface: the bias rows of one shard (weights go through load_weight)."""
        if param is self.weight:
            self.load_weight(loaded, shard_id)
            return
        offset, size = self.rows(shard_id, loaded.shape[0])
        param.data.narrow(0, offset, size).copy_(loaded)

    def load_param(self, name: str, param: nn.Parameter, src: Source, shard_id: str | int | None) -> None:
        """The parallel layers' interface (models/weights.py): this rank's slice of a checkpoint tensor."""
        if name == "weight":
            self.load_weight(src, shard_id)
        elif self.parts is not None:  # column-parallel bias: this rank's rows of each part
            full, pieces = column_pieces(self.parts, self.shard_slices, shard_id)
            copy_pieces(param.data, src, 0, full, pieces, f"{name} shard {shard_id!r}")
        elif shard_id is None:  # row-parallel (the whole bias on every rank, added on rank 0) or plain
            whole(src, param.data, name)
        else:
            self.load_shard(param, src.full(), shard_id)

    def _row_pieces(self, shard_id: str | int | None, n: int) -> list[tuple[int, int, int]]:
        """[(dst row, src row, rows)]: where the rows of a checkpoint tensor of n rows go on this rank."""
        if self.parts is None:
            offset, size = self.rows(shard_id, n)
            return [(offset, 0, size)]
        full, pieces = column_pieces(self.parts, self.shard_slices, shard_id)
        if n != full:
            raise ValueError(f"shard {shard_id!r}: expected {full} rows, got {n}")
        return pieces

    def load_weight(
        self,
        loaded: torch.Tensor | Source,
        shard_id: str | int | None = None,
        scale: torch.Tensor | None = None,
    ) -> None:
        """Quantize one checkpoint weight [rows, I] (or shard) into its rows: at tensor_parallel_size > 1 only
        this rank's rows (column-parallel) or input columns (row-parallel) of it. `scale`: the FP8 checkpoint's
        scale when `loaded` is FP8 (its 128 x 128 blocks kept as is for fp8_block when this rank's slice
        starts and ends on block edges; otherwise dequantized first)."""
        src = TensorSource(loaded) if isinstance(loaded, torch.Tensor) else loaded
        n_in, in_start = self.row_parallel or (self.in_features, 0)
        if len(src.shape) != 2 or src.shape[1] != n_in:
            raise ValueError(f"expected shape [*, {n_in}], got {tuple(src.shape)}")
        cols = (in_start, self.in_features)
        for dst, start, size in self._row_pieces(shard_id, src.shape[0]):
            w, s = _slice(src, scale, (start, size), cols, self.fmt == "fp8_block")
            self._quantize_rows(dst, w, s)

    def _quantize_rows(self, offset: int, loaded: torch.Tensor, scale: torch.Tensor | None) -> None:
        """Rows [offset, offset + rows) from one checkpoint slice [rows, I] (FP8 with `scale`, or not)."""
        size = loaded.shape[0]
        if self.fmt == "fp8_block":
            rows = -(-size // FP8_BLOCK)
            want = (rows, self.weight_scale.shape[1])
            if loaded.dtype != FP8 or scale is None or tuple(scale.shape) != want:  # not shipped as blocks
                loaded, scale = quantize_fp8_blocks(dequantized_input(loaded, scale))
            self.weight.data.narrow(0, offset, size).copy_(loaded)
            self.weight_scale.narrow(0, offset // FP8_BLOCK, rows).copy_(scale)
            return
        loaded = dequantized_input(loaded, scale)
        if self.fmt == "int8":
            q, s = quantize_int8(loaded)
        elif self.fmt == "float8":
            q, s = quantize_fp8(loaded)
        else:
            q, s, z = quantize_int4(loaded, self.group)
            self.weight_zero.narrow(0, offset, size).copy_(z)
        self.weight.data.narrow(0, offset, size).copy_(q)
        self.weight_scale.narrow(0, offset, size).copy_(s)

    def quantize_from_(self, w: torch.Tensor) -> None:
        """Fill from a full-precision weight [O, I] (random benchmark weights, tests)."""
        self.load_weight(w)

    # ---- math ----

    def dequantized(self) -> torch.Tensor:
        """The weight the layer stands for, fp32 [O, I] (the reference every kernel is checked against)."""
        if self.fmt == "fp8_block":
            return dequantize_fp8_blocks(self.weight, self.weight_scale)
        if self.fmt in ("int8", "float8"):
            return self.weight.float() * self.weight_scale[:, None]
        if self._packed is not None:
            raise RuntimeError(
                "int4 codes were repacked for the kernel; dequantized() is available before finalize"
            )
        n_out, n_in = self.out_features, self.in_features
        q = unpack_int4(self.weight).float().view(n_out, n_in // self.group, self.group)
        return ((q - 8.0) * self.weight_scale[..., None] + self.weight_zero[..., None]).view(n_out, n_in)

    def finalize(self) -> None:
        """After loading: pick the kernel for this device (int4: pack for it) and drop what it does not need."""
        self.kernel = kernel_for(self.fmt, self.weight.device, self.act_dtype)
        if self.fmt == "int4" and self.kernel == "int4pack":
            self._packed, self._scales_zeros = _int4_pack(
                self.weight, self.weight_scale, self.weight_zero, self.act_dtype
            )
            # the kernel reads only the packed copy and its [G, O, 2] scales: drop the codes (as many bytes as
            # the packed copy) and the fp32 scales and zeros
            empty = torch.empty(0, device=self.weight.device)
            self.weight.data = empty.to(torch.uint8)
            self.weight_scale, self.weight_zero = empty, empty
        elif self.kernel == "int8pack":
            self.weight_scale = self.weight_scale.to(self.act_dtype)  # the kernel takes them in x's dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [..., I] -> [..., O] in x's dtype."""
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)
        y = _RUN[self.kernel](self, x2)
        reduce = self.row_parallel is not None and tp_size() > 1
        if self.bias is not None and (not reduce or tp_rank() == 0):  # a row-parallel bias joins one sum
            y = y + self.bias
        if reduce:  # RowParallelLinear's all-reduce, after the quantized matmul of this rank's inputs
            y = all_reduce(y)
        return y.reshape(*shape[:-1], self.out_features)


def _slice(
    src: Source,
    scale: torch.Tensor | None,
    rows: tuple[int, int],
    cols: tuple[int, int],
    keep_blocks: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """This rank's (start, size) rows x cols of a checkpoint weight [R, C], and the scale to quantize it with.

    Full precision (scale None): only the slice is read. FP8 (scale given, tensor already in memory): the
    whole tensor and scale when the slice is all of it; the codes and their 128 x 128 scale blocks when
    `keep_blocks` and the slice starts and ends on block edges (the blocks are kept as shipped); otherwise
    the slice dequantized (scale None), since a block cut by a rank boundary has no scale of its own."""
    (r0, nr), (c0, nc) = rows, cols
    n_rows, n_cols = src.shape
    whole_rows, whole_cols = (r0, nr) == (0, n_rows), (c0, nc) == (0, n_cols)
    if scale is None:
        if whole_cols:
            return src.narrow(0, r0, nr), None
        w = src.narrow(1, c0, nc) if whole_rows else src.narrow(0, r0, nr)[:, c0 : c0 + nc]
        return w.contiguous(), None
    w = src.full()
    if whole_rows and whole_cols:
        return w, scale
    blocks = (-(-n_rows // FP8_BLOCK), -(-n_cols // FP8_BLOCK))
    if (
        keep_blocks
        and tuple(scale.shape) == blocks
        and _on_edges(r0, nr, n_rows)
        and _on_edges(c0, nc, n_cols)
    ):
        b_rows = slice(r0 // FP8_BLOCK, -(-(r0 + nr) // FP8_BLOCK))
        b_cols = slice(c0 // FP8_BLOCK, -(-(c0 + nc) // FP8_BLOCK))
        return w[r0 : r0 + nr, c0 : c0 + nc].contiguous(), scale[b_rows, b_cols].contiguous()
    return dequantized_input(w, scale)[r0 : r0 + nr, c0 : c0 + nc].contiguous(), None


def _on_edges(start: int, size: int, full: int) -> bool:
    """Whether [start, start + size) of a dim of `full` covers whole FP8 blocks (the last may be partial)."""
    return start % FP8_BLOCK == 0 and (size % FP8_BLOCK == 0 or start + size == full)


def _int4_pack(codes: torch.Tensor, s: torch.Tensor, z: torch.Tensor, dtype: torch.dtype):
    """codes uint8 [O, I // 2], s / z [O, G] -> (packed weight, [G, O, 2] scales and zeros) for the device's
    int4 kernel (CUDA: innerKTiles 8 when I allows, as gpt-fast; CPU: the CPU packer's layout)."""
    sz = torch.stack([s, z], dim=-1).transpose(0, 1).contiguous().to(dtype)  # [G, O, 2]
    if codes.device.type == "cuda":
        n_in = codes.shape[1] * 2
        tiles = next(t for t in (8, 4, 2) if n_in % (t * 16) == 0)
        return torch._convert_weight_to_int4pack(codes.contiguous(), tiles), sz
    return torch._convert_weight_to_int4pack_for_cpu(unpack_int4(codes).contiguous(), 1), sz


# ---- the kernels (x2: [M, I] -> [M, O] in x2's dtype) --------------------------------------------------


def _run_dequant(m: QuantLinear, x: torch.Tensor) -> torch.Tensor:
    # no kernel on this device: a transient full-precision copy of this one weight per call
    return F.linear(x, m.dequantized().to(x.dtype))


def _run_int8pack(m: QuantLinear, x: torch.Tensor) -> torch.Tensor:
    return torch._weight_int8pack_mm(x.contiguous(), m.weight, m.weight_scale.to(x.dtype))  # cast: a no-op


def _run_int_mm(m: QuantLinear, x: torch.Tensor) -> torch.Tensor:
    # W8A8: x quantized to int8 per token, torch._int_mm (cuBLAS int8 GEMM, int32 accumulate), both scales
    # applied to the output. cuBLAS wants more than 16 rows: small batches are zero-padded to 32.
    M = x.shape[0]
    xp = F.pad(x, (0, 0, 0, 32 - M)) if M <= 16 else x
    sx = (xp.abs().amax(dim=-1, keepdim=True).float() / 127.0).clamp(min=TINY)  # [M', 1]
    xq = (xp.float() / sx).round().clamp(-127, 127).to(torch.int8)
    y = torch._int_mm(xq, m.weight.t())  # [M', O] int32
    return (y[:M].float() * sx[:M] * m.weight_scale.float()).to(x.dtype)


def _run_int4pack(m: QuantLinear, x: torch.Tensor) -> torch.Tensor:
    x = x.contiguous()
    if x.device.type == "cuda":
        return torch._weight_int4pack_mm(x, m._packed, m.group, m._scales_zeros)
    return torch._weight_int4pack_mm_for_cpu(x, m._packed, m.group, m._scales_zeros)


def _run_scaled_mm(m: QuantLinear, x: torch.Tensor) -> torch.Tensor:
    xq, sx = quantize_fp8_rows(x)  # [M, I] e4m3, [M, 1]
    # mat_b must be column-major: the row-major [O, I] weight transposed is exactly that
    return torch._scaled_mm(
        xq, m.weight.t(), scale_a=sx, scale_b=m.weight_scale.view(1, -1), out_dtype=x.dtype
    )


def _run_block_scaled_mm(m: QuantLinear, x: torch.Tensor) -> torch.Tensor:
    M = x.shape[0]
    xp = F.pad(x, (0, 0, 0, -M % 4)) if M % 4 else x  # cuBLAS wants the token count a multiple of 4
    xq, sx = quantize_fp8_groups(xp)  # [M', I], [M', I / 128]
    sw = m.weight_scale
    if sw.shape[1] % 4:  # K blocks padded to a multiple of 4 (cuBLAS's scale layout)
        sw = F.pad(sw, (0, -sw.shape[1] % 4))
    y = F.scaled_mm(
        xq,
        m.weight.t(),
        sx.t().contiguous().t(),  # outer-dim-major activation scales
        F.ScalingType.BlockWise1x128,
        sw.t(),
        F.ScalingType.BlockWise128x128,
        output_dtype=x.dtype,
    )
    return y[:M]


_RUN: dict[str, Callable[[QuantLinear, torch.Tensor], torch.Tensor]] = {
    "dequant": _run_dequant,
    "int8pack": _run_int8pack,
    "int_mm": _run_int_mm,
    "int4pack": _run_int4pack,
    "scaled_mm": _run_scaled_mm,
    "block_scaled_mm": _run_block_scaled_mm,
}
# kernels in order of preference: int8 weight-only where torch builds it (CPU), else int8 W8A8 (CUDA)
_PREFERRED = {
    "int8": ("int8pack", "int_mm"),
    "int4": ("int4pack",),
    "float8": ("scaled_mm",),
    "fp8_block": ("block_scaled_mm",),
}
# relative error a kernel may show against the dequantized reference on the check problem: FP8 kernels
# also quantize the activations (e4m3 has 3 mantissa bits), weight-only kernels only round the output
_CHECK_TOL = {"int8pack": 0.02, "int_mm": 0.05, "int4pack": 0.02, "scaled_mm": 0.1, "block_scaled_mm": 0.1}
_KERNELS: dict[tuple[str, str, torch.dtype], str] = {}


def kernel_for(fmt: str, device: torch.device, dtype: torch.dtype) -> str:
    """The kernel a `fmt` layer uses on `device` with `dtype` activations: the first of _PREFERRED[fmt] that
    runs and matches the dequantized reference on a 256 x 256 check problem, else "dequant" (logged once)."""
    key = (fmt, str(device), dtype)
    if key not in _KERNELS:
        _KERNELS[key] = "dequant"
        why = []
        for name in _PREFERRED[fmt]:
            try:
                err = _check_kernel(fmt, name, device, dtype)
            except Exception as e:  # a missing kernel is a RuntimeError/NotImplementedError naming the op
                why.append(f"{name}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
                continue
            if err <= _CHECK_TOL[name]:
                _KERNELS[key] = name
                break
            why.append(f"{name}: relative error {err:.3g} against the dequantized reference")
        if _KERNELS[key] == "dequant":
            log.warning(
                "%s weights on %s (%s): no kernel (%s); dequantizing per call",
                fmt,
                device,
                dtype,
                "; ".join(why),
            )
    return _KERNELS[key]


def _check_kernel(fmt: str, name: str, device: torch.device, dtype: torch.dtype) -> float:
    gen = torch.Generator(device="cpu").manual_seed(0)
    w = torch.randn(256, 256, generator=gen).to(device)
    x = torch.randn(8, 256, generator=gen).to(device, dtype)
    m = QuantLinear(256, 256, False, fmt, dtype).to(device)
    m.weight.data = m.weight.data.to(device)
    m.quantize_from_(w)
    ref = x.float() @ m.dequantized().t()
    m.kernel = name
    if fmt == "int4":
        m._packed, m._scales_zeros = _int4_pack(m.weight, m.weight_scale, m.weight_zero, dtype)
    got = _RUN[name](m, x).float()
    return float((got - ref).norm() / ref.norm())


# ---- model surgery ---------------------------------------------------------------------------------------


def is_quantizable(name: str, module: nn.Module, fmt: str) -> bool:
    """Projections (`*_proj`: nn.Linear, MergedLinear and the parallel linears of pie.layers.parallel, whose
    shapes are this rank's) only: routers, embeddings and the LM head stay in full precision; int4 needs
    whole groups of 128 inputs, the FP8 kernels inputs and outputs in multiples of 16, FP8 blocks of 128."""
    if not isinstance(module, nn.Linear) or not name.endswith("_proj"):
        return False
    if fmt == "int4":
        return module.in_features % INT4_GROUP == 0
    if fmt == "float8":
        return module.in_features % 16 == 0 and module.out_features % 16 == 0
    if fmt == "fp8_block":  # cuBLAS's 128 x 128 recipe: whole blocks, and every fused shard on a block edge
        shards = getattr(module, "shard_slices", {}).values()
        whole = module.in_features % FP8_BLOCK == 0 and module.out_features % FP8_BLOCK == 0
        return whole and all(off % FP8_BLOCK == 0 for off, _ in shards)
    return True


def split_problem(name: str, module: nn.Module, fmt: str) -> str | None:
    """Why `fmt` cannot quantize this rank's shard of a projection that it would quantize whole, or None.
    A row-parallel layer splits the inputs, and int4's groups of 128 inputs must not straddle two ranks
    (a group's scale and zero would belong to neither)."""
    if fmt != "int4" or not isinstance(module, RowParallelLinear) or not name.endswith("_proj"):
        return None
    if module.full_in % INT4_GROUP or module.in_features % INT4_GROUP == 0:
        return None  # not quantized at any tensor_parallel_size, or whole groups on every rank
    groups = module.full_in // INT4_GROUP
    fits = [
        t for t in range(1, groups + 1) if groups % t == 0
    ]  # tensor_parallel_size values that keep groups
    return (
        f"weight_dtype int4 quantizes {name} in groups of {INT4_GROUP} inputs, but tensor_parallel_size "
        f"{tp_size()} gives each rank {module.in_features} of its {module.full_in} inputs, which is not a "
        f"multiple of {INT4_GROUP} (a group would straddle two ranks); use tensor_parallel_size "
        f"{' or '.join(map(str, fits[-4:]))}, or weight_dtype int8"
    )


def quantize_model_(model: nn.Module, fmt: str) -> int:
    """Replace every quantizable projection of `model` (built, not yet loaded; meta is fine) by a QuantLinear
    of `fmt`. Returns how many were replaced; the skipped ones stay full precision. ValueError (saying which
    tensor_parallel_size works) when a tensor-parallel split cuts the format's blocks (`split_problem`)."""
    for name, m in model.named_modules():
        problem = split_problem(name, m, fmt)
        if problem is not None:
            raise ValueError(problem)
    targets = [(n, m) for n, m in model.named_modules() if is_quantizable(n.rsplit(".", 1)[-1], m, fmt)]
    for name, linear in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        with torch.device(linear.weight.device):
            setattr(parent, child, QuantLinear.from_linear(linear, fmt))
    return len(targets)


def finalize_quantized_(model: nn.Module) -> dict[str, int]:
    """After loading: every QuantLinear picks its kernel; returns {kernel: layer count} (for the log)."""
    counts: dict[str, int] = {}
    for m in model.modules():
        if isinstance(m, QuantLinear):
            m.finalize()
            counts[m.kernel] = counts.get(m.kernel, 0) + 1
    return counts


def init_random_quantized_(model: nn.Module, gen: torch.Generator) -> None:
    """Benchmark weights for quantized layers: normal(0, 0.02) quantized, zero bias (executor.init_random_)."""
    for m in model.modules():
        if isinstance(m, QuantLinear):
            w = torch.empty(m.out_features, m.in_features, device=m.weight.device)
            m.quantize_from_(w.normal_(0.0, 0.02, generator=gen))
            if m.bias is not None:
                m.bias.data.zero_()


def quantized_bytes(model: nn.Module) -> int:
    """Bytes held by quantized layers beyond their parameters (scales, zeros, int4's packed copy)."""
    total = 0
    for m in model.modules():
        if isinstance(m, QuantLinear):
            extra = [m.weight_scale, getattr(m, "weight_zero", None), m._packed, m._scales_zeros]
            total += sum(t.numel() * t.element_size() for t in extra if t is not None)
    return total
