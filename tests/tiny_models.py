"""Tiny random Hugging Face checkpoints for tests: written through transformers itself, so they are exactly
what a real download looks like (config.json, model.safetensors, tokenizer.json, tokenizer_config.json).

make_tiny_checkpoint(dirpath, arch) -> Path. Archs: llama, llama3_scaled (llama3 rope scaling), llama_tied,
mistral, qwen2 (q/k/v bias), qwen3 (q/k norms), and the attention-side families (FAMILY_ARCHS) with their
quirks switched on and windows that bite (sliding_window 6 against 17-33 token prompts): gemma2, gemma3_text,
gemma3 (multimodal wrapper, tiny SigLIP tower), olmo3, ministral, ministral3, mistral3 (wrapper, tiny Pixtral
tower); "<arch>_legacy" writes the same model with the older config keys (rope_theta / rope_scaling /
rope_local_base_freq / sliding_window_pattern, no layer_types). Shapes: hidden 64, 2 layers (families: 4-8,
several of each attention kind), 4 heads, 2 kv heads (head_dim 16), intermediate 128, vocab = the
tokenizer's (~400). Weights are seeded and larger than HF's default
init (std 0.15) so logits have a clear argmax; biases and norm scales are random too, so a bias or norm
wired to the wrong tensor changes the logits.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
ARCHS = ("llama", "llama3_scaled", "llama_tied", "mistral", "qwen2", "qwen3")
FAMILY_ARCHS = ("gemma2", "gemma3_text", "gemma3", "olmo3", "ministral", "ministral3", "mistral3")
LEGACY_ARCHS = (
    "gemma2_legacy",
    "gemma3_text_legacy",
    "olmo3_legacy",
    "ministral_legacy",
    "ministral3_legacy",
)
WINDOW = 6
# YaRN as the hub's OLMo 3 / Ministral 3 ship it, with a short original context so it bites at test lengths
_YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16, "beta_fast": 32.0,
         "beta_slow": 1.0}  # fmt: skip
# MoE and fused-weight families (tests/test_parity_moe.py), each with its quirks switched on
MOE_ARCHS = ("mixtral", "qwen3_moe", "qwen3_moe_norm", "phi3", "phi3_longrope", "gpt_oss")
PHI3_ORIGINAL_MAX = 24  # LongRoPE switch of the tiny phi3_longrope: prompts and decodes cross it
# Hybrid (recurrent + attention) families (tests/test_qwen3_5.py): Qwen 3.5's text model and its multimodal
# wrapper; 6 layers (Gated DeltaNet, Gated DeltaNet, gated attention, twice), grouped value heads (4 value
# heads over 2 key heads) with dk 16 != dv 8, conv kernel 4, partial rotary 0.5 of head_dim 16
HYBRID_ARCHS = ("qwen3_5_text", "qwen3_5")

_CORPUS = """\
The quick brown fox jumps over the lazy dog. A programmable serving system lets small programs drive
a language model one token at a time. Each program owns contexts whose keys and values live in pages
of a fixed size; the engine batches the forward passes of every live program and hands each batch to
a driver. Hello world! Hello there, how are you today? I am fine, thank you, and you?
def main(input):
    context = model.new_context()
    context.fill("You are a helpful assistant.")
    return context.generate(max_tokens=32)
