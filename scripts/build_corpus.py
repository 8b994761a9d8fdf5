#!/usr/bin/env python3
"""Build the training corpus of pie's embedded default model from text that ships with CPython.

Sources (all under the PSF license, which allows redistribution; see the model card):
- ``pydoc_data.topics``: the reference-manual topics that ``help()`` shows (every topic);
- docstrings of the standard library's public modules, classes, functions and methods;
- the Zen of Python (the rot13 text in ``this.py``, read from source so nothing prints).

Outputs, in ``--out`` (default ``.data/corpus/``, git-ignored):
- ``corpus.txt``: plain documents joined by ``<|endoftext|>`` (each document is stripped, so
  ``text.split("<|endoftext|>")`` gives them back after ``.strip()``);
- ``chat.jsonl``: one ``{"messages": [{"role": ..., "content": ...}, ...]}`` per line, questions
  about the same material in several phrasings (deterministic for a given ``--seed``).

Docstrings are read by importing modules in a child process (``--_worker``) whose stdout/stderr
file descriptors point at /dev/null, one module at a time under a timeout: a module that hangs
or crashes the child is skipped and the child restarts, so no import side effect can stall the
build or corrupt its output.  Only stdlib modules are visited (``sys.stdlib_module_names``).
"""

from __future__ import annotations

import argparse
import ast
import codecs
import importlib.util
import json
import os
import pkgutil
import queue
import random
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

EOT = "<|endoftext|>"
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
# Top-level modules never imported: GUIs, tests, demos, and modules that act on import.
SKIP_TOP = {
    "antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo", "test", "lib2to3",
    "pydoc_data", "__hello__", "__phello__", "ensurepip", "msilib", "winreg", "winsound",
    "_msi", "nt", "msvcrt", "xxsubtype", "xxlimited", "xxlimited_35", "site", "encodings",
}  # fmt: skip
SKIP_PARTS = {"test", "tests", "idle_test", "__main__", "_bundled"}
MIN_DOC_CHARS = 40
ANSWER_CHARS = 1500  # chat answers keep their leading paragraphs up to this size
MODULE_TIMEOUT_S = 15.0


# ----------------------------------------------------------------------------- module discovery
def stdlib_modules() -> list[str]:
    """Public stdlib module names (submodules included), found on disk without importing."""
    names: list[str] = []
    for top in sorted(sys.stdlib_module_names):
        if top.startswith("_") or top in SKIP_TOP:
            continue
        spec = importlib.util.find_spec(top) if _findable(top) else None
        if spec is None:
            continue
        names.append(top)
        names += _submodules(top, list(spec.submodule_search_locations or []))
    return sorted(set(names))


def _submodules(package: str, paths: list[str]) -> list[str]:
    """Submodules on disk, recursively; unlike pkgutil.walk_packages this imports nothing."""
    found: list[str] = []
    for info in pkgutil.iter_modules(paths):
        if info.name.startswith("_") or info.name in SKIP_PARTS:
            continue
        name = f"{package}.{info.name}"
        found.append(name)
        if info.ispkg:
            found += _submodules(name, [os.path.join(p, info.name) for p in paths])
    return found


