"""pie's configuration file ($PIE_HOME/config.toml): typed schema (schema.py) and loader (loader.py)."""

from pie.config.loader import (
    default_config,
    load_config,
    load_or_default,
    parse_config,
    parse_value,
    set_value,
    to_toml,
    write_config,
)
from pie.config.schema import (
    OPTIONS_BY_TYPE,
    CudaNativeOptions,
    DevOptions,
    DriverConfig,
    ModelEntry,
    PieConfig,
    RuntimeConfig,
)

__all__ = [
    "OPTIONS_BY_TYPE",
    "CudaNativeOptions",
    "DevOptions",
    "DriverConfig",
    "ModelEntry",
    "PieConfig",
    "RuntimeConfig",
    "default_config",
    "load_config",
    "load_or_default",
    "parse_config",
    "parse_value",
    "set_value",
    "to_toml",
    "write_config",
]
