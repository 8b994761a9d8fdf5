"""`pie doctor`: check that pie can run here; one ✓/✗ line per check, with a hint for each ✗.

Required checks (exit 1 when one fails): the config loads, the default model resolves to a
supported checkpoint, and the driver it is configured with can run (cuda_native: CUDA and
flashinfer; dev: an interpreter that runs pie's driver). The others are information.
"""

from __future__ import annotations

import json
import platform
from dataclasses import dataclass

from pie.errors import PieError


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    hint: str = ""
    required: bool = True


def register(subparsers, common) -> None:
    p = subparsers.add_parser(
        "doctor",
        parents=[common],
        help="check the platform, GPUs, drivers, config and default model",
        description=__doc__.split("\n\n", 1)[1],
    )
    p.add_argument("--timeout", type=float, default=120.0, help="seconds for the dev interpreter probe")
    p.set_defaults(func=doctor)


def doctor(args) -> int:
    config, config_checks = _config(args.config)
    types = {e.driver.type for e in config.models} if config else set()
    checks = [Check("platform", True, f"{platform.platform()}, Python {platform.python_version()}")]
    checks += _gpus()
    checks += _cuda_native("cuda_native" in types)
    checks += (
        _dev(config, args.timeout)
        if "dev" in types
        else [Check("dev driver", True, "not used by the config", required=False)]
    )
    checks += config_checks
    if config is not None:
        checks += _default_model(config)
        checks += _tensor_parallel(config)
    failed = [c for c in checks if c.required and not c.ok]
    width = max(len(c.name) for c in checks)
    for c in checks:
        mark = "✓" if c.ok else ("✗" if c.required else "!")
        print(f"{mark} {c.name:<{width}}  {c.detail}")
        if not c.ok and c.hint:
            print(f"  {'':<{width}}  hint: {c.hint}")
    print("everything pie needs is in place" if not failed else f"{len(failed)} required check(s) failed")
    return 1 if failed else 0


def _gpus() -> list[Check]:
    try:
        import torch
    except ImportError as e:
        return [Check("torch", False, f"not importable: {e}", "pip install torch (see pytorch.org)")]
    out = [Check("torch", True, torch.__version__)]
    if not torch.cuda.is_available():
        why = "CPU-only torch build" if torch.version.cuda is None else "no CUDA device visible"
        return out + [
            Check(
                "GPUs",
                False,
                f"none ({why})",
                "the dev driver runs on CPU; cuda_native needs CUDA",
                required=False,
            )
        ]
    names = []
    for i in range(torch.cuda.device_count()):
        prop = torch.cuda.get_device_properties(i)
        names.append(f"cuda:{i} {prop.name} ({prop.total_memory / 2**30:.0f} GiB)")
    return out + [Check("GPUs", True, "; ".join(names) + f", CUDA {torch.version.cuda}", required=False)]


def _cuda_native(required: bool) -> list[Check]:
    need = "" if required else " (not used by the config)"
    try:
        import torch

        cuda = torch.cuda.is_available()
    except ImportError:
        cuda = False
    if not cuda:
        return [
            Check(
                "cuda_native",
                False,
                "CUDA is not available" + need,
                'use a CUDA build of torch on a GPU machine, or the dev driver (driver.type = "dev")',
                required=required,
            )
        ]
    try:
        import flashinfer

        ver = getattr(flashinfer, "__version__", "unknown version")
    except Exception as e:  # ImportError, or a broken install raising something else
        return [
            Check(
                "cuda_native",
                False,
                f"CUDA ok, flashinfer not importable ({type(e).__name__}: {e}){need}",
                "pip install flashinfer-python==0.6.3 apache-tvm-ffi==0.1.15.post2 einops",
                required=required,
            )
        ]
    return [Check("cuda_native", True, f"CUDA and flashinfer {ver}{need}", required=required)]