def _findable(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


# ----------------------------------------------------------------------------- worker (child side)
def _worker(list_path: str) -> None:
    """Child process: import each listed module and emit one JSON line per docstring record.

    Protocol on the saved stdout fd: {"start": name}, zero or more records, {"done": name}.
    """
    import contextlib
    import inspect
    import io
    import warnings

    out = os.fdopen(os.dup(1), "w", encoding="utf-8", buffering=1)
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    sys.stdout = sys.stderr = io.StringIO()
    warnings.simplefilter("ignore")

    def emit(obj: dict) -> None:
        out.write(json.dumps(obj, ensure_ascii=False) + "\n")

    def sig(obj: object) -> str:
        try:
            return str(inspect.signature(obj))
        except (TypeError, ValueError):
            return ""

    def own(obj: object, modname: str) -> bool:
        # Objects defined here, or in a private C accelerator that this public module re-exports.
        m = getattr(obj, "__module__", None) or ""
        return m == modname or (m.startswith("_") and not m.startswith("__"))

    def record(name: str, attr: str, obj: object) -> None:
        if inspect.isclass(obj):
            methods = []
            for mname, mobj in sorted(vars(obj).items()):
                if mname.startswith("_"):
                    continue
                fn = mobj.__func__ if isinstance(mobj, (classmethod, staticmethod)) else mobj
                # Own __doc__ only: inspect.getdoc would copy each override's docstring from the base.
                mdoc = fn.__doc__ if callable(fn) or isinstance(fn, property) else None
                if isinstance(mdoc, str) and mdoc.strip():
                    methods.append({"name": mname, "sig": sig(fn), "doc": inspect.cleandoc(mdoc)})
            cdoc = obj.__dict__.get("__doc__")
            if isinstance(cdoc, str) or methods:
                emit({"kind": "class", "module": name, "name": attr, "sig": sig(obj),
                      "doc": inspect.cleandoc(cdoc) if isinstance(cdoc, str) else "",
                      "methods": methods})  # fmt: skip
        elif inspect.isroutine(obj):
            fdoc = inspect.getdoc(obj)
            if fdoc:
                emit({"kind": "function", "module": name, "name": attr, "sig": sig(obj), "doc": fdoc})

    for name in Path(list_path).read_text().split():
        emit({"start": name})
        try:
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                mod = importlib.import_module(name)
            doc = inspect.getdoc(mod)
            if doc:
                emit({"kind": "module", "module": name, "name": name, "sig": "", "doc": doc})
            for attr, obj in sorted(vars(mod).items()):
                if attr.startswith("_") or not own(obj, name):
                    continue
                try:
                    record(name, attr, obj)
                except Exception:  # noqa: BLE001 - an odd attribute loses only itself
                    continue
        except BaseException as exc:  # noqa: BLE001 - a broken module is skipped, whatever it raises
            emit({"error": f"{type(exc).__name__}: {exc}"[:200], "error_module": name})
        emit({"done": name})
    out.flush()
    os._exit(0)  # skip interpreter teardown: imported modules may have left threads/atexit hooks


# ----------------------------------------------------------------------------- parent side
def collect_docstrings(
    modules: list[str], timeout_s: float = MODULE_TIMEOUT_S
) -> tuple[list[dict], list[str]]:
    """Import ``modules`` in sandboxed children; return (records, skipped module names).

    A module that raises is skipped; one that hangs past ``timeout_s`` or kills the child is
    skipped and a fresh child carries on with the modules after it.
    """
    records: list[dict] = []
    skipped: list[str] = []
    pending = list(modules)
    env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY")}
    while pending:
        with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
            f.write("\n".join(pending))
        proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--_worker", f.name],
            stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            text=True, encoding="utf-8", env=env, start_new_session=True,
        )  # fmt: skip
        lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=_pump, args=(proc, lines), daemon=True).start()
        current: str | None = None
        done = 0  # modules of `pending` this child finished
        while done < len(pending):
            try:
                line = lines.get(timeout=timeout_s)
            except queue.Empty:
                line = None
            if line is None:  # hung past the timeout, or the child died
                if current is None:
                    proc.kill()
                    raise RuntimeError(f"docstring worker exited before importing {pending[done]!r}")
                skipped.append(current)
                done += 1
                break
            msg = json.loads(line)
            if "start" in msg:
                current = msg["start"]
            elif "done" in msg:
                current, done = None, done + 1
            elif "error" in msg:
                skipped.append(msg["error_module"])
            else:
                records.append(msg)
        proc.kill()
        proc.wait()
        os.unlink(f.name)
        pending = pending[done:]
    return records, skipped


def _pump(proc: subprocess.Popen, lines: queue.Queue) -> None:
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.put(line)
    lines.put(None)


# ----------------------------------------------------------------------------- documents
def _clean(text: str) -> str:
    """Drop special-token strings (never text), memory addresses, and trailing spaces."""
    for tok in SPECIAL_TOKENS:
        text = text.replace(tok, "")
    text = re.sub(r" at 0x[0-9a-fA-F]+", "", text)  # "<object object at 0x7f..>": differs per run
    return "\n".join(line.rstrip() for line in text.strip().splitlines())


