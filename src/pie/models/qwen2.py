"""Qwen2 / Qwen2.5: the Llama block with a bias on q/k/v (none on o_proj); ModelConfig sets the flags."""

from __future__ import annotations

from pie.layers.decoder import CausalLM
from pie.models.config import ModelConfig


class Qwen2ForCausalLM(CausalLM):
    def __init__(self, config: ModelConfig) -> None:
        assert config.has_qkv_bias and not config.has_o_bias, "qwen2 has bias on q/k/v only"
        super().__init__(config)
