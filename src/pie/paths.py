"""Where pie keeps its files."""

import os
from pathlib import Path


def pie_home() -> Path:
    """$PIE_HOME, default ~/.pie."""
    return Path(os.environ.get("PIE_HOME") or Path.home() / ".pie").expanduser()


def home_write_error(path: Path, e: OSError) -> str:
    """The message for a file pie could not write under $PIE_HOME (or elsewhere)."""
    why = e.strerror or str(e)
    where = f"{e.filename}: " if e.filename and str(e.filename) != str(path) else ""
    return (
        f"cannot write {path} ({where}{why}); $PIE_HOME ({pie_home()}) must be a writable directory: "
        "fix its permissions or set PIE_HOME to another one"
    )


def default_config_path() -> Path:
    return pie_home() / "config.toml"


def assets_dir() -> Path:
    return Path(__file__).parent / "assets"


def embedded_model_dir() -> Path:
    """The small Qwen3-architecture model pie ships (see scripts/train_default_model.py)."""
    return assets_dir() / "default-model"


# The hf_repo value that names the embedded model in config files.
EMBEDDED_MODEL_ID = "pie/embedded-default"
