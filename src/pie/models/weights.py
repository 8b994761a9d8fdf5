"""Load an HF safetensors checkpoint (single file or sharded with an index) into a pie model.

Per checkpoint tensor: (1) the model's `checkpoint_prefixes` rename a multimodal wrapper's text tower
("model.language_model." -> "model.", "language_model.model." -> "model."); names that match no parameter
(vision towers, projectors) are skipped; (2) fused projections are declared as data
(`packed_modules_mapping`: {"q_proj": ("qkv_proj", "q"), ...}) and the fused module's `load_shard` places
the tensor; (3) FP8 weights with a `weight_scale_inv` (per tensor, per row or per block) are dequantized to
the parameter's dtype; their activation scales are not needed. A module with a `load_weight(tensor, shard_id,
scale)` method (layers/quant.py's QuantLinear) receives its weight instead, FP8 ones with their scale, and
stores it quantized (an FP8 checkpoint on a kernel that takes its blocks is kept as shipped). Tensors are read
straight onto the parameter's device and cast by copy_.

MoE families also declare, as data:
- `checkpoint_renames`: name fragments renamed after the prefixes (Mixtral's `.block_sparse_moe.` is pie's
  `.mlp.`);
- `expert_params_mapping`: per-expert tensors `...experts.{e}.{part}.weight` -> (stacked parameter, part),
  e.g. {"w1": ("gate_up_proj", "gate")}; the experts module's `load_shard` places expert e's slice. A
  checkpoint already stacked (`experts.gate_up_proj`, transformers 5's layout) loads 1:1;
- `checkpoint_transforms`: parameter-name suffix -> a function from the checkpoint tensor (transformers'
  layout) to pie's (GPT-OSS: transposed, interleaved gate/up experts).
MXFP4 tensors (`<name>_blocks` uint8 [..., G, 16] with `<name>_scales` uint8 [..., G] beside them, GPT-OSS's
experts) are dequantized to the layout transformers' Mxfp4 dequantization produces for `<name>` (what a
bf16 checkpoint of the same model stores), then loaded as `<name>`.

Tensor parallelism: a module with `load_param(name, param, source, shard_id)` (pie.layers.parallel) places
the tensor itself, reading only its rank's slice: the source reads slices straight from safetensors
(`get_slice`), so a rank never materializes the whole tensor. Tensors that must be converted first (FP8,
MXFP4, checkpoint_transforms) are read whole, converted, then sliced. At tensor_parallel_size 1 the slice
is the whole tensor: one code path. A quantized layer (QuantLinear) is both: `load_param` reads its rank's
slice of a full-precision weight, `load_weight(source, shard_id, scale)` takes an FP8 one with its scale and
slices it itself (keeping 128 x 128 blocks where the rank's slice starts and ends on block edges).
"""

from __future__ import annotations

import json
import logging
import re
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm import tqdm

from pie.errors import ModelError
from pie.layers.parallel import TensorSource
from pie.layers.quant_formats import dequantize_fp8

log = logging.getLogger(__name__)

# Checkpoint tensors that carry no weights we need (derived buffers written by old transformers).
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq", "rotary_emb.cos_cached", "rotary_emb.sin_cached")
# Companions of FP8 weights: the dequantization scale (read with its weight) and static activation scales.
_SCALE_SUFFIXES = (".weight_scale_inv", ".weight_scale", ".input_scale", ".activation_scale")
_FP8 = tuple(getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, n))


# MXFP4 (OCP microscaling FP4, E2M1): the 16 values of a nibble; low nibble first in each byte.
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
_MXFP4_BLOCKS, _MXFP4_SCALES = "_blocks", "_scales"


