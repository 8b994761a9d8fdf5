"""Llama 2 / 3 / 3.1 / 3.2 (and Mistral without sliding window).

Pre-norm decoder: RMSNorm, GQA attention with RoPE (llama3 frequency scaling when configured),
SwiGLU MLP; `attention_bias` puts a bias on q/k/v/o.
"""

from __future__ import annotations

from pie.layers.decoder import CausalLM
from pie.models.config import ModelConfig


class LlamaForCausalLM(CausalLM):
    def __init__(self, config: ModelConfig) -> None:
        assert not config.has_qk_norm, "llama family has no qk-norm"
        super().__init__(config)