def zen_of_python() -> str:
    """The Zen of Python, decoded from this.py's source (importing `this` would print it)."""
    spec = importlib.util.find_spec("this")
    assert spec is not None and spec.origin is not None
    tree = ast.parse(Path(spec.origin).read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) == "s":
            return "The Zen of Python, by Tim Peters\n\n" + codecs.decode(
                ast.literal_eval(node.value), "rot13"
            )
    raise RuntimeError("this.py no longer defines `s`; update zen_of_python()")


def record_text(rec: dict) -> str:
    """Render one docstring record as a readable document (module path, signature, text)."""
    mod, name = rec["module"], rec["name"]
    if rec["kind"] == "module":
        return f"Module {mod}\n\n{rec['doc']}"
    qual = name if mod == "builtins" else f"{mod}.{name}"  # "str", not "builtins.str"
    if rec["kind"] == "function":
        return f"{qual}{rec['sig']}\n\n{rec['doc']}"
    parts = [f"class {qual}{rec['sig']}" + (f"\n\n{rec['doc']}" if rec["doc"] else "")]
    for m in rec["methods"]:
        body = "\n".join("    " + ln if ln else "" for ln in m["doc"].splitlines())
        parts.append(f"{name}.{m['name']}{m['sig']}\n{body}")
    return "\n\n".join(parts)


# ----------------------------------------------------------------------------- chat examples
TOPIC_Q = ["What is {t} in Python?", "Explain {t}.", "Tell me about {t} in Python.",
           "How does {t} work in Python?", "Can you describe {t}?"]  # fmt: skip
KEYWORD_Q = ["What is the `{k}` statement in Python?", "What does the `{k}` keyword do?",
             "Explain the `{k}` keyword.", "How do I use `{k}` in Python?"]  # fmt: skip
MODULE_Q = ["Explain the {m} module.", "What is the {m} module for?", "What does the `{m}` module do?",
            "Tell me about Python's {m} module.", "Give me an overview of {m}."]  # fmt: skip
FUNC_Q = ["What does {f} do?", "Explain {f}.", "How do I use {f}?", "What is `{f}`?",
          "Describe the function {f}."]  # fmt: skip
CLASS_Q = ["What is the {c} class?", "Explain {c}.", "What is {c} used for?", "Describe the class {c}."]
SYSTEMS = ["You are a helpful assistant.", "You are a helpful assistant who knows Python well.",
           "Answer questions about Python concisely."]  # fmt: skip


def _brief(text: str, limit: int = ANSWER_CHARS) -> str:
    """The leading paragraphs of ``text`` that fit in ``limit`` chars (at least one line).

    Short answers put many more ``<|im_end|>`` in the data, so the model learns to stop."""
    out = ""
    for para in text.split("\n\n"):
        if out and len(out) + 2 + len(para) > limit:
            break
        out = f"{out}\n\n{para}" if out else para
    if len(out) > limit:  # a single huge first paragraph: cut at a line end
        out = out[: out.rfind("\n", 0, limit)] if "\n" in out[:limit] else out[:limit]
    return out.strip()