def dequantize_mxfp4(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """fp32 weights from MXFP4 blocks [E, R, G, 16] uint8 (two E2M1 values per byte, low nibble first) and
    scales [E, R, G] uint8 (a power-of-two exponent biased by 127 per group of 32 values).

    Returns [E, G * 32, R]: each row r's G * 32 values, then the last two dims swapped, exactly as
    transformers' convert_moe_packed_tensors (integrations/mxfp4.py) lays out its dequantized parameter."""
    if blocks.dtype != torch.uint8 or blocks.dim() != 4 or tuple(blocks.shape[:-1]) != tuple(scales.shape):
        raise ValueError(
            f"MXFP4 blocks must be uint8 [E, R, G, 16] with scales [E, R, G]; got {tuple(blocks.shape)} "
            f"{blocks.dtype} and {tuple(scales.shape)}"
        )
    lut = torch.tensor(FP4_VALUES, dtype=torch.float32, device=blocks.device)
    lo, hi = lut[(blocks & 0x0F).long()], lut[(blocks >> 4).long()]  # [E, R, G, 16] each
    vals = torch.stack([lo, hi], dim=-1).flatten(-2)  # [E, R, G, 32]: low nibble is the even element
    vals = torch.ldexp(vals, (scales.to(torch.int32) - 127).unsqueeze(-1))
    return vals.flatten(-2).transpose(1, 2).contiguous()  # [E, G * 32, R]


_EXPERT_KEY = re.compile(r"^(?P<prefix>.+\.experts)\.(?P<expert>\d+)\.(?P<part>\w+)\.weight$")


def checkpoint_files(model_dir: str | Path) -> list[Path]:
    """The safetensors files of a checkpoint: from model.safetensors.index.json, else model.safetensors."""
    d = Path(model_dir)
    index = d / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError) as e:
            raise ModelError(f"{index} is not a valid safetensors index ({e})") from None
        files = [d / f for f in sorted(set(weight_map.values()))]
    elif (d / "model.safetensors").is_file():
        files = [d / "model.safetensors"]
    else:
        raise ModelError(
            f"no model.safetensors or model.safetensors.index.json in {d}; pie loads safetensors checkpoints only"
        )
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise ModelError(f"checkpoint shards listed in the index are missing: {', '.join(missing)}")
    return files


