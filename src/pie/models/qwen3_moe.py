"""Qwen3-MoE (model_type qwen3_moe): the Qwen3 block (per-head q/k RMSNorm) with sparse MoE MLPs.

Which layers are sparse (transformers' Qwen3MoeDecoderLayer): layer i is an MoE layer unless i is in
`mlp_only_layers`, when `num_experts` > 0 and (i + 1) % `decoder_sparse_step` == 0; the others keep a dense
SwiGLU MLP of `intermediate_size`. Router: softmax over the experts in fp32, the top `num_experts_per_tok`,
renormalized only when `norm_topk_prob`, then cast to the activation dtype. Experts have
`moe_intermediate_size`. Qwen3-MoE has no shared expert (that is Qwen2-MoE); a config that declares one is
rejected. The expert count is `num_experts` in hub config.json files and `num_local_experts` in what
transformers 5 writes; both are read.
"""

from __future__ import annotations

from pie.errors import ModelError
from pie.layers.decoder import CausalLM
from pie.models.config import ModelConfig, MoEConfig
from pie.models.llama import dense_config
from pie.models.mixtral import check_top_k, int_field
from pie.models.qwen2 import reject_qwen_sliding


def qwen3_moe_config(d: dict) -> ModelConfig:
    if d.get("shared_expert_intermediate_size"):
        raise ModelError(
            "qwen3_moe config declares a shared expert; that is the qwen2_moe layout, not supported"
        )
    reject_qwen_sliding(d)
    num_layers = int_field(d, "num_hidden_layers")
    num_experts = int_field(d, "num_experts", "num_local_experts")
    step = int(d.get("decoder_sparse_step") or 1)
    mlp_only = set(d.get("mlp_only_layers") or [])
    sparse = tuple(
        i for i in range(num_layers) if i not in mlp_only and num_experts > 0 and (i + 1) % step == 0
    )
    moe = None
    if sparse:
        top_k = int_field(d, "num_experts_per_tok")
        check_top_k(top_k, num_experts)
        moe = MoEConfig(
            num_experts=num_experts,
            top_k=top_k,
            expert_intermediate_size=int_field(d, "moe_intermediate_size"),
            renormalize=bool(d.get("norm_topk_prob", False)),
            weights_in_activation_dtype=True,
        )
    return dense_config(d, has_qk_norm=True, moe=moe, sparse_layers=sparse)


class Qwen3MoeForCausalLM(CausalLM):
    config_from_hf = staticmethod(qwen3_moe_config)
    expert_params_mapping = {
        "gate_proj": ("gate_up_proj", "gate"),
        "up_proj": ("gate_up_proj", "up"),
        "down_proj": ("down_proj", "down"),
    }