def chat_examples(topics: dict[str, str], records: list[dict], seed: int) -> list[list[dict]]:
    """Question/answer conversations over the topics and docstrings (deterministic for ``seed``)."""
    import pydoc

    rng = random.Random(seed)
    pairs: list[tuple[str, str]] = []
    # pydoc.Helper maps keywords ("for") and upper-case subjects ("STRINGS") to topic labels.
    for kw, target in sorted(pydoc.Helper.keywords.items()):
        label = target if isinstance(target, str) else target[0]
        if label in topics:
            for q in rng.sample(KEYWORD_Q, 2):
                pairs.append((q.format(k=kw), topics[label]))
    for subject, target in sorted(pydoc.Helper.topics.items()):
        label = target if isinstance(target, str) else target[0]
        if label in topics:
            t = subject.lower().replace("methods", " methods").replace("  ", " ")
            pairs.append((rng.choice(TOPIC_Q).format(t=t), topics[label]))
    for label, text in sorted(topics.items()):
        pairs.append((rng.choice(TOPIC_Q).format(t=f'the "{label}" topic'), text))
    for rec in records:
        full = f"{rec['module']}.{rec['name']}"
        short = full.removeprefix("builtins.")
        if rec["kind"] == "module":
            for q in rng.sample(MODULE_Q, 2):
                pairs.append((q.format(m=rec["module"]), rec["doc"]))
        elif rec["kind"] == "function":
            pairs.append((rng.choice(FUNC_Q).format(f=short), f"`{short}{rec['sig']}`\n\n{rec['doc']}"))
        else:
            if rec["doc"]:
                pairs.append((rng.choice(CLASS_Q).format(c=short), f"`{short}{rec['sig']}`\n\n{rec['doc']}"))
            for m in rec["methods"]:
                f = f"{short}.{m['name']}"
                pairs.append((rng.choice(FUNC_Q).format(f=f), f"`{f}{m['sig']}`\n\n{m['doc']}"))
    rng.shuffle(pairs)
    convs: list[list[dict]] = []
    i = 0
    while i < len(pairs):
        msgs: list[dict] = []
        if rng.random() < 0.2:
            msgs.append({"role": "system", "content": rng.choice(SYSTEMS)})
        turns = 2 if rng.random() < 0.1 else 1  # a few multi-turn conversations
        for q, a in pairs[i : i + turns]:
            msgs += [
                {"role": "user", "content": _clean(q)},
                {"role": "assistant", "content": _brief(_clean(a))},
            ]
        convs.append(msgs)
        i += turns
    return convs


# ----------------------------------------------------------------------------- main
def build(out: Path, seed: int, max_doc_chars: int) -> dict:
    """Write corpus.txt and chat.jsonl into ``out``; return summary stats."""
    from pydoc_data.topics import topics

    t0 = time.monotonic()
    records, skipped = collect_docstrings(stdlib_modules())
    seen: set[str] = set()
    unique: list[dict] = []
    for rec in records:  # dedupe: re-exported objects and copied docstrings appear once
        key = rec["doc"] + "".join(m["doc"] for m in rec.get("methods", []))
        if len(key) < MIN_DOC_CHARS or key in seen:
            continue
        seen.add(key)
        unique.append(rec)
    docs = [_clean(zen_of_python())] + [_clean(t) for _, t in sorted(topics.items())]
    docs += [_clean(record_text(r))[:max_doc_chars] for r in unique]
    docs = [d for d in docs if d]
    convs = chat_examples(topics, unique, seed)

    out.mkdir(parents=True, exist_ok=True)
    (out / "corpus.txt").write_text(f"\n{EOT}\n".join(docs) + "\n", encoding="utf-8")
    with open(out / "chat.jsonl", "w", encoding="utf-8") as f:
        for msgs in convs:
            f.write(json.dumps({"messages": msgs}, ensure_ascii=False) + "\n")
    stats = {
        "documents": len(docs),
        "chat_examples": len(convs),
        "corpus_mb": round((out / "corpus.txt").stat().st_size / 1e6, 2),
        "chat_mb": round((out / "chat.jsonl").stat().st_size / 1e6, 2),
        "modules_skipped": len(skipped),
        "python": sys.version.split()[0],
        "seconds": round(time.monotonic() - t0, 1),
    }
    (out / "stats.json").write_text(json.dumps(stats | {"skipped": skipped}, indent=1))
    return stats


def main(argv: list[str] | None = None) -> int:
    if argv is None and len(sys.argv) == 3 and sys.argv[1] == "--_worker":
        _worker(sys.argv[2])
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path(".data/corpus"), help="output folder (git-ignored)")
    p.add_argument("--seed", type=int, default=0, help="seed for question phrasings and shuffling")
    p.add_argument("--max-doc-chars", type=int, default=20000, help="truncate longer docstring documents")
    args = p.parse_args(argv)
    stats = build(args.out, args.seed, args.max_doc_chars)
    print(json.dumps(stats))
    return 0


if __name__ == "__main__":
    sys.exit(main())
