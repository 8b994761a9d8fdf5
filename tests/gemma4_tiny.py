"""Tiny random Gemma 4 checkpoints written through transformers (tokenizer from tests/tiny_models.py).

Archs:
  gemma4_text  every quirk on: 10 layers [s s f s s f | s f s f], the last 4 KV-shared (sliding ones read
               layer 4's cache, full ones layer 5's), sliding window 6, head_dim 16 / global head_dim 32 with 1
               global KV head and attention_k_eq_v, per-layer embeddings (P = 8), double-wide MLP on the
               shared layers, the MoE block (4 experts, top-2), proportional rope with partial factor 0.25
               and factor 2 on global layers, final logit soft-cap 5. Config as transformers 5.24 writes it
               (per_layer_config).
  gemma4       the multimodal wrapper (tiny vision tower beside the text tower), E2B-like text: no MoE, no
               k_eq_v (v_proj on global layers), 2 KV heads everywhere; config.json rewritten to the hub's
               layout (global_head_dim, num_global_key_value_heads, no per_layer_config).
Norm scales, layer scalars and router scales are random (1 + 0.2 N(0, 1)), linears std 0.12 / 0.15, so a tensor wired
to the wrong place changes the logits.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tiny_models import SPECIAL_TOKENS, WINDOW, _train_tokenizer, save_tokenizer

GEMMA4_ARCHS = ("gemma4_text", "gemma4")
LAYERS = ["sliding_attention", "sliding_attention", "full_attention"] * 2 + [
    "sliding_attention",
    "full_attention",
] * 2
NUM_SHARED = 4


def _text_config(arch: str, vocab: int, special: dict[str, int], overrides: dict):
    import transformers as tf

    full = arch == "gemma4_text"
    kw = dict(
        vocab_size=vocab,
        vocab_size_per_layer_input=vocab,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=len(LAYERS),
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        global_head_dim=32,
        max_position_embeddings=512,
        rms_norm_eps=1e-6,
        # std 0.15 as tiny_models; 0.12 with the MoE block, whose 10 layers at 0.15 amplify fp32 rounding to
        # ~1e-4 (transformers' own cached decode then differs from its full forward by as much)
        initializer_range=0.12 if full else 0.15,
        bos_token_id=special["<|endoftext|>"],
        eos_token_id=special["<|im_end|>"],
        pad_token_id=special["<|endoftext|>"],
        layer_types=list(LAYERS),
        sliding_window=WINDOW,
        num_kv_shared_layers=NUM_SHARED,
        hidden_size_per_layer_input=8,
        use_double_wide_mlp=True,
        final_logit_softcapping=5.0,
        rope_parameters={
            "full_attention": {
                "rope_type": "proportional",
                "partial_rotary_factor": 0.25,
                "factor": 2.0,
                "rope_theta": 1_000_000.0,
            },
            "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
        },  # fmt: skip
    )
    if full:
        kw.update(attention_k_eq_v=True, num_global_key_value_heads=1, enable_moe_block=True, num_experts=4,
                  top_k_experts=2, moe_intermediate_size=32)  # fmt: skip
    kw.update(overrides)
    return tf.Gemma4TextConfig(**kw)


def make_gemma4_checkpoint(dirpath: str | Path, arch: str, **overrides) -> Path:
    """Write a seeded tiny Gemma 4 checkpoint (see the module docstring) into dirpath; return it."""
    import transformers as tf

    out = Path(dirpath)
    out.mkdir(parents=True, exist_ok=True)
    tok = _train_tokenizer()
    special = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
    text = _text_config(arch, tok.get_vocab_size(), special, overrides)
    if arch == "gemma4_text":
        config, cls = text, tf.AutoModelForCausalLM
    elif arch == "gemma4":
        vision = dict(model_type="gemma4_vision", hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, head_dim=8, patch_size=4,
                      position_embedding_size=64)  # fmt: skip
        config = tf.Gemma4Config(text_config=text.to_dict(), vision_config=vision, audio_config=None)
        cls = tf.AutoModelForImageTextToText
    else:
        raise ValueError(f"unknown Gemma 4 arch {arch!r}; choose from {GEMMA4_ARCHS}")
    torch.manual_seed(0)
    model = cls.from_config(config, dtype=torch.float32)
    gen = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("norm.weight", "layer_scalar", "router.scale", "per_expert_scale")):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
        for (
            name,
            b,
        ) in model.named_buffers():  # layer_scalar is a buffer in transformers, saved with the weights
            if name.endswith("layer_scalar"):
                b.copy_(1.0 + 0.2 * torch.randn(b.shape, generator=gen))
    model.save_pretrained(out, safe_serialization=True)
    if (
        arch == "gemma4"
    ):  # the hub's layout: global_head_dim / num_global_key_value_heads, no per_layer_config
        path = out / "config.json"
        cfg = json.loads(path.read_text())
        tc = cfg["text_config"]
        tc.pop("per_layer_config", None)
        tc.update(global_head_dim=text.per_layer_config[2].head_dim, num_global_key_value_heads=None)
        path.write_text(json.dumps(cfg, indent=2))
    save_tokenizer(tok, out)
    return out