def load_weights(model: torch.nn.Module, model_dir: str | Path, progress: bool = False) -> None:
    """Fill every parameter of `model` from the checkpoint in `model_dir`.

    Raises ModelError naming missing tensors or shape mismatches; checkpoint tensors the model does not
    use (e.g. lm_head.weight of a tied model, rotary inv_freq) are skipped.
    """
    params = dict(model.named_parameters())
    packed: dict[str, tuple[str, str | int]] = getattr(model, "packed_modules_mapping", {})
    prefixes: dict[str, str] = getattr(model, "checkpoint_prefixes", {})
    renames: dict[str, str] = getattr(model, "checkpoint_renames", {})
    experts: dict[str, tuple[str, str]] = getattr(model, "expert_params_mapping", {})
    transforms: dict[str, Callable[[torch.Tensor], torch.Tensor]] = getattr(
        model, "checkpoint_transforms", {}
    )
    device = next(iter(params.values())).device
    # safetensors takes "cpu", "cuda:N" (int index also works); reading onto the target device skips a hop.
    st_device = str(device) if device.type != "cuda" else f"cuda:{device.index or 0}"
    loaded: set[str] = set()
    shard_seen: dict[str, set] = {}
    files = checkpoint_files(model_dir)
    total = 0
    for path in files:  # headers only: a broken file fails here, by name; the bar knows its total
        with _open(path, "cpu") as f:
            total += len(f.keys())
    with tqdm(
        desc="loading weights", unit="tensor", total=total or None, file=sys.stderr, disable=not progress
    ) as bar:
        for path in files:
            with _open(path, st_device) as f:
                keys = list(f.keys())
                key_set = set(keys)
                for key in keys:
                    bar.update(1)
                    if key.endswith(_IGNORED_SUFFIXES) or key.endswith(_SCALE_SUFFIXES):
                        continue
                    mx_base = _mxfp4_base(key, key_set)
                    if key.endswith(_MXFP4_SCALES) and key[: -len(_MXFP4_SCALES)] + _MXFP4_BLOCKS in key_set:
                        continue  # read with its blocks
                    target_key = key if mx_base is None else mx_base
                    name, shard_id = _target(
                        _renamed(_rename(target_key, prefixes), renames), packed, experts
                    )
                    param = params.get(name)
                    if param is None:
                        log.debug("ignoring checkpoint tensor %s (not used by this model)", key)
                        continue
                    module = model.get_submodule(name.rsplit(".", 1)[0])
                    # quantized layers (layers/quant.py) take the checkpoint tensor, and an FP8 one's scale, as is
                    quantizing = name.endswith(".weight") and hasattr(module, "load_weight")
                    fp8 = _is_fp8(f, key)
                    direct = (
                        hasattr(module, "load_param")
                        and mx_base is None
                        and not fp8
                        and not any(name.endswith(sfx) for sfx in transforms)
                    )
                    try:
                        if direct:  # sliced by the module, read slice by slice
                            module.load_param(name.rsplit(".", 1)[1], param, _SliceSource(f, key), shard_id)
                            _mark(name, shard_id, loaded, shard_seen)
                            continue
                    except ValueError as e:
                        raise ModelError(f"checkpoint tensor {key} does not fit {name}: {e}") from None
                    tensor = f.get_tensor(key)
                    if mx_base is not None:
                        try:
                            tensor = dequantize_mxfp4(tensor, f.get_tensor(mx_base + _MXFP4_SCALES))
                        except ValueError as e:
                            raise ModelError(f"checkpoint tensor {key}: {e}") from None
                    if tensor.dtype in _FP8 and not quantizing:
                        tensor = dequantize_fp8(tensor, _fp8_scale(f, key, key_set))
                    tensor = _transformed(name, tensor, transforms)
                    try:
                        if quantizing:  # this rank's slice of it, FP8 blocks kept where the split allows
                            scale = _fp8_scale(f, key, key_set) if tensor.dtype in _FP8 else None
                            module.load_weight(TensorSource(tensor), shard_id, scale)
                            _mark(name, shard_id, loaded, shard_seen)
                        elif hasattr(module, "load_param"):
                            module.load_param(name.rsplit(".", 1)[1], param, TensorSource(tensor), shard_id)
                            _mark(name, shard_id, loaded, shard_seen)
                        elif shard_id is None:
                            if param.shape != tensor.shape:
                                raise ValueError(
                                    f"expected shape {tuple(param.shape)}, got {tuple(tensor.shape)}"
                                )
                            param.data.copy_(tensor)
                            loaded.add(name)
                        else:
                            module.load_shard(param, tensor, shard_id)
                            shard_seen.setdefault(name, set()).add(shard_id)
                    except ValueError as e:
                        raise ModelError(f"checkpoint tensor {key} does not fit {name}: {e}") from None
    for name, seen in shard_seen.items():
        if seen == _expected_shards(model, name):
            loaded.add(name)
    missing = [n for n in params if n not in loaded]
    if missing:
        shown = ", ".join(_missing_names(model, n, packed, shard_seen.get(n, set())) for n in missing[:8])
        more = f" (and {len(missing) - 8} more)" if len(missing) > 8 else ""
        raise ModelError(f"checkpoint in {model_dir} lacks tensors: {shown}{more}")


def _mark(name: str, shard_id, loaded: set[str], shard_seen: dict[str, set]) -> None:
    if shard_id is None:
        loaded.add(name)
    else:
        shard_seen.setdefault(name, set()).add(shard_id)


def _is_fp8(f, key: str) -> bool:
    """Whether checkpoint tensor `key` is stored in an FP8 dtype (from the header: nothing is read)."""
    return f.get_slice(key).get_dtype().startswith("F8")


class _SliceSource:
    """A checkpoint tensor read lazily: `narrow` reads one slice from the file (pie.layers.parallel.Source)."""

    def __init__(self, f, key: str) -> None:
        self._f, self._key = f, key
        self._slice = f.get_slice(key)
        self.shape = tuple(self._slice.get_shape())

    def narrow(self, dim: int, start: int, size: int) -> torch.Tensor:
        if start == 0 and size == self.shape[dim]:
            return self.full()
        index = (slice(None),) * dim + (slice(start, start + size),)
        return self._slice[index]

    def full(self) -> torch.Tensor:
        return self._f.get_tensor(self._key)


