"""Cheap checks that a model directory will load: what ✓ in `pie model list` and `pie doctor` mean.

Three parts, each a few milliseconds and no tensor data read:
  config     config.json parses as JSON and normalizes (pie.models.config: supported model_type,
             rope type, attention variant), exactly as the executor will read it
  tokenizer  tokenizer.json, tokenizer.model, or vocab.json + merges.txt is present
  weights    the safetensors files (index or model.safetensors) exist and each one's header is
             readable and covers the file (safetensors validates offsets against the file size,
             so a truncated or zero-byte file fails here, not halfway through loading)
Every problem is one line that names the file (relative to the model directory) and what to do.
"""

from __future__ import annotations

import json
from pathlib import Path

from pie.errors import ModelError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")  # either one is enough to build a tokenizer
BPE_FILES = ("vocab.json", "merges.txt")  # a slow BPE tokenizer needs both
REDOWNLOAD = "re-download the model (HF cache: `pie model remove REPO`, then `pie model download REPO`)"


def read_config_json(path: Path) -> dict:
    """config.json as a dict; ModelError naming the file when it is missing or not a JSON object."""
    cfg = Path(path) / "config.json"
    try:
        data = json.loads(cfg.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelError(f"{cfg} is missing: {path} is not a Hugging Face model directory") from None
    except (OSError, ValueError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise ModelError(f"{cfg} is not valid JSON ({e}); fix it or {REDOWNLOAD}") from None
    if not isinstance(data, dict):
        raise ModelError(f"{cfg} is not a JSON object; fix it or {REDOWNLOAD}")
    return data


def config_problem(path: Path) -> str | None:
    """None, or why config.json would be rejected by the executor."""
    from pie.models.config import ModelConfig

    try:
        ModelConfig.from_hf(read_config_json(path))
    except ModelError as e:
        text = str(e)
        return text if "config.json is" in text else f"{Path(path) / 'config.json'}: {text}"
    return None


def tokenizer_problem(path: Path) -> str | None:
    path = Path(path)
    if any((path / f).is_file() for f in TOKENIZER_FILES) or all((path / f).is_file() for f in BPE_FILES):
        return None
    return (
        f"no tokenizer files in {path} (tokenizer.json, tokenizer.model, or vocab.json + merges.txt); "
        f"copy them from the model's repo or {REDOWNLOAD}"
    )


def weights_problems(path: Path) -> list[str]:
    """Problems of the safetensors files, one per file; only headers are read."""
    from safetensors import safe_open

    from pie.models.weights import checkpoint_files

    try:
        files = checkpoint_files(path)
    except ModelError as e:
        return [str(e)]
    problems = []
    for f in files:
        size = f.stat().st_size
        if size == 0:
            problems.append(f"{f} is empty (0 bytes; an interrupted download?); {REDOWNLOAD}")
            continue
        try:
            with safe_open(str(f), framework="numpy") as st:
                st.keys()
        except Exception as e:  # SafetensorError (not importable by name across versions), OSError
            problems.append(
                f"{f} is not a readable safetensors file ({e}; {size} bytes): truncated or corrupt; {REDOWNLOAD}"
            )
    return problems


def model_dir_problems(path: Path, tokenizer: bool = True) -> list[str]:
    """Every reason the model in `path` would not run (empty: it runs)."""
    problems = []
    if (p := config_problem(path)) is not None:
        problems.append(p)
    if tokenizer and (p := tokenizer_problem(path)) is not None:
        problems.append(p)
    return problems + weights_problems(path)


def check_model_dir(path: Path, tokenizer: bool = True) -> None:
    """Raises one ModelError listing every problem of the model directory."""
    problems = model_dir_problems(path, tokenizer)
    if len(problems) == 1:
        raise ModelError(problems[0])
    if problems:
        raise ModelError(f"model directory {path} cannot be used:\n  - " + "\n  - ".join(problems))