Numbers: 0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 100 1000 2024 3.14159.
Questions and answers: What is the capital of France? Paris. What is two plus two? Four.
The weather is sunny with a chance of rain in the afternoon; bring an umbrella just in case.
Attention is all you need. Rotary position embeddings rotate queries and keys by their position.
"""


def _train_tokenizer(vocab_size: int = 400):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([_CORPUS] * 4, trainer=trainer)
    return tok


def _hf_config(arch: str, vocab: int, special: dict[str, int], overrides: dict):
    import transformers as tf

    common = dict(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=512,
        rms_norm_eps=1e-6,
        initializer_range=0.15,
        bos_token_id=special["<|endoftext|>"],
        eos_token_id=special["<|im_end|>"],
        pad_token_id=special["<|endoftext|>"],
        tie_word_embeddings=False,
    )
    rope = {"rope_type": "default", "rope_theta": 10000.0}
    if arch == "llama3_scaled":
        # original context 64: with head_dim 16 the 8 frequencies fall in all three llama3 bands.
        rope = {
            "rope_type": "llama3",
            "rope_theta": 10000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        }
    kw = {**common, "rope_parameters": rope}
    if arch in HYBRID_ARCHS:
        return _qwen3_5_config(arch, {**common, **overrides})
    if arch in FAMILY_ARCHS:  # overrides reach the text config (e.g. FlashInfer-sized heads on the GPU)
        common = {k: v for k, v in {**common, **overrides}.items() if k != "num_hidden_layers"}
        return _family_config(arch, common)
    if arch in ("llama", "llama3_scaled", "llama_tied"):
        cls, kw = tf.LlamaConfig, {**kw, "tie_word_embeddings": arch == "llama_tied"}
    elif arch == "mistral":
        cls, kw = tf.MistralConfig, {**kw, "sliding_window": None}
    elif arch == "qwen2":
        cls, kw = tf.Qwen2Config, {**kw, "use_sliding_window": False}
    elif arch == "qwen3":
        cls, kw = tf.Qwen3Config, {**kw, "use_sliding_window": False}
    elif arch == "mixtral":
        cls, kw = (
            tf.MixtralConfig,
            {**kw, "sliding_window": WINDOW, "num_local_experts": 6, "num_experts_per_tok": 2},
        )
    elif arch in ("qwen3_moe", "qwen3_moe_norm"):
        # 4 layers. qwen3_moe: step 2 makes layers 1 and 3 sparse, mlp_only_layers [1] leaves only layer 3;
        # qwen3_moe_norm: step 1, mlp_only_layers [0] -> sparse 1, 2, 3
        norm = arch == "qwen3_moe_norm"
        kw = {**kw, "use_sliding_window": False, "num_hidden_layers": 4, "num_experts": 8, "num_experts_per_tok": 3,
              "moe_intermediate_size": 32, "norm_topk_prob": norm, "decoder_sparse_step": 1 if norm else 2,
              "mlp_only_layers": [0] if norm else [1]}  # fmt: skip
        cls = tf.Qwen3MoeConfig
    elif arch in ("phi3", "phi3_longrope"):
        rope = {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.75}  # rotary dim 12
        if arch == "phi3_longrope":  # rotary dim 8: 4 factors per set
            rope = {"rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.5,
                    "short_factor": [1.0, 1.3, 1.9, 2.5], "long_factor": [1.1, 3.0, 9.0, 20.0]}  # fmt: skip
        # phi3: a window that bites (Phi-3-mini-4k's 2047 against 4096); phi3_longrope: no window
        kw = {**kw, "rope_parameters": rope, "original_max_position_embeddings": PHI3_ORIGINAL_MAX,
              "sliding_window": WINDOW if arch == "phi3" else None}  # fmt: skip
        cls = tf.Phi3Config
    elif arch == "gpt_oss":
        # 5 layers (sliding, full, sliding, full, sliding: the default pattern) with window 6; 6 experts of
        # size 32, top 2; swiglu_limit 1 so the clamps bite at these weight scales; the hub's YaRN (factor 32,
        # original 4096, θ 150000, truncate false: at head_dim 16 the ramp's ends 2.02 / 4.35 are fractional,
        # so truncate matters); attention bias and sinks (randomized in make_tiny_checkpoint)
        kw = {**kw, "num_hidden_layers": 5, "sliding_window": WINDOW, "num_local_experts": 6,
              "num_experts_per_tok": 2, "intermediate_size": 32, "swiglu_limit": 1.0, "attention_bias": True,
              "rope_parameters": {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0,
                                  "truncate": False, "original_max_position_embeddings": 4096,
                                  "rope_theta": 150000.0},
              "layer_types": ["sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(5)]}  # fmt: skip
        cls = tf.GptOssConfig
    else:
        raise ValueError(f"unknown tiny arch {arch!r}; choose from {ARCHS + MOE_ARCHS}")
    return cls(**{**kw, **overrides})


def _family_config(arch: str, common: dict):
    import transformers as tf

    gemma = dict(query_pre_attn_scalar=24, sliding_window=WINDOW, hidden_activation="gelu_pytorch_tanh")
    if arch == "gemma2":
        layers = ["sliding_attention", "full_attention"] * 2
        # soft-caps small enough to bite on logits of O(5)
        return tf.Gemma2Config(**common, **gemma, num_hidden_layers=4, layer_types=layers,
                               attn_logit_softcapping=2.0, final_logit_softcapping=5.0,
                               rope_parameters={"rope_type": "default", "rope_theta": 10000.0})  # fmt: skip
    if arch in ("gemma3_text", "gemma3"):
        layers = ["sliding_attention", "sliding_attention", "full_attention"] * 2
        text = tf.Gemma3TextConfig(**common, **gemma, num_hidden_layers=6, layer_types=layers,
                                   final_logit_softcapping=5.0,
                                   rope_parameters={"full_attention": {"rope_type": "linear", "factor": 4.0,
                                                                       "rope_theta": 1_000_000.0},
                                                    "sliding_attention": {"rope_type": "default",
                                                                          "rope_theta": 10_000.0}})  # fmt: skip
        if arch == "gemma3_text":
            return text
        # transformers' Gemma3ForConditionalGeneration never applies the final soft-cap (the hub's gemma3
        # configs set it null); pie honours it when set, so the wrapper test leaves it unset
        text.final_logit_softcapping = None
        vision = dict(model_type="siglip_vision_model", hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, image_size=28, patch_size=14)  # fmt: skip
        return tf.Gemma3Config(text_config=text.to_dict(), vision_config=vision, mm_tokens_per_image=4,
                               tie_word_embeddings=True)  # fmt: skip
    if arch == "olmo3":
        layers = ["sliding_attention"] * 3 + ["full_attention"]
        return tf.Olmo3Config(**common, num_hidden_layers=8, layer_types=layers * 2, sliding_window=WINDOW,
                              rope_parameters={"full_attention": {**_YARN, "rope_theta": 500_000.0},
                                               "sliding_attention": {"rope_type": "default",
                                                                     "rope_theta": 500_000.0}})  # fmt: skip
    if arch == "ministral":
        layers = ["sliding_attention", "full_attention", "sliding_attention", "full_attention"]
        return tf.MinistralConfig(**common, num_hidden_layers=4, layer_types=layers, sliding_window=WINDOW,
                                  rope_parameters={"rope_type": "default", "rope_theta": 100_000.0})  # fmt: skip
    rope3 = {**_YARN, "rope_theta": 1_000_000.0, "mscale": 1.0, "mscale_all_dim": 1.0,
             "llama_4_scaling_beta": 0.1}  # fmt: skip
    text = tf.Ministral3Config(**common, num_hidden_layers=3, sliding_window=WINDOW, rope_parameters=rope3)
    if arch == "ministral3":
        return text
    vision = dict(model_type="pixtral", hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                  num_attention_heads=2, image_size=28, patch_size=14, head_dim=8)  # fmt: skip
    return tf.Mistral3Config(text_config=text.to_dict(), vision_config=vision)


def _qwen3_5_config(arch: str, common: dict):
    import transformers as tf

    rope = {"rope_type": "default", "rope_theta": 10_000_000.0, "partial_rotary_factor": 0.5,
            "mrope_section": [2, 1, 1], "mrope_interleaved": True}  # fmt: skip
    layers = ["linear_attention", "linear_attention", "full_attention"] * 2
    text = tf.Qwen3_5TextConfig(**{**common, "num_hidden_layers": 6}, layer_types=layers, rope_parameters=rope,
                                linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16,
                                linear_value_head_dim=8, linear_conv_kernel_dim=4)  # fmt: skip
    if arch == "qwen3_5_text":
        return text
    vision = dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=common["hidden_size"],
                  num_position_embeddings=16, patch_size=14)  # fmt: skip
    return tf.Qwen3_5Config(text_config=text.to_dict(), vision_config=vision, tie_word_embeddings=False)


# Older config layouts: the keys transformers 4 wrote, per family (applied to config.json after saving).
def _legacy_keys(arch: str, cfg: dict) -> dict:
    drop = {"rope_parameters", "layer_types"}
    if arch == "gemma2":
        return {k: v for k, v in cfg.items() if k not in drop} | {"rope_theta": 10000.0}
    if arch == "gemma3_text":
        return {k: v for k, v in cfg.items() if k not in drop} | {
            "rope_theta": 1_000_000.0, "rope_local_base_freq": 10_000.0, "sliding_window_pattern": 3,
            "rope_scaling": {"rope_type": "linear", "factor": 4.0}}  # fmt: skip
    if arch == "olmo3":
        # every 4th layer full (the older default), yarn on full layers only
        return {k: v for k, v in cfg.items() if k not in drop} | {
            "rope_theta": 500_000.0,
            "rope_scaling": dict(_YARN),
        }
    if arch == "ministral":
        # no layer_types: every layer slides
        return {k: v for k, v in cfg.items() if k not in drop} | {"rope_theta": 100_000.0}
    if arch == "gpt_oss":
        # the hub's gpt-oss spelling: rope_theta + rope_scaling; no layer_types (even layers slide); num_experts
        rope = dict(cfg["rope_parameters"])
        theta = rope.pop("rope_theta")
        out = {k: v for k, v in cfg.items() if k not in drop | {"num_local_experts"}}
        return out | {"rope_theta": theta, "rope_scaling": rope, "num_experts": cfg["num_local_experts"]}
    if arch == "ministral3":
        rope = dict(cfg["rope_parameters"])
        theta = rope.pop("rope_theta")
        return {k: v for k, v in cfg.items() if k not in drop} | {"rope_theta": theta, "rope_scaling": rope}
    raise ValueError(f"no legacy layout for {arch!r}")


def make_tiny_checkpoint(dirpath: str | Path, arch: str, **config_overrides) -> Path:
    """Write a seeded tiny HF checkpoint for `arch` into dirpath (created) and return it.

    config_overrides go to the transformers config constructor (e.g. num_hidden_layers=3).
    """

    out = Path(dirpath)
    out.mkdir(parents=True, exist_ok=True)
    tok = _train_tokenizer()
    special = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
    legacy = arch.endswith("_legacy")
    base = arch.removesuffix("_legacy")
    config = _hf_config(base, tok.get_vocab_size(), special, config_overrides)
    torch.manual_seed((ARCHS + MOE_ARCHS).index(arch) if arch in ARCHS + MOE_ARCHS else 0)
    model = hf_model_class(config).from_config(config, dtype=torch.float32)
    gen = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
            elif name.endswith((".bias", "_proj_bias")):  # GPT-OSS experts: gate_up_proj_bias, down_proj_bias
                p.copy_(0.2 * torch.randn(p.shape, generator=gen))
            elif name.endswith(".sinks"):  # GPT-OSS: sink logits comparable to the scores, so they matter
                p.copy_(torch.randn(p.shape, generator=gen))
    model.save_pretrained(out, safe_serialization=True)
    if legacy:
        cfg_path = out / "config.json"
        cfg_path.write_text(json.dumps(_legacy_keys(base, json.loads(cfg_path.read_text())), indent=2))

    save_tokenizer(tok, out)
    return out


def save_tokenizer(tok, out: Path) -> None:
    """The tiny trained tokenizer and a ChatML tokenizer_config beside a checkpoint."""
    tok.save(str(out / "tokenizer.json"))
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "chat_template": CHATML_TEMPLATE,
        "model_max_length": 512,
        "add_bos_token": False,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))


def hf_model_class(config):
    """The transformers auto class that builds a config's model with an LM head (mistral3 is registered
    for image-text-to-text only, and so is gemma4's wrapper; qwen3_5's causal-LM class is its text model
    alone)."""
    import transformers as tf

    if getattr(config, "model_type", None) in ("mistral3", "gemma4", "qwen3_5"):
        return tf.AutoModelForImageTextToText
    return tf.AutoModelForCausalLM