def _open(path: Path, device: str):
    """safe_open, with a ModelError naming the file when its header is unreadable (truncated, empty)."""
    try:
        return safe_open(str(path), framework="pt", device=device)
    except Exception as e:  # safetensors' SafetensorError is not importable by name across versions
        size = path.stat().st_size if path.exists() else 0
        raise ModelError(
            f"{path} is not a readable safetensors file ({e}; {size} bytes): truncated or corrupt; "
            "re-download the model"
        ) from None


def _fp8_scale(f, key: str, keys: set[str]) -> torch.Tensor:
    """The scale of FP8 checkpoint tensor `key`, which sits in the same file."""
    base = key.removesuffix(".weight")
    for suffix in (".weight_scale_inv", ".weight_scale"):
        if base + suffix in keys:
            return f.get_tensor(base + suffix)
    raise ModelError(
        f"checkpoint tensor {key} is FP8 but has no {base}.weight_scale_inv beside it; pie dequantizes FP8 "
        "weights with their scales and cannot load this one"
    )


def _rename(key: str, prefixes: dict[str, str]) -> str:
    for old, new in prefixes.items():
        if key.startswith(old):
            return new + key[len(old) :]
    return key


def _mxfp4_base(key: str, keys: set[str]) -> str | None:
    """`<name>` for an MXFP4 `<name>_blocks` key whose `<name>_scales` sits in the same file, else None."""
    if not key.endswith(_MXFP4_BLOCKS):
        return None
    base = key[: -len(_MXFP4_BLOCKS)]
    if base + _MXFP4_SCALES not in keys:
        raise ModelError(
            f"checkpoint tensor {key} looks like MXFP4 blocks but {base}{_MXFP4_SCALES} is not in the same file; "
            "pie dequantizes MXFP4 blocks with their scales"
        )
    return base


def _transformed(name: str, tensor: torch.Tensor, transforms: dict) -> torch.Tensor:
    for suffix, fn in transforms.items():
        if name.endswith(suffix):
            return fn(tensor)
    return tensor


def _renamed(key: str, renames: dict[str, str]) -> str:
    for old, new in renames.items():
        key = key.replace(old, new)
    return key


def _expected_shards(model: torch.nn.Module, name: str) -> set:
    """Shard ids that together fill parameter `name` (a fused projection's, or every expert's parts)."""
    module_name, param_name = name.rsplit(".", 1)
    module = model.get_submodule(module_name)
    if hasattr(module, "shard_ids"):
        return module.shard_ids(param_name)
    return set(module.shard_slices)


def _target(
    key: str, packed: dict[str, tuple[str, str | int]], experts: dict[str, tuple[str, str]] | None = None
) -> tuple[str, str | int | tuple | None]:
    """Checkpoint key (renamed) -> (parameter name, shard id or None)."""
    m = _EXPERT_KEY.match(key) if experts else None
    if m and m["part"] in experts:
        param, part = experts[m["part"]]
        return f"{m['prefix']}.{param}", (int(m["expert"]), part)
    for part, (fused, shard_id) in packed.items():
        if f".{part}." in key:
            return key.replace(f".{part}.", f".{fused}."), shard_id
    return key, None


def _checkpoint_names(param: str, packed: dict[str, tuple[str, str | int]], seen: set) -> str:
    """The checkpoint names that should have filled `param` (for a fused one: only the absent shards)."""
    names = [
        param.replace(f".{fused}.", f".{part}.")
        for part, (fused, shard_id) in packed.items()
        if f".{fused}." in param and shard_id not in seen
    ]
    return ", ".join(names) if names else param


def _missing_names(model: torch.nn.Module, param: str, packed: dict, seen: set) -> str:
    """What the checkpoint lacks for `param`: its checkpoint names, or for stacked experts which ones."""
    module = model.get_submodule(param.rsplit(".", 1)[0])
    if not hasattr(module, "shard_ids"):
        return _checkpoint_names(param, packed, seen)
    absent = sorted(module.shard_ids(param.rsplit(".", 1)[1]) - seen)
    if not seen:  # neither the stacked tensor nor any per-expert one
        return f"{param} (or its per-expert tensors)"
    return f"{param}: {len(absent)} expert slices, e.g. expert {absent[0][0]} {absent[0][1]}"
