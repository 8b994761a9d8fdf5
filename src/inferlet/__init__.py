"""Pie's inferlet SDK (the `inferlet` package of pie-project/pie, v0.4) on pie's runtime.

An inferlet written for Pie's Python SDK runs under `pie run` unchanged:

    from inferlet import Context, Model, Sampler, runtime

    async def main(input: dict) -> str:
        model = Model.load(runtime.models()[0])
        ctx = Context(model)
        ctx.system("You are helpful.").user(input["prompt"])
        return await ctx.generate(Sampler.top_p(0.6, 0.95), max_tokens=256).collect_text()

Supported: Model / Tokenizer, Context (fillers, flush, fork / save / snapshot / open / take / delete /
truncate / release, set_bid / idle / suspend), Forward (inputs, samplers, probes, logit and attention masks),
Generator and GenStep, samplers and probes, the chat, reasoning and tools decoders in each roster model's
native format, runtime (with launch), messaging, session, scheduling, set_return, constraints (llguidance
grammars) and speculation (custom speculators, system n-gram drafting). Importable but raising
NotSupportedError (a PieError) when used: adapters, media and speech, mcp, zo.
See docs/inferlets.md ("Pie's inferlet API").
"""

from __future__ import annotations

from pie.runtime.scope import current_scope

from . import (
    chat,
    mcp,
    messaging,
    reasoning,
    runtime,
    scheduling,
    session,
    tools,
    zo,
)
from ._errors import NotSupportedError
from .adapter import Adapter
from .audio import Speech, SpeechBuilder, Voice, write_wav
from .context import Context
from .forward import Forward, Output, ProbeHandle, SampleHandle
from .generation import Generator, GenStep
from .grammar import AnyJson, Constraint, Ebnf, Grammar, GrammarConstraint, JsonSchema, Matcher, Regex, Schema
from .media import Audio, Image, Video
from .model import Model, Tokenizer
from .sample import Distribution, Entropy, Logits, Logprob, Logprobs, Sampler
from .spec import Speculator

__all__ = [
    "Adapter",
    "AnyJson",
    "Audio",
    "Constraint",
    "Context",
    "Distribution",
    "Ebnf",
    "Entropy",
    "Forward",
    "GenStep",
    "Generator",
    "Grammar",
    "GrammarConstraint",
    "Image",
    "JsonSchema",
    "Logits",
    "Logprob",
    "Logprobs",
    "Matcher",
    "Model",
    "NotSupportedError",
    "Output",
    "ProbeHandle",
    "Regex",
    "SampleHandle",
    "Sampler",
    "Schema",
    "Speculator",
    "Speech",
    "SpeechBuilder",
    "Tokenizer",
    "Video",
    "Voice",
    "chat",
    "get_return_value",
    "mcp",
    "messaging",
    "reasoning",
    "runtime",
    "scheduling",
    "session",
    "set_return",
    "tools",
    "write_wav",
    "zo",
]


def set_return(value: str) -> None:
    """The inferlet's result when `main` returns None (what `pie run` prints)."""
    current_scope().returned = value


def get_return_value() -> str | None:
    """The value given to set_return in this inferlet (None if none)."""
    return current_scope().returned
