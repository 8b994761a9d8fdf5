"""Where pie keeps its files."""

import os
from pathlib import Path


def pie_home() -> Path:
    """$PIE_HOME, default ~/.pie."""
    return Path(os.environ.get("PIE_HOME") or Path.home() / ".pie").expanduser()


def default_config_path() -> Path:
    return pie_home() / "config.toml"


def assets_dir() -> Path:
    return Path(__file__).parent / "assets"


def embedded_model_dir() -> Path:
    """The small Qwen3-architecture model pie ships (see scripts/train_default_model.py)."""
    return assets_dir() / "default-model"


# The hf_repo value that names the embedded model in config files.
EMBEDDED_MODEL_ID = "pie/embedded-default"
