"""Read, validate, write and edit $PIE_HOME/config.toml.

Validation happens here, before anything loads: every problem in the file is collected and
reported together in one ConfigError naming the file, the section and the key, with what is
allowed (and the closest valid key for typos, via difflib).
"""

from __future__ import annotations

import difflib
import os
import re
import sys
import tempfile
import textwrap
import tomllib
from dataclasses import fields
from pathlib import Path
from typing import Any

import tomli_w

from pie.config.schema import (
    OPTIONS_BY_TYPE,
    QUANTIZED_WEIGHT_DTYPES,
    CudaNativeOptions,
    DevOptions,
    DriverConfig,
    ModelEntry,
    PieConfig,
    RuntimeConfig,
    check_section,
    expected_type,
    fmt_value,
    owner_of_option,
)
from pie.errors import ConfigError
from pie.paths import EMBEDDED_MODEL_ID, default_config_path, home_write_error

PREFERRED_REPO = "Qwen/Qwen3-0.6B"  # `pie config init` picks it when it is already in the HF cache
_DEVICE_RE = re.compile(r"cpu|cuda:\d+")
TOP_LEVEL_KEYS = ["model", "runtime"]
_warned_binary_path = False  # binary_path is ignored; say so once per process


# ---------------------------------------------------------------- validation


def _check_devices(
    errors: list[str], where: str, dtype: str, devices: Any, tp: int | None
) -> list[str] | None:
    """The device list (a single string is shorthand for a list of one); tp None: already reported bad."""
    if isinstance(devices, str):
        devices = [devices]  # device = "cpu" is accepted as shorthand for ["cpu"]
    if (want := expected_type(list[str], devices)) is not None:
        errors.append(f"{where}: 'device' must be {want} like [\"cuda:0\"], got {fmt_value(devices)}")
        return None
    n_errors = len(errors)
    if not devices:
        errors.append(f'{where}: \'device\' is empty; give one device, e.g. ["cuda:0"] or ["cpu"]')
    for d in devices:
        if not _DEVICE_RE.fullmatch(d):
            errors.append(
                f'{where}: bad device "{d}": use "cuda:N" (e.g. "cuda:0") or "cpu" (dev driver only)'
            )
        elif d == "cpu" and dtype == "cuda_native":
            errors.append(
                f'{where}: device "cpu" is valid for driver type dev only; cuda_native needs "cuda:N" '
                f'(or set type = "dev")'
            )
    gpus = [d for d in devices if d != "cpu"]  # CPU ranks are separate processes on one host: may repeat
    if len(set(gpus)) != len(gpus):
        errors.append(f"{where}: 'device' lists a device twice: {fmt_value(devices)}")
    elif gpus and len(gpus) != len(devices):
        errors.append(
            f"{where}: 'device' mixes cpu and cuda devices ({fmt_value(devices)}); every tensor-parallel rank "
            "runs on the same kind of device"
        )
    elif devices and tp is not None and len(devices) != tp:
        errors.append(
            f"{where}: give one device per tensor-parallel rank: tensor_parallel_size = {tp} but "
            f"{len(devices)} devices are listed"
        )
    return devices if len(errors) == n_errors else None


