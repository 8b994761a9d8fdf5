"""model_type (from config.json) -> model class. Explicit table, imported lazily so an unused family
costs nothing at startup."""

from __future__ import annotations

import importlib

from pie.errors import ModelError

# model_type -> (module, class). Each class's config_from_hf normalizes its config.json. Mistral is the
# Llama architecture (its sliding window, when set, applies to every layer).
_MODELS: dict[str, tuple[str, str]] = {
    "llama": ("pie.models.llama", "LlamaForCausalLM"),
    "mistral": ("pie.models.llama", "LlamaForCausalLM"),
    "qwen2": ("pie.models.qwen2", "Qwen2ForCausalLM"),
    "qwen3": ("pie.models.qwen3", "Qwen3ForCausalLM"),
    "gemma2": ("pie.models.gemma2", "Gemma2ForCausalLM"),
    "gemma3_text": ("pie.models.gemma3", "Gemma3ForCausalLM"),
    "gemma3": ("pie.models.gemma3", "Gemma3ForConditionalGeneration"),
    "gemma4_text": ("pie.models.gemma4", "Gemma4ForCausalLM"),
    "gemma4": ("pie.models.gemma4", "Gemma4ForConditionalGeneration"),
    "olmo3": ("pie.models.olmo3", "Olmo3ForCausalLM"),
    "ministral": ("pie.models.ministral", "MinistralForCausalLM"),
    "ministral3": ("pie.models.mistral3", "Ministral3ForCausalLM"),
    "mistral3": ("pie.models.mistral3", "Mistral3ForConditionalGeneration"),
    "mixtral": ("pie.models.mixtral", "MixtralForCausalLM"),
    "qwen3_moe": ("pie.models.qwen3_moe", "Qwen3MoeForCausalLM"),
    "phi3": ("pie.models.phi3", "Phi3ForCausalLM"),
    "gpt_oss": ("pie.models.gpt_oss", "GptOssForCausalLM"),
    "gptoss": ("pie.models.gpt_oss", "GptOssForCausalLM"),
    "qwen3_5_text": ("pie.models.qwen3_5", "Qwen3_5ForCausalLM"),
    "qwen3_5": ("pie.models.qwen3_5", "Qwen3_5ForConditionalGeneration"),
}


def supported_model_types() -> list[str]:
    return sorted(_MODELS)


def get_model_class(model_type: str) -> type:
    """The class for an HF model_type; ModelError listing the supported types otherwise."""
    try:
        module, name = _MODELS[model_type]
    except KeyError:
        raise ModelError(
            f"model_type {model_type!r} is not supported; supported types: {', '.join(supported_model_types())}"
        ) from None
    return getattr(importlib.import_module(module), name)
