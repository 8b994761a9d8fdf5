"""`pie bench`: how fast the executor runs a model, beside the floors the device allows.

floors.py (pure bounds from the model shape), runner.py (batches, timing, ceilings), report.py (record and
table). Bundled model configs (configs/NAME.json, the real shapes of public models) let a benchmark run with
random weights and no download.
"""

from __future__ import annotations

import json
from pathlib import Path

from pie.errors import ConfigError

CONFIGS_DIR = Path(__file__).parent / "configs"


def bundled_configs() -> list[str]:
    """Names accepted by `--model-config NAME`."""
    return sorted(p.stem for p in CONFIGS_DIR.glob("*.json"))


def load_model_config(arg: str) -> tuple[dict, str]:
    """(HF config dict, display name) for a bundled config name, a config .json file, or a model directory."""
    path = Path(arg).expanduser()
    if arg in bundled_configs():
        path = CONFIGS_DIR / f"{arg}.json"
    elif path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise ConfigError(
            f"model config {arg!r} is neither a bundled config ({', '.join(bundled_configs())}) nor a .json file "
            "or a directory holding config.json"
        )
    try:
        cfg = json.loads(path.read_text())
    except ValueError as e:
        raise ConfigError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(cfg, dict) or "model_type" not in cfg:
        raise ConfigError(f"{path} is not a Hugging Face model config (no model_type)")
    name = arg if arg in bundled_configs() else path.parent.name if path.name == "config.json" else path.stem
    return cfg, name
