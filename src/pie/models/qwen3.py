"""Qwen3 (dense): the Llama block plus a per-head RMSNorm on q and k before RoPE (q_norm, k_norm);
no q/k/v bias unless `attention_bias`."""

from __future__ import annotations

from pie.layers.decoder import CausalLM
from pie.models.config import ModelConfig


class Qwen3ForCausalLM(CausalLM):
    def __init__(self, config: ModelConfig) -> None:
        assert config.has_qk_norm, "qwen3 needs per-head q/k norms"
        super().__init__(config)
