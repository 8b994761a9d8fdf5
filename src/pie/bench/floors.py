"""Lower bounds ("floors") on step time, from the model's shape and the device's measured ceilings.

Pure functions of an HF config dict (config.json as loaded; field names as in transformers), so they are
unit tested on CPU with exact figures. The parameter count covers the decoder families pie runs (llama,
qwen2, qwen3, mistral, phi3, and the MoE ones below): per layer q/k/v/o projections (+ biases), qk-norm
scales (qwen3, qwen3_moe), a gated MLP (gate, up, down), two RMSNorms; plus the embedding, a final norm and
the LM head (absent when tied).

Decode is memory bound: one step reads every weight once, where the LM head reads the full embedding
matrix when tied (counted once), while the embedding lookup itself reads only the batch's rows (ignored),
plus the K and V of every sequence. Prefill is compute bound: 2 flops per weight per token for the
projections and MLP, the LM head only for the rows whose logits are computed, plus causal attention.

Sparse MoE layers (mixtral, qwen3_moe: `num_local_experts` / `num_experts`, `num_experts_per_tok`,
`moe_intermediate_size`, `decoder_sparse_step`, `mlp_only_layers`): the router and experts replace the
dense MLP. A step reads only the experts its tokens are routed to: k of E at batch 1, approaching all E as
the batch grows. The floors count the expected number of distinct experts that B tokens touch when each
picks k of E uniformly, E * (1 - (1 - k / E)^B) (exactly k at B = 1; ~E for B >> E / k), which is what
random-weight benchmarks route like; skewed real routing touches fewer. Compute counts k experts per token.
GPT-OSS (gpt_oss / gptoss) adds a sink logit per query head, a router bias and biases on both expert
projections (2 I + H per expert). Sliding-window layers are counted as full attention.

Hybrid models (qwen3_5_text): Gated DeltaNet layers (`layer_types` "linear_attention") have no KV; their
mixer is the fused in-projection (q|k|v, z, b, a), the depthwise conv, dt_bias, A_log, the gated norm and
out_proj; full-attention layers' q_proj is twice as wide (the output gate). attention_per_layer is then the
mean over layers. A decode step also reads and writes every sequence's recurrent state (conv window in the
activation dtype, delta state in fp32).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ParamCounts:
    embedding: int  # vocab * hidden
    lm_head: int  # vocab * hidden, 0 when tied to the embedding
    attention_per_layer: int  # q, k, v, o (+ biases, + qk-norm scales)
    mlp_per_layer: int  # gate, up, down
    norms_per_layer: int  # input and post-attention RMSNorm
    final_norm: int
    num_layers: int
    # sparse MoE layers: their MLP is a router plus experts instead of mlp_per_layer
    num_sparse_layers: int = 0
    router_per_layer: int = 0  # num_experts * hidden
    expert_params: int = 0  # one expert: gate, up, down
    num_experts: int = 0
    experts_per_token: int = 0

    @property
    def per_layer(self) -> int:
        return self.attention_per_layer + self.mlp_per_layer + self.norms_per_layer

    def _layers(self, experts: float) -> float:
        """All decoder layers' parameters when each sparse layer holds `experts` experts."""
        dense = self.num_layers - self.num_sparse_layers
        sparse = self.attention_per_layer + self.norms_per_layer + self.router_per_layer
        return dense * self.per_layer + self.num_sparse_layers * (sparse + experts * self.expert_params)

    @property
    def total(self) -> int:
        """Distinct parameters (a tied LM head is the embedding, counted once)."""
        return int(self.embedding + self.lm_head + self._layers(self.num_experts) + self.final_norm)

    def experts_touched(self, tokens: int) -> float:
        """Expected distinct experts per sparse layer that `tokens` tokens route to (uniform top-k)."""
        if not self.num_sparse_layers:
            return 0.0
        E, k = self.num_experts, self.experts_per_token
        return E * (1.0 - (1.0 - k / E) ** max(tokens, 1))

    def read_per_step(self, tokens: int = 1) -> float:
        """Parameters one step over `tokens` tokens reads: all layers (of MoE layers only the experts the
        tokens touch), the final norm, and the LM head matrix once."""
        return self._layers(self.experts_touched(tokens)) + self.final_norm + self.lm_head_matrix

    @property
    def read_per_decode_step(self) -> int:
        """Parameters a batch-1 decode step reads (for MoE: k experts per sparse layer)."""
        return int(self.read_per_step(1))

    @property
    def lm_head_matrix(self) -> int:
        """Size of the matrix the LM head multiplies by (the embedding when tied)."""
        return self.lm_head or self.embedding

    @property
    def matmul_per_token(self) -> int:
        """Weights every token multiplies through in the decoder layers (no norms, no LM head; for MoE
        layers the router and its k experts)."""
        dense = self.num_layers - self.num_sparse_layers
        sparse = (
            self.attention_per_layer + self.router_per_layer + self.experts_per_token * self.expert_params
        )
        return dense * (self.attention_per_layer + self.mlp_per_layer) + self.num_sparse_layers * sparse


