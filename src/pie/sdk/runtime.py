"""What an inferlet can ask of the runtime about itself.

from pie.sdk import runtime
runtime.stats()            # {"steps": ..., "tokens_prefilled": ..., "prefix_tokens_reused": ..., ...}
"""

from __future__ import annotations

from pie.runtime.scope import current_scope


def stats(model: str | None = None) -> dict:
    """Counters of the model's runtime (default: this inferlet's model): steps run, tokens prefilled and
    decoded, prefill tokens reused from shared pages, preemptions, pages swapped out and in, pages copied,
    evicted, used, free and cached, snapshots and queued works."""
    scope = current_scope()
    return scope.engine.model(model or scope.default_model).stats()


def models() -> list[str]:
    """Names of the models this engine serves (the first is the default)."""
    return list(current_scope().engine.models)