def _check_driver(errors: list[str], raw: Any, model_where: str) -> DriverConfig | None:
    where = f"{model_where} [model.driver]"
    if not isinstance(raw, dict):
        errors.append(f"{where}: 'driver' must be a table ([model.driver]), got {fmt_value(raw)}")
        return None
    raw = dict(raw)
    options_raw = raw.pop("options", {})
    devices_raw = raw.pop("device", None)
    n_errors = len(errors)
    vals = check_section(errors, DriverConfig, raw, where)
    # a missing type means cuda_native; a bad one is reported and leaves dtype None
    dtype = vals.get("type") if "type" in raw else "cuda_native"
    tp = vals.get("tensor_parallel_size", None if "tensor_parallel_size" in raw else 1)
    if devices_raw is None:
        devices_raw = ["cpu"] if dtype == "dev" else ["cuda:0"]
    devices = _check_devices(errors, where, dtype or "", devices_raw, tp)
    if "activation_dtype" not in raw and devices:
        vals["activation_dtype"] = "float32" if all(d == "cpu" for d in devices) else "bfloat16"
    if dtype is None:
        return None  # the type error is reported; options cannot be checked without a type
    opt_where = f"{model_where} [model.driver.options]"
    if not isinstance(options_raw, dict):
        errors.append(f"{opt_where}: 'options' must be a table, got {fmt_value(options_raw)}")
        return None
    opt_cls = OPTIONS_BY_TYPE[dtype]
    options = opt_cls(**check_section(errors, opt_cls, options_raw, opt_where, driver_type=dtype))
    if isinstance(options, DevOptions) and options.venv and options.python:
        errors.append(f"{opt_where}: set either 'venv' or 'python', not both")
    _check_precision(errors, opt_where, vals.get("activation_dtype"), options, "weight_dtype" in options_raw)
    if len(errors) != n_errors:
        return None
    return DriverConfig(**{**vals, "type": dtype, "device": devices, "options": options})


def _check_precision(errors: list[str], where: str, act: str | None, options: Any, explicit: bool) -> None:
    """Full-precision weights must be in the activation dtype (the executor has no mixed precision); quantized
    ones (int8, int4, float8) compute in it. A default weight_dtype follows activation_dtype; an explicit
    different one is an error here, not at start, as is runtime_quant "fp8" beside an integer weight_dtype."""
    weight = options.weight_dtype
    if act is None or weight in ("auto", act, *QUANTIZED_WEIGHT_DTYPES):
        if getattr(options, "runtime_quant", "") == "fp8" and weight in ("int8", "int4"):
            errors.append(
                f'{where}: runtime_quant = "fp8" runs the weights in FP8 but weight_dtype = {fmt_value(weight)} '
                "asks for another format; remove one of them"
            )
        return
    if not explicit:
        options.weight_dtype = act  # e.g. cuda_native's default "bfloat16" with activation_dtype float16
        return
    errors.append(
        f"{where}: weight_dtype = {fmt_value(weight)} with activation_dtype = {fmt_value(act)}: mixed "
        f'precision is not implemented; set weight_dtype = "auto" (or {fmt_value(act)}), or activation_dtype '
        f"= {fmt_value(weight)}"
    )


def parse_config(d: dict, source: str) -> PieConfig:
    """Validates a parsed TOML document and fills in defaults. Raises ConfigError listing every problem."""
    errors: list[str] = []
    for key in d:
        if key not in TOP_LEVEL_KEYS:
            near = difflib.get_close_matches(key, TOP_LEVEL_KEYS, n=1)
            hint = (
                f"; did you mean '{near[0]}'?" if near else " (the file holds [[model]] blocks and [runtime])"
            )
            errors.append(f"top level: unknown key '{key}'{hint}")
    runtime = _check_runtime(errors, d.get("runtime", {}))
    blocks = d.get("model", [])
    if isinstance(blocks, dict):
        errors.append("'model' must be an array of tables: write [[model]] (double brackets)")
        blocks = []
    elif not isinstance(blocks, list) or not all(isinstance(b, dict) for b in blocks):
        errors.append(f"'model' must be an array of [[model]] tables, got {fmt_value(blocks)}")
        blocks = []
    elif not blocks and not errors:
        errors.append("no [[model]] block; add one (`pie config init` writes a working file)")
    models: list[ModelEntry] = []
    seen: dict[str, int] = {}
    for i, block in enumerate(blocks):
        block = dict(block)
        name = block.get("name", "default")
        where = f"model {name!r} (block {i + 1})" if isinstance(name, str) else f"model block {i + 1}"
        driver = _check_driver(errors, block.pop("driver", {}), where)
        vals = check_section(errors, ModelEntry, block, f"{where} [[model]]")
        for key in ("name", "hf_repo"):
            if vals.get(key, "x") == "":
                errors.append(f"{where} [[model]]: '{key}' must not be empty")
        if isinstance(name, str) and name in seen:
            errors.append(
                f"duplicate model name {name!r} (blocks {seen[name] + 1} and {i + 1}); "
                "each [[model]] needs a unique name"
            )
        elif isinstance(name, str):
            seen[name] = i
        if driver is not None:
            models.append(ModelEntry(**vals, driver=driver))
    if errors:
        body = errors[0] if len(errors) == 1 else f"{len(errors)} problems:\n  - " + "\n  - ".join(errors)
        raise ConfigError(f"{source}: {body}")
    _warn_binary_path(models, source)
    return PieConfig(models=models, runtime=runtime, source=source)


