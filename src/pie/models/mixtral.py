"""Mixtral (model_type mixtral): the Llama/Mistral block with a sparse MoE MLP on every layer.

Router: softmax over all experts in fp32, the top `num_experts_per_tok`, renormalized to sum to 1; the
weights stay fp32 when scaling the experts' outputs (transformers' MixtralTopKRouter). Experts are SwiGLU
(w1 gate, w3 up, w2 down). Hub checkpoints store them per expert under `block_sparse_moe.experts.{e}`;
transformers 5's in-memory layout (`mlp.experts.gate_up_proj` [E, 2I, H], `mlp.experts.down_proj`
[E, H, I]) is pie's and loads 1:1. `sliding_window`, when set, windows every layer (as transformers).
"""

from __future__ import annotations

from pie.errors import ModelError
from pie.layers.decoder import CausalLM
from pie.models.config import ModelConfig, MoEConfig
from pie.models.llama import dense_config


def int_field(d: dict, *keys: str) -> int:
    """The first of `keys` that config.json sets to an integer (families spell expert counts differently)."""
    for key in keys:
        if isinstance(d.get(key), int):
            return d[key]
    raise ModelError(f"config.json ({d.get('model_type')}) lacks the integer field {' / '.join(keys)}")


def check_top_k(top_k: int, num_experts: int) -> None:
    if not 0 < top_k <= num_experts:
        raise ModelError(f"num_experts_per_tok {top_k} must be in 1..{num_experts} (the number of experts)")


def mixtral_config(d: dict) -> ModelConfig:
    num_experts = int_field(d, "num_local_experts", "num_experts")
    top_k = int_field(d, "num_experts_per_tok")
    check_top_k(top_k, num_experts)
    moe = MoEConfig(
        num_experts=num_experts,
        top_k=top_k,
        expert_intermediate_size=int_field(d, "intermediate_size"),
        renormalize=True,
        weights_in_activation_dtype=False,
    )
    return dense_config(d, moe=moe, sparse_layers=tuple(range(int_field(d, "num_hidden_layers"))))


class MixtralForCausalLM(CausalLM):
    config_from_hf = staticmethod(mixtral_config)
    checkpoint_renames = {".block_sparse_moe.": ".mlp."}
    expert_params_mapping = {
        "w1": ("gate_up_proj", "gate"),
        "w3": ("gate_up_proj", "up"),
        "w2": ("down_proj", "down"),
    }