def _head_dim(cfg: dict) -> int:
    return int(cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"])


def _num_kv_heads(cfg: dict) -> int:
    return int(cfg.get("num_key_value_heads") or cfg["num_attention_heads"])


def _linear_layers(cfg: dict) -> int:
    return sum(1 for t in cfg.get("layer_types") or [] if t == "linear_attention")


def _gdn_shape(cfg: dict) -> tuple[int, int, int, int, int]:
    """Gated DeltaNet (conv_dim, value_dim, value heads, dk, dv) of a hybrid config."""
    hk, hv = int(cfg.get("linear_num_key_heads", 16)), int(cfg.get("linear_num_value_heads", 32))
    dk, dv = int(cfg.get("linear_key_head_dim", 128)), int(cfg.get("linear_value_head_dim", 128))
    return 2 * hk * dk + hv * dv, hv * dv, hv, dk, dv


def recurrent_state_bytes(cfg: dict, dtype_bytes: int = 2) -> int:
    """Bytes of one sequence's recurrent state across the linear-attention layers (0 for other models)."""
    n = _linear_layers(cfg)
    if not n:
        return 0
    conv_dim, _, hv, dk, dv = _gdn_shape(cfg)
    k = int(cfg.get("linear_conv_kernel_dim", 4))
    return n * (conv_dim * (k - 1) * dtype_bytes + hv * dk * dv * 4)


def param_counts(cfg: dict) -> ParamCounts:
    """Parameter counts of a dense decoder from its HF config dict."""
    hidden, vocab = int(cfg["hidden_size"]), int(cfg["vocab_size"])
    heads, kv_heads, hd = int(cfg["num_attention_heads"]), _num_kv_heads(cfg), _head_dim(cfg)
    model_type = cfg.get("model_type", "")
    q_out, kv_out = heads * hd, kv_heads * hd
    attn = hidden * q_out + 2 * hidden * kv_out + q_out * hidden
    # qwen2 always has q/k/v biases (no flag in its config); others follow `attention_bias` (also on o).
    if model_type == "qwen2":
        attn += q_out + 2 * kv_out
    elif cfg.get("attention_bias"):
        attn += q_out + 2 * kv_out + hidden
    if model_type in ("qwen3", "qwen3_moe"):
        attn += 2 * hd  # q_norm and k_norm scales, shared across heads
    gpt_oss = model_type in ("gpt_oss", "gptoss")
    if gpt_oss:
        attn += heads  # sink logits
    n_linear = _linear_layers(cfg)
    if n_linear:  # hybrid: gated q_proj on the attention layers, Gated DeltaNet on the others
        layers = int(cfg["num_hidden_layers"])
        full = attn + hidden * q_out + 2 * hd  # the gate half of q_proj, q/k norms
        conv_dim, value_dim, hv, _, dv = _gdn_shape(cfg)
        k = int(cfg.get("linear_conv_kernel_dim", 4))
        gdn = hidden * (conv_dim + value_dim + 2 * hv) + conv_dim * k + 2 * hv + dv + value_dim * hidden
        attn = round(((layers - n_linear) * full + n_linear * gdn) / layers)
    inter = int(cfg["intermediate_size"])
    mlp = 3 * hidden * inter + (2 * inter + hidden if cfg.get("mlp_bias") else 0)
    tied = bool(cfg.get("tie_word_embeddings", False))
    sparse, E, k, expert_inter = _moe_shape(cfg)
    return ParamCounts(
        embedding=vocab * hidden,
        lm_head=0 if tied else vocab * hidden,
        attention_per_layer=attn,
        mlp_per_layer=mlp,
        norms_per_layer=2 * hidden,
        final_norm=hidden,
        num_layers=int(cfg["num_hidden_layers"]),
        num_sparse_layers=sparse,
        router_per_layer=(E * hidden + (E if gpt_oss else 0)) if sparse else 0,
        expert_params=(3 * hidden * expert_inter + (2 * expert_inter + hidden if gpt_oss else 0))
        if sparse
        else 0,
        num_experts=E if sparse else 0,
        experts_per_token=k if sparse else 0,
    )


def _moe_shape(cfg: dict) -> tuple[int, int, int, int]:
    """(sparse layers, experts, experts per token, expert intermediate size); zeros for a dense model.
    Which layers are sparse follows transformers: all (mixtral), or qwen3_moe's step / mlp_only rule."""
    E = int(cfg.get("num_local_experts") or cfg.get("num_experts") or 0)
    if E <= 0:
        return 0, 0, 0, 0
    layers = int(cfg["num_hidden_layers"])
    step = int(cfg.get("decoder_sparse_step") or 1)
    mlp_only = set(cfg.get("mlp_only_layers") or [])
    sparse = sum(1 for i in range(layers) if i not in mlp_only and (i + 1) % step == 0)
    inter = int(cfg.get("moe_intermediate_size") or cfg["intermediate_size"])
    return sparse, E, int(cfg["num_experts_per_tok"]), inter


def kv_bytes_per_token(cfg: dict, dtype_bytes: int = 2) -> int:
    """Bytes of K and V of one token across all layers (hybrid models: the attention layers only)."""
    layers = int(cfg["num_hidden_layers"]) - _linear_layers(cfg)
    return 2 * layers * _num_kv_heads(cfg) * _head_dim(cfg) * dtype_bytes


def decode_weight_bytes(cfg: dict, dtype_bytes: int = 2, batch: int = 1) -> int:
    """Weight bytes one decode step of `batch` tokens reads (the LM head / tied embedding once; MoE: the
    experts those tokens are expected to touch)."""
    return int(param_counts(cfg).read_per_step(batch) * dtype_bytes)


def decode_step_bytes(cfg: dict, batch: int, mean_kv_len: float, dtype_bytes: int = 2) -> float:
    """Bytes one decode step of `batch` sequences must move: weights once + every sequence's KV (+ its
    recurrent state, read and written, for hybrid models)."""
    weights = decode_weight_bytes(cfg, dtype_bytes, batch)
    state = 2 * recurrent_state_bytes(cfg, dtype_bytes)
    return weights + batch * (mean_kv_len * kv_bytes_per_token(cfg, dtype_bytes) + state)


def decode_floor_s(
    cfg: dict, batch: int, mean_kv_len: float, bandwidth_bps: float, dtype_bytes: int = 2
) -> float:
    """Shortest possible decode step (seconds) at the measured memory bandwidth (bytes/s)."""
    return decode_step_bytes(cfg, batch, mean_kv_len, dtype_bytes) / bandwidth_bps


def attention_flops(cfg: dict, qo_lens: list[int], kv_lens: list[int]) -> float:
    """Causal attention flops (QK^T and PV, 2 flops per multiply-add) over all layers.

    A request with n new tokens over kv_len slots scores sum_i (kv_len - n + i + 1) pairs, i < n.
    """
    heads, hd, layers = int(cfg["num_attention_heads"]), _head_dim(cfg), int(cfg["num_hidden_layers"])
    pairs = sum(n * (kv - n) + n * (n + 1) / 2 for n, kv in zip(qo_lens, kv_lens, strict=True))
    return 4.0 * layers * heads * hd * pairs


def prefill_flops(cfg: dict, qo_lens: list[int], kv_lens: list[int], num_outputs: int) -> float:
    """Flops of one prefill pass: projections and MLP for every token, the LM head for output rows only."""
    pc = param_counts(cfg)
    tokens = sum(qo_lens)
    return (
        2.0 * pc.matmul_per_token * tokens
        + 2.0 * pc.lm_head_matrix * num_outputs
        + attention_flops(cfg, qo_lens, kv_lens)
    )


def prefill_bytes(cfg: dict, qo_lens: list[int], kv_lens: list[int], dtype_bytes: int = 2) -> float:
    """Bytes a prefill pass must move at least: weights once, KV written for new tokens, KV read once."""
    kvb = kv_bytes_per_token(cfg, dtype_bytes)
    weights = decode_weight_bytes(cfg, dtype_bytes, sum(qo_lens))
    return weights + kvb * (sum(qo_lens) + sum(kv_lens))


def prefill_floor_s(
    cfg: dict,
    qo_lens: list[int],
    kv_lens: list[int],
    num_outputs: int,
    matmul_flops_per_s: float,
    bandwidth_bps: float,
    dtype_bytes: int = 2,
) -> float:
    """Shortest possible prefill pass: the larger of its compute time and its memory time."""
    compute = prefill_flops(cfg, qo_lens, kv_lens, num_outputs) / matmul_flops_per_s
    memory = prefill_bytes(cfg, qo_lens, kv_lens, dtype_bytes) / bandwidth_bps
    return max(compute, memory)