def _check_runtime(errors: list[str], raw: Any) -> RuntimeConfig:
    if not isinstance(raw, dict):
        errors.append(f"'runtime' must be a table ([runtime]), got {fmt_value(raw)}")
        return RuntimeConfig()
    return RuntimeConfig(**check_section(errors, RuntimeConfig, raw, "[runtime]"))


def _warn_binary_path(models: list[ModelEntry], source: str) -> None:
    global _warned_binary_path
    used = any(
        isinstance(m.driver.options, CudaNativeOptions) and m.driver.options.binary_path for m in models
    )
    if used and not _warned_binary_path:
        _warned_binary_path = True
        print(f"warning: {source}: 'binary_path' is ignored (cuda_native runs in-process)", file=sys.stderr)


# ---------------------------------------------------------------- files


def _resolve(path: str | Path | None) -> Path:
    return Path(path).expanduser() if path else default_config_path()


def _read_toml(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"no config file at {path}; run `pie config init` to create one") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: invalid TOML: {e}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror}") from None


def load_config(path: str | Path | None = None) -> PieConfig:
    """Loads and validates the config (default $PIE_HOME/config.toml). A missing file is a ConfigError."""
    p = _resolve(path)
    return parse_config(_read_toml(p), str(p))


def load_or_default(path: str | Path | None = None) -> tuple[PieConfig, bool]:
    """(config, True) from the file, or (default_config(), False) when the default file does not exist.

    An explicitly given path that does not exist is an error (a typo should not run defaults).
    """
    p = _resolve(path)
    if path is None and not p.exists():
        return default_config(), False
    return load_config(p), True


def _cuda_available() -> bool:
    import torch  # imported here: `pie config show` on an existing file should not pay for torch

    return bool(torch.cuda.is_available())


def default_config() -> PieConfig:
    """What `pie config init` writes: cuda_native on cuda:0 with CUDA, else dev on cpu;
    Qwen/Qwen3-0.6B when it is in the HF cache, else the embedded model."""
    from pie.models.hub import is_cached

    repo = PREFERRED_REPO if is_cached(PREFERRED_REPO) else EMBEDDED_MODEL_ID
    if _cuda_available():
        driver = DriverConfig("cuda_native", ["cuda:0"], 1, "bfloat16", CudaNativeOptions())
    else:
        driver = DriverConfig("dev", ["cpu"], 1, "float32", DevOptions())
    return PieConfig(models=[ModelEntry(name="default", hf_repo=repo, driver=driver)], source="<defaults>")


def _toml_value(v: Any) -> str:
    if isinstance(v, list):  # one line: tomli_w writes arrays multi-line
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return tomli_w.dumps({"v": v})[len("v = ") :].rstrip("\n")


def _emit(lines: list[str], obj: Any, skip: tuple[str, ...] = ()) -> None:
    for f in fields(obj):
        value = getattr(obj, f.name)
        if f.name in skip or (f.name == "binary_path" and not value):
            continue  # binary_path is only shown when an old config sets it
        lines += textwrap.wrap(f.metadata["help"], 100, initial_indent="# ", subsequent_indent="# ")
        lines.append(f"# {f.name} = (unset)" if value is None else f"{f.name} = {_toml_value(value)}")


