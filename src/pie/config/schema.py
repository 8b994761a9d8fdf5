"""The typed schema of $PIE_HOME/config.toml.

Each field carries its default and, in `metadata`, its help text (printed as comments by
`pie config show` and used by docs) plus the rules check_section() below applies:
  help: str                 one line, what the value means
  choices: tuple            allowed values
  gt / ge / le: number      bounds (strict lower, lower, upper); integers are at most INT_MAX
                            (2**31 - 1) unless a field sets its own `le`
  pow2: bool                must be a power of two
  unimplemented: callable   value -> True when the value is valid but not implemented yet
Invariant: a PieConfig built by pie.config.loader has passed every rule, so its consumers
(driver factory, CLI) never re-validate.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, get_type_hints

from pie.errors import ModelError
from pie.paths import EMBEDDED_MODEL_ID, pie_home

DRIVER_TYPES = ("cuda_native", "dev")
ACTIVATION_DTYPES = ("bfloat16", "float16", "float32")
WEIGHT_DTYPES = ("auto", "float32", "float16", "bfloat16", "int4", "int8", "float8")
QUANTIZED_WEIGHT_DTYPES = ("int4", "int8", "float8")
KV_CACHE_DTYPES = ("auto", "fp8_e4m3")
# Upper bound of every integer option without its own `le`: counts reach the driver as int32.
INT_MAX = 2**31 - 1


def opt(default: Any, help: str, **rules: Any) -> Any:
    """A dataclass field with a default, help text and validation rules (see module doc)."""
    meta = {"help": help, **rules}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class CudaNativeOptions:
    """Options of the in-process CUDA driver (FlashInfer attention)."""

    binary_path: str = opt("", "accepted for older configs and ignored")
    gpu_mem_utilization: float = opt(0.85, "fraction of free GPU memory the driver claims", gt=0, le=1)
    kv_page_size: int = opt(32, "KV cache page size in tokens", ge=1, pow2=True)
    max_batch_tokens: int = opt(10240, "cap on tokens per batch", ge=1)
    max_batch_size: int = opt(512, "cap on sequences per batch", ge=1)
    max_num_kv_pages: int = opt(1024, "KV cache page count; KV memory scales linearly", ge=1)
    swap_pool_size: int = opt(
        0,
        "pinned host memory for swapped-out KV pages, in pages (as big as device pages); 0 disables swap",
        ge=0,
    )
    weight_dtype: str = opt(
        "bfloat16",
        "weight precision: auto (= activation_dtype), float32, float16, bfloat16 (must equal activation_dtype; "
        "left unset, it follows it); int8 (per channel), int4 (groups of 128), float8 (e4m3 per channel) "
        "quantize the projections at load (docs/quantization.md)",
        choices=WEIGHT_DTYPES,
    )
    runtime_quant: str = opt(
        "",
        'empty disables runtime quantization; "fp8" runs the projections in FP8 (weights e4m3 per channel, '
        'activations per token): the same as weight_dtype = "float8"',
        choices=("", "fp8"),
    )
    kv_cache_dtype: str = opt(
        "auto",
        'KV page precision: auto (= activation_dtype) or "fp8_e4m3" (one byte per element: twice the pages '
        "of bfloat16; an extension of the spec, docs/quantization.md)",
        choices=KV_CACHE_DTYPES,
    )
    ready_timeout_s: float = opt(600.0, "seconds to wait for driver readiness", gt=0)
    shutdown_timeout_s: float = opt(5.0, "seconds to wait for graceful shutdown", gt=0)


@dataclass
class DevOptions:
    """Options of the subprocess driver (readable PyTorch; runs on CPU too)."""

    venv: str | None = opt(
        None,
        "per-model virtualenv whose python runs the driver; otherwise `pie driver dev set`, "
        "PIE_PYTHON, the active venv and python3 are tried in that order",
    )
    python: str | None = opt(None, "per-model python interpreter (instead of venv)")
    gpu_mem_utilization: float = opt(0.8, "fraction of free GPU memory used as the KV budget", gt=0, le=1)
    max_batch_tokens: int = opt(10240, "maximum tokens summed across all sequences in a batch", ge=1)
    max_batch_size: int = opt(512, "maximum sequences per batch", ge=1)
    max_dist_size: int = opt(32, "cap on the k of a distribution probe", ge=1)
    max_num_embeds: int = opt(128, "cap on embedding lookups per batch", ge=1)
    max_num_adapters: int = opt(32, "adapter slot capacity", ge=0)
    max_adapter_rank: int = opt(8, "maximum LoRA rank", ge=1)
    kv_page_size: int = opt(16, "KV cache page size in tokens", ge=1, pow2=True)
    weight_dtype: str = opt(
        "auto",
        "auto (= activation_dtype), float32, float16, bfloat16 (must equal activation_dtype); int8, int4, "
        "float8 quantize the projections at load (docs/quantization.md)",
        choices=WEIGHT_DTYPES,
    )
    kv_cache_dtype: str = opt(
        "auto",
        'KV page precision: auto (= activation_dtype) or "fp8_e4m3" (one byte per element; an extension of '
        "the spec, docs/quantization.md)",
        choices=KV_CACHE_DTYPES,
    )
    cpu_mem_budget_in_gb: float = opt(
        0.0,
        "host memory for swapped-out KV pages, in GiB (pinned on CUDA; slots = budget / bytes of one page); "
        "0 disables swap",
        ge=0,
    )
    max_num_kv_pages: int | None = opt(
        None,
        "cap on the planned KV page count (unset: no cap); a small cap exercises memory pressure on CPU",
        ge=1,
    )
    ready_timeout_s: float = opt(
        600.0, "seconds the driver process may take to load the model and answer ready", gt=0
    )
    shutdown_timeout_s: float = opt(
        5.0, "seconds the driver process may take to exit when asked; then SIGTERM, then SIGKILL", gt=0
    )
    heartbeat_timeout_s: float = opt(
        30.0,
        "seconds without a heartbeat from the driver process (a thread beside the model: long batches "
        "keep beating) before it counts as wedged, is killed, and its passes fail",
        gt=0,
    )


OPTIONS_BY_TYPE: dict[str, type] = {"cuda_native": CudaNativeOptions, "dev": DevOptions}


@dataclass
class DriverConfig:
    """Which driver runs a model, on which devices, with which options."""

    type: str = opt(
        "cuda_native", "cuda_native (in-process, CUDA) or dev (subprocess, CPU or CUDA)", choices=DRIVER_TYPES
    )
    device: list[str] = opt(
        ["cuda:0"],
        'devices, one per tensor-parallel rank: "cuda:N"; "cpu" is valid for dev only '
        "(default: cuda:0 for cuda_native, cpu for dev)",
    )
    tensor_parallel_size: int = opt(
        1, "number of devices the model is split across (one process per device; 'device' lists them)", ge=1
    )
    activation_dtype: str = opt(
        "bfloat16",
        "bfloat16, float16, float32 (default: bfloat16 on CUDA, float32 on CPU)",
        choices=ACTIVATION_DTYPES,
    )
    options: CudaNativeOptions | DevOptions = field(
        default_factory=CudaNativeOptions, metadata={"help": "keys depend on the driver type"}
    )


@dataclass
class ModelEntry:
    """One [[model]] block."""

    name: str = opt("default", "how inferlets ask for the model; the first block is the default")
    hf_repo: str = opt(
        EMBEDDED_MODEL_ID,
        f'a repo id in the HF cache, a local directory, or "{EMBEDDED_MODEL_ID}" (the model pie ships)',
    )
    driver: DriverConfig = field(default_factory=DriverConfig)


@dataclass
class RuntimeConfig:
    """The [runtime] table: engine settings shared by every model."""

    snapshot_dir: str = opt(
        "",
        "directory where named context snapshots persist across runs; relative paths are under $PIE_HOME; "
        'empty ("") keeps snapshots in memory only',
    )

    def snapshot_path(self) -> Path | None:
        """snapshot_dir resolved ($PIE_HOME for relative paths, ~ expanded), or None when snapshots stay in memory."""
        if not self.snapshot_dir:
            return None
        path = Path(self.snapshot_dir).expanduser()
        return path if path.is_absolute() else pie_home() / path


@dataclass
class PieConfig:
    """The whole file: one or more models (the first is the default) and the [runtime] table."""

    models: list[ModelEntry]
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    source: str = field(default="", compare=False)  # the file it came from, for error messages

    @property
    def default_model(self) -> ModelEntry:
        return self.models[0]

    def model(self, name: str | None = None) -> ModelEntry:
        """The entry called `name` (None: the default model)."""
        if name is None:
            return self.default_model
        for m in self.models:
            if m.name == name:
                return m
        where = f" in {self.source}" if self.source else ""
        names = ", ".join(repr(m.name) for m in self.models)
        raise ModelError(f"no model named {name!r}{where}; configured models: {names}")


# ---------------------------------------------------------------- per-field checks
# (structure-level checks: devices, driver type vs options, duplicate names live in loader.py)

BAD = object()  # a value that failed its check (its error is already recorded)


def _never(_: Any) -> bool:
    return False


def fmt_value(v: Any) -> str:
    """A value as it would appear in TOML (strings quoted)."""
    return f'"{v}"' if isinstance(v, str) else repr(v).lower() if isinstance(v, bool) else repr(v)


def expected_type(hint: Any, value: Any) -> str | None:
    """What `value` should have been for type `hint`, or None when it fits."""
    if hint is int or hint == (int | None):
        return None if isinstance(value, int) and not isinstance(value, bool) else "an integer"
    if hint is float:
        return None if isinstance(value, int | float) and not isinstance(value, bool) else "a number"
    if hint is str or hint == (str | None):
        return None if isinstance(value, str) else "a string"
    if hint == list[str]:
        ok = isinstance(value, list) and all(isinstance(x, str) for x in value)
        return None if ok else "a list of strings"
    raise TypeError(f"schema type {hint} has no check")  # a schema bug, not a user error


def _range_text(meta: dict) -> str:
    lo = f"({meta['gt']}" if "gt" in meta else f"[{meta['ge']}" if "ge" in meta else None
    if "le" in meta:
        return f"in {lo or '(-inf'}, {meta['le']}]"
    return f"> {meta['gt']}" if "gt" in meta else f">= {meta['ge']}"


def _check_value(errors: list[str], where: str, key: str, value: Any, hint: Any, meta: dict) -> Any:
    """Checks one value against its type and rules; returns the normalized value or BAD."""
    if isinstance(value, str) and hint in (str | None, int | None) and value == "":
        return None  # "" unsets an optional value (`pie config set ... ""`)
    if (want := expected_type(hint, value)) is not None:
        errors.append(f"{where}: '{key}' must be {want}, got {fmt_value(value)} ({type(value).__name__})")
        return BAD
    if hint is float:
        value = float(value)
    if "choices" in meta and value not in meta["choices"]:
        near = difflib.get_close_matches(str(value), [str(c) for c in meta["choices"]], n=1)
        hint_txt = f"; did you mean {fmt_value(near[0])}?" if near else ""
        allowed = ", ".join(fmt_value(c) for c in meta["choices"] if not meta.get("unimplemented", _never)(c))
        errors.append(f"{where}: '{key}' must be one of {allowed}; got {fmt_value(value)}{hint_txt}")
        return BAD
    bad_range = (
        ("gt" in meta and not value > meta["gt"])
        or ("ge" in meta and not value >= meta["ge"])
        or ("le" in meta and not value <= meta["le"])
    )
    if bad_range:
        errors.append(f"{where}: '{key}' must be {_range_text(meta)}, got {fmt_value(value)}")
        return BAD
    if hint in (int, int | None) and "le" not in meta and abs(value) > INT_MAX:
        # counts travel to the driver as 32-bit integers (msgpack, CUDA index tensors)
        errors.append(f"{where}: '{key}' must be at most {INT_MAX}, got {value}")
        return BAD
    if meta.get("pow2") and value & (value - 1):
        errors.append(f"{where}: '{key}' must be a power of two (e.g. 16 or 32), got {value}")
        return BAD
    if meta.get("unimplemented", _never)(value):
        errors.append(
            f"{where}: {key} = {fmt_value(value)} is not implemented yet; remove it to use the default"
        )
        return BAD
    return value


def check_section(errors: list[str], cls: type, raw: dict, where: str, driver_type: str = "") -> dict:
    """Checks the keys of one table against dataclass `cls`; returns the valid values by key.

    Keys handled by the caller (nested tables, context-dependent checks) are not in `raw`.
    """
    hints = get_type_hints(cls)
    names = [f.name for f in fields(cls)]
    out: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in names:
            owner = owner_of_option(key) if driver_type else None
            valid = ", ".join(names)
            if owner and owner != driver_type:
                errors.append(
                    f"{where}: '{key}' is a {owner} option; it does not apply to driver type "
                    f"'{driver_type}' (valid keys: {valid})"
                )
            else:
                near = difflib.get_close_matches(key, names, n=1)
                hint_txt = f"; did you mean '{near[0]}'?" if near else ""
                errors.append(f"{where}: unknown key '{key}'{hint_txt} (valid keys: {valid})")
            continue
        meta = cls.__dataclass_fields__[key].metadata
        checked = _check_value(errors, where, key, value, hints[key], meta)
        if checked is not BAD:
            out[key] = checked
    return out


def field_help(cls: type, name: str) -> str:
    return cls.__dataclass_fields__[name].metadata.get("help", "")


def owner_of_option(key: str) -> str | None:
    """The driver type whose options include `key` (None when no driver has it)."""
    for t, cls in OPTIONS_BY_TYPE.items():
        if key in cls.__dataclass_fields__:
            return t
    return None


__all__ = [
    "ACTIVATION_DTYPES",
    "DRIVER_TYPES",
    "OPTIONS_BY_TYPE",
    "WEIGHT_DTYPES",
    "CudaNativeOptions",
    "DevOptions",
    "DriverConfig",
    "ModelEntry",
    "PieConfig",
    "RuntimeConfig",
    "check_section",
    "field_help",
    "owner_of_option",
]
