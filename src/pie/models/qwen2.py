"""Qwen2 / Qwen2.5: the Llama block with a bias on q/k/v (none on o_proj; config.json carries no flag for it)."""

from __future__ import annotations

from pie.errors import ModelError
from pie.layers.decoder import CausalLM
from pie.models.config import ModelConfig
from pie.models.llama import dense_config


def reject_qwen_sliding(d: dict) -> None:
    """Qwen2/Qwen3 carry a sliding_window value but use it only with use_sliding_window (never on the hub's
    released checkpoints); that layout (windows from max_window_layers on) is not implemented."""
    if d.get("use_sliding_window"):
        raise ModelError(
            f"{d['model_type']} checkpoint sets use_sliding_window, which pie does not implement for this "
            "family; set it to false (the released checkpoints do)"
        )


def qwen2_config(d: dict) -> ModelConfig:
    reject_qwen_sliding(d)
    return dense_config(d, qkv_bias=True)


class Qwen2ForCausalLM(CausalLM):
    config_from_hf = staticmethod(qwen2_config)