def _dev(config, timeout: float) -> list[Check]:
    try:
        from pie.cli.driver_cmd import doctor_lines, run_probe
        from pie.drivers.dev.interpreter import resolve_python
    except ImportError as e:
        return [Check("dev driver", False, f"not available in this pie ({e})", "reinstall pie")]
    out = []
    for entry in (m for m in config.models if m.driver.type == "dev"):
        o = entry.driver.options
        name = f"dev ({entry.name})"
        try:
            python, rule = resolve_python(o.venv, o.python)
            probe = run_probe(python, timeout)
        except PieError as e:
            out.append(
                Check(name, False, str(e), "pie driver dev install --run, or pie driver dev set python PATH")
            )
            continue
        lines = doctor_lines(python, rule, probe)
        bad = [text for ok, required, text in lines if required and not ok]
        detail = f"{python} (chosen by {rule})"
        out.append(
            Check(name, not bad, detail if not bad else f"{detail}: {bad[0]}", "pie driver dev doctor")
        )
    return out


def _config(path) -> tuple[object | None, list[Check]]:
    from pie.config import load_or_default
    from pie.paths import default_config_path

    where = path or default_config_path()
    try:
        config, found = load_or_default(path)
    except PieError as e:
        return None, [Check("config", False, str(e), "fix the file, or recreate it with `pie config init`")]
    if not found:
        return config, [
            Check("config", True, f"no file at {where}: using the defaults (pie config init writes one)")
        ]
    return config, [Check("config", True, f"{where}: valid, {len(config.models)} model(s)")]


def _tensor_parallel(config) -> list[Check]:
    """Each model configured with tensor_parallel_size > 1: its ranks, their devices, and each rank's weight
    bytes and KV bytes per page (its shard, sized on the meta device), or why the model does not split."""
    from pie.drivers.tp import layout_estimate
    from pie.models.hub import resolve_model_dir

    out = []
    for entry in config.models:
        d = entry.driver
        if d.tensor_parallel_size == 1:
            continue
        name = f"tensor parallel ({entry.name})"
        try:
            path = resolve_model_dir(entry.hf_repo)
            page = getattr(d.options, "kv_page_size", 32)
            layout = layout_estimate(str(path), d.tensor_parallel_size, d.activation_dtype, page)
        except PieError as e:
            out.append(
                Check(name, False, str(e), "set a tensor_parallel_size that divides the model's heads")
            )
            continue
        missing = _missing_devices(d.device)
        ranks = ", ".join(
            f"rank {r['rank']} {dev}: weights {r['weights_bytes'] / 2**30:.2f} GiB, "
            f"KV {r['kv_page_bytes'] / 2**10:.0f} KiB/page of {page}"
            for r, dev in zip(layout, d.device, strict=True)
        )
        detail = f"{d.tensor_parallel_size} ranks, one process each: {ranks}"
        if missing:
            out.append(
                Check(
                    name,
                    False,
                    f"{detail}; not visible here: {', '.join(missing)}",
                    "list devices that exist",
                )
            )
        else:
            out.append(Check(name, True, detail))
    return out


def _missing_devices(devices: list[str]) -> list[str]:
    """The CUDA devices of `devices` that torch cannot see here."""
    try:
        import torch

        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    except ImportError:
        count = 0
    return [dev for dev in devices if dev.startswith("cuda") and int(dev.partition(":")[2] or 0) >= count]


def _default_model(config) -> list[Check]:
    from pie.models.hub import resolve_model_dir

    entry = config.default_model
    name = f"default model ({entry.name})"
    try:
        path = resolve_model_dir(entry.hf_repo)
        model_type = json.loads((path / "config.json").read_text()).get("model_type")
    except PieError as e:
        return [Check(name, False, str(e), "pie model download REPO, or set hf_repo to a local directory")]
    except (OSError, ValueError) as e:
        return [Check(name, False, f"{entry.hf_repo}: unreadable config.json ({e})", "re-download the model")]
    from pie.models.check import model_dir_problems

    # the checks behind ✓ in `pie model list`: config normalizes, tokenizer files, safetensors headers
    problems = model_dir_problems(path)
    if problems:
        return [Check(name, False, f"{entry.hf_repo}: " + "; ".join(problems))]
    return [Check(name, True, f"{entry.hf_repo} -> {path} ({model_type}, {entry.driver.type} driver)")]
