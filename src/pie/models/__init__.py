"""Model families (one file each), their normalized config, the model_type registry and the weight loader."""

from pie.models.config import ModelConfig
from pie.models.registry import get_model_class, supported_model_types

__all__ = ["ModelConfig", "get_model_class", "supported_model_types"]
