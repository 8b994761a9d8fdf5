"""Qwen3 (dense): the Llama block plus a per-head RMSNorm on q and k before RoPE (q_norm, k_norm);
no q/k/v bias unless `attention_bias`."""

from __future__ import annotations

from pie.layers.decoder import CausalLM
from pie.models.config import ModelConfig
from pie.models.llama import dense_config
from pie.models.qwen2 import reject_qwen_sliding


def qwen3_config(d: dict) -> ModelConfig:
    reject_qwen_sliding(d)
    return dense_config(d, has_qk_norm=True)


class Qwen3ForCausalLM(CausalLM):
    config_from_hf = staticmethod(qwen3_config)
