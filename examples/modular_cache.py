"""Modular prompt cache (Pie's modular-cache benchmark): a prompt is built from modules (system text,
style, context, the task) ordered by their dependencies; after each module the context is saved as a
snapshot named by a hash of the module prefix. A later run opens the longest saved prefix and prefills
only the modules after it: change the task, and only the task is computed again.

    pie run examples/modular_cache.py -- --prompt "Explain modular KV caching in simple terms."

Snapshots live as long as the engine; with `[runtime] snapshot_dir` set they persist across `pie run`s.
Returns JSON {"cache_hit_modules", "saved", "text"}.
"""

import json

from inferlet import Context, Model, Sampler, runtime

CACHE_SCHEMA = "modular-cache-v1"  # bump when the key's meaning changes
CACHE_NS = "modular-cache-python"
SEP = "\x1f"


def default_modules(prompt: str) -> list[dict]:
    return [
        {"id": "system/base", "role": "system", "deps": [], "text": "You are a concise technical assistant."},
        {
            "id": "style/simple",
            "role": "user",
            "deps": ["system/base"],
            "text": "Explain simply first, then give implementation details.",
        },
        {
            "id": "context/pie",
            "role": "user",
            "deps": ["style/simple"],
            "text": "Pie inferlets can control forward passes, KV cache snapshots, and generation loops.",
        },
        {"id": "task/current", "role": "user", "deps": ["context/pie"], "text": prompt},
    ]


def stable_hash(text: str) -> int:
    """FNV-1a 64-bit: the same in every process (Python's hash() of a str is not)."""
    h = 0xCBF29CE484222325
    for b in text.encode("utf-8"):
        h = ((h ^ b) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return h


def prefix_key(modules: list[dict]) -> str:
    """The snapshot name of a module prefix: any change in it (id, role, text, deps) changes the name."""
    parts = [CACHE_SCHEMA]
    for m in modules:
        parts += [m["id"], m.get("role", "user"), m["text"], *m.get("deps", [])]
    return f"{CACHE_NS}/{stable_hash(SEP.join(parts)):016x}"


def topo_sort(modules: list[dict]) -> list[dict]:
    """Dependencies first; duplicate ids, missing dependencies and cycles are errors."""
    by_id: dict[str, dict] = {}
    for m in modules:
        mid = str(m.get("id", ""))
        if not mid.strip():
            raise ValueError("module id must not be empty")
        if m.get("role", "user") not in ("system", "user"):
            raise ValueError(f"unsupported role {m.get('role')!r} on module {mid}")
        if mid in by_id:
            raise ValueError(f"duplicate module id: {mid}")
        by_id[mid] = m
    visiting: set[str] = set()
    ordered: list[dict] = []

    def visit(mid: str) -> None:
        if any(m["id"] == mid for m in ordered):
            return
        if mid in visiting:
            raise ValueError(f"dependency cycle at module {mid}")
        if mid not in by_id:
            raise ValueError(f"missing module {mid}")
        visiting.add(mid)
        for dep in by_id[mid].get("deps", []):
            visit(dep)
        visiting.remove(mid)
        ordered.append(by_id[mid])

    for mid in sorted(by_id):
        visit(mid)
    return ordered


def open_longest_prefix(model: Model, modules: list[dict]) -> tuple[Context | None, int]:
    """A fork of the longest saved module prefix and its length, or (None, 0)."""
    for length in range(len(modules), 0, -1):
        ctx = Context.open(model, prefix_key(modules[:length]))
        if ctx is not None:
            return ctx, length
    return None, 0


async def main(input: dict) -> str:
    model = Model.load(runtime.models()[0])
    prompt = input.get("prompt", "Explain modular KV caching for LLM serving in simple terms.")
    use_cache, save_cache = bool(input.get("use_cache", True)), bool(input.get("save_cache", True))
    modules = topo_sort(input.get("modules") or default_modules(prompt))

    ctx, resume = open_longest_prefix(model, modules) if use_cache else (None, 0)
    ctx = ctx or Context(model)
    saved = []
    for i in range(resume, len(modules)):
        m = modules[i]
        (ctx.system if m.get("role", "user") == "system" else ctx.user)(m["text"])
        await ctx.flush()
        if save_cache:
            name = prefix_key(modules[: i + 1])
            try:
                ctx.save(name)
                saved.append(name)
            except Exception as e:  # an equal prefix saved meanwhile (by a concurrent run) stays as it is
                print(f"save_skipped={name} ({e})")
    text = await ctx.generate(Sampler.argmax(), max_tokens=int(input.get("max_tokens", 256))).collect_text()
    ctx.release()
    return json.dumps({"cache_hit_modules": resume, "saved": saved, "text": text})