def to_toml(cfg: PieConfig) -> str:
    """The config as TOML with every value filled in and each key's help as a comment above it."""
    lines = ["# pie configuration. `pie config show` prints it with defaults; `pie config set` edits it."]
    for m in cfg.models:
        lines.append("\n[[model]]")
        _emit(lines, m, skip=("driver",))
        lines.append("\n[model.driver]")
        _emit(lines, m.driver, skip=("options",))
        lines.append(f"\n[model.driver.options]  # {m.driver.type} options")
        _emit(lines, m.driver.options)
    lines.append("\n[runtime]")
    _emit(lines, cfg.runtime)
    return "\n".join(lines) + "\n"


def write_config(cfg: PieConfig, path: str | Path | None = None) -> Path:
    """Writes `cfg` atomically (a crash never leaves a half-written file). Returns the path."""
    p = _resolve(path)
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".config-", suffix=".toml", dir=p.parent)
    except OSError as e:
        raise ConfigError(home_write_error(p, e)) from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(to_toml(cfg))
        os.replace(tmp, p)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return p


# ---------------------------------------------------------------- edits


def parse_value(raw: str) -> Any:
    """A command-line value: a TOML value when it parses as one (16, 0.9, true, ["cuda:0"]), else the string."""
    try:
        doc = tomllib.loads(f"v = {raw}")
    except tomllib.TOMLDecodeError:
        return raw
    return doc["v"] if list(doc) == ["v"] else raw  # "1\nx = 2" must not smuggle in another key


def _assign(raw: dict, dotted: str, value: Any) -> tuple[dict, str, list[str]]:
    """Sets `dotted` in the raw document; `model` without an index means the first block, and
    index len(models) appends a block. Returns (table, key, path of table keys)."""
    parts = dotted.split(".")
    if not all(parts):
        raise ConfigError(f"bad key {dotted!r}: use a dotted path like model.driver.options.kv_page_size")
    node: Any = raw
    trail: list[str] = []
    i = 0
    while True:
        part = parts[i]
        if isinstance(node, list):
            idx = int(part) if part.isdigit() else 0
            if idx > len(node) or (part.isdigit() and i == len(parts) - 1):
                raise ConfigError(f"bad key {dotted!r}: {len(node)} [[model]] blocks; set a key inside one")
            if idx == len(node):
                node.append({})
            node, i = node[idx], i + part.isdigit()
            continue
        if not isinstance(node, dict):
            raise ConfigError(f"bad key {dotted!r}: '{'.'.join(parts[:i])}' is a value, not a table")
        if i == len(parts) - 1:
            node[part] = value
            return node, part, trail
        node = node.setdefault(part, [] if node is raw and part == "model" else {})
        trail.append(part)
        i += 1


def set_value(path: str | Path | None, dotted: str, raw_value: str) -> tuple[PieConfig, list[str]]:
    """Sets one value by dotted path, validates the result, and only then rewrites the file
    (in canonical form, help comments regenerated). Returns (new config, notes for the user)."""
    p = _resolve(path)
    raw = _read_toml(p)
    table, key, trail = _assign(raw, dotted, parse_value(raw_value))
    notes: list[str] = []
    options = table.get("options")
    if (
        key == "type"
        and trail[-1:] == ["driver"]
        and isinstance(options, dict)
        and table[key] in OPTIONS_BY_TYPE
    ):
        # switching driver type: options only the old type has would be rejected; drop them
        keep = OPTIONS_BY_TYPE[table[key]].__dataclass_fields__
        dropped = [k for k in options if k not in keep and owner_of_option(k)]
        for k in dropped:
            del options[k]
        if dropped:
            notes.append(f"dropped options that {table[key]} does not have: {', '.join(dropped)}")
    cfg = parse_config(raw, str(p))
    write_config(cfg, p)
    return cfg, notes
