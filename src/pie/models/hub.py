"""Where model checkpoints come from: the embedded model, local directories, and the Hugging Face cache.

Only download() touches the network. The HF cache location is read from the environment at each call
(HF_HUB_CACHE, HUGGINGFACE_HUB_CACHE, HF_HOME/hub, XDG_CACHE_HOME/huggingface/hub, ~/.cache/huggingface/hub,
the same order huggingface_hub uses) and passed explicitly, because huggingface_hub.constants freezes
it at import time.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pie.errors import ModelError
from pie.models.check import (
    config_problem,
    read_config_json,
    tokenizer_problem,
    weights_problems,
)
from pie.paths import EMBEDDED_MODEL_ID, embedded_model_dir

if TYPE_CHECKING:
    from huggingface_hub import CachedRepoInfo, HFCacheInfo

    from pie.config.schema import PieConfig

DRIVERS = ("cuda_native", "dev")  # for now both drivers run every registered architecture
# What `pie model download` fetches (root files only: see the ignore pattern in download()).
DOWNLOAD_PATTERNS = [
    "config.json",
    "generation_config.json",
    "*.safetensors",
    "model.safetensors.index.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
]


def hf_cache_dir() -> Path:
    """The HF hub cache directory, from the environment as it is now."""
    env = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    home = os.environ.get("HF_HOME") or Path(xdg) / "huggingface"
    return Path(home).expanduser() / "hub"


def _looks_like_path(s: str) -> bool:
    """Repo ids are `name` or `org/name`; anything else that names a file system location is a path."""
    return s.startswith(("/", ".", "~")) or s.count("/") > 1 or os.sep != "/" and os.sep in s


def _checkpoint_dir(p: Path, what: str) -> Path:
    if not p.is_dir():
        raise ModelError(f"{what} {p} is not a directory; set hf_repo to a directory holding config.json")
    if not (p / "config.json").is_file():
        raise ModelError(f"{what} {p} has no config.json; it is not a Hugging Face model checkpoint")
    return p.resolve()


def cached_snapshot(repo: str) -> Path | None:
    """The snapshot directory of `repo` (its `main` revision) in the HF cache, or None. Never downloads."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError

    try:
        return Path(snapshot_download(repo, cache_dir=hf_cache_dir(), local_files_only=True))
    except HFValidationError as e:
        raise ModelError(f"'{repo}' is neither an existing directory nor a valid repo id: {e}") from None
    except OSError:  # LocalEntryNotFoundError: not cached
        return None


def is_cached(repo: str) -> bool:
    """True when `repo` is in the HF cache with a config.json."""
    try:
        snap = cached_snapshot(repo)
    except ModelError:
        return False
    return snap is not None and (snap / "config.json").is_file()


def resolve_model_dir(hf_repo: str) -> Path:
    """The local directory holding the checkpoint that a config's hf_repo names (never downloads).

    EMBEDDED_MODEL_ID -> the model shipped with pie; an existing directory -> itself; else an HF cache repo.
    The result always contains config.json.
    """
    if hf_repo == EMBEDDED_MODEL_ID:
        return _checkpoint_dir(embedded_model_dir(), "the embedded model directory")
    local = Path(hf_repo).expanduser()
    if local.exists() or _looks_like_path(hf_repo):
        if not local.exists():
            raise ModelError(f"model directory {local} does not exist")
        return _checkpoint_dir(local, "model directory")
    snap = cached_snapshot(hf_repo)
    if snap is None:
        raise ModelError(
            f"model '{hf_repo}' is not in the HF cache ({hf_cache_dir()}); run `pie model download "
            f"{hf_repo}` or set hf_repo to a local directory"
        )
    return _checkpoint_dir(snap, f"cached snapshot of '{hf_repo}'")


@dataclass
class ModelInfo:
    """One row of `pie model list`."""

    id: str  # repo id, EMBEDDED_MODEL_ID, or the directory as the config spells it
    source: str  # "embedded", "hf-cache", "local", or "missing" (named by the config but not found)
    path: Path | None
    model_type: str | None = None
    supported: bool | None = None  # None: cannot tell (pie.models.registry is not importable)
    drivers: list[str] = field(default_factory=list)  # drivers that can run it (when supported)
    reasons: list[str] = field(default_factory=list)  # why it cannot run
    config_names: list[str] = field(default_factory=list)  # [[model]] names that use it
    size_bytes: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "path": str(self.path) if self.path else None}


def _supported_types() -> list[str] | None:
    try:
        from pie.models.registry import supported_model_types
    except ImportError:  # the registry is written separately; until it lands support is unknown
        return None
    return list(supported_model_types())


def _dir_size(p: Path) -> int:
    # resolve(): HF cache snapshots are symlinks into blobs/
    return sum(f.resolve().stat().st_size for f in p.rglob("*") if f.is_file())


def inspect_dir(
    model_id: str, source: str, path: Path, supported_types: list[str] | None = None
) -> ModelInfo:
    """Support status of the checkpoint in `path` (pass supported_types to avoid re-importing the registry).

    ✓ (supported) means it runs: config.json normalizes as the executor reads it, tokenizer files are
    there, and every safetensors header is readable (pie.models.check; headers only, milliseconds).
    """
    info = ModelInfo(model_id, source, path)
    try:
        info.model_type = read_config_json(path).get("model_type")
    except ModelError as e:
        info.reasons.append(str(e))
    else:
        if not info.model_type:
            info.reasons.append(f"{path / 'config.json'} has no model_type; is it a causal LM checkpoint?")
    types = supported_types if supported_types is not None else _supported_types()
    if info.model_type and types is not None:
        if info.model_type not in types:
            info.reasons.append(
                f"unsupported model_type '{info.model_type}' (pie runs: {', '.join(sorted(types))})"
            )
        elif (problem := config_problem(path)) is not None:
            info.reasons.append(problem)
    if (problem := tokenizer_problem(path)) is not None:
        info.reasons.append(problem)
    info.reasons += weights_problems(path)
    if info.reasons:
        info.supported = False
    elif types is not None:
        info.supported, info.drivers = True, list(DRIVERS)
    else:
        info.reasons.append(
            f"cannot check model_type '{info.model_type}': pie.models.registry is not available"
        )
    return info


def _scan() -> HFCacheInfo | None:
    from huggingface_hub import scan_cache_dir
    from huggingface_hub.errors import CacheNotFound

    try:
        return scan_cache_dir(hf_cache_dir())
    except CacheNotFound:
        return None


def _cached_repo(info: HFCacheInfo | None, repo: str) -> CachedRepoInfo | None:
    if info is None:
        return None
    return next((r for r in info.repos if r.repo_type == "model" and r.repo_id == repo), None)


def _main_snapshot(repo: CachedRepoInfo) -> Path | None:
    """The revision resolve_model_dir would use: `main`, else the newest snapshot."""
    rev = repo.refs.get("main") or max(repo.revisions, key=lambda r: r.last_modified, default=None)
    return rev.snapshot_path if rev else None


def _config_row(
    hf_repo: str, by_id: dict[str, ModelInfo], out: list[ModelInfo], types: list[str] | None
) -> ModelInfo:
    """The row for a config's hf_repo, adding one for a local directory or a model that is missing."""
    local = Path(hf_repo).expanduser()
    is_path = hf_repo not in by_id and (local.exists() or _looks_like_path(hf_repo))
    key = str(local.resolve()) if is_path else hf_repo  # one row per directory however it is spelled
    if key in by_id:
        return by_id[key]
    if is_path and local.is_dir():
        row = inspect_dir(hf_repo, "local", local.resolve(), types)
        row.size_bytes = _dir_size(local)
    else:
        if is_path:
            why = "not a directory" if local.exists() else "directory does not exist"
        else:
            why = f"not in the HF cache; run `pie model download {hf_repo}`"
        row = ModelInfo(hf_repo, "missing", None, supported=False, reasons=[why])
    by_id[key] = row
    out.append(row)
    return row


def list_models(config: PieConfig | None = None) -> list[ModelInfo]:
    """The embedded model, HF cache repos with a config.json, and the config's local-directory models
    (plus config entries whose model cannot be found, as source "missing")."""
    types = _supported_types()
    out = [inspect_dir(EMBEDDED_MODEL_ID, "embedded", embedded_model_dir(), types)]
    cache = _scan()
    for repo in sorted(cache.repos if cache else [], key=lambda r: r.repo_id.lower()):
        snap = _main_snapshot(repo) if repo.repo_type == "model" else None
        if snap is not None and (snap / "config.json").is_file():
            out.append(inspect_dir(repo.repo_id, "hf-cache", snap, types))
            out[-1].size_bytes = repo.size_on_disk
    by_id = {m.id: m for m in out}
    for entry in config.models if config else []:
        _config_row(entry.hf_repo, by_id, out, types).config_names.append(entry.name)
    if out[0].path and out[0].path.is_dir():
        out[0].size_bytes = _dir_size(out[0].path)
    return out


def download(repo: str) -> Path:
    """Downloads what pie needs of `repo` into the HF cache (tqdm progress on stderr); returns the snapshot."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError

    if repo == EMBEDDED_MODEL_ID:
        raise ModelError(f"'{repo}' ships with pie; there is nothing to download")
    try:
        # ignore "*/*": everything pie loads sits at the repo root; subfolders hold other formats/variants
        path = snapshot_download(
            repo, cache_dir=hf_cache_dir(), allow_patterns=DOWNLOAD_PATTERNS, ignore_patterns=["*/*"]
        )
    # HfHubHTTPError covers 401/404/gated repos; OSError network failures and offline mode;
    # ValueError (HFValidationError) a malformed repo id
    except (HfHubHTTPError, OSError, ValueError) as e:
        raise ModelError(f"could not download '{repo}': {type(e).__name__}: {e}") from None
    snap = Path(path)
    if not (snap / "config.json").is_file():
        raise ModelError(
            f"'{repo}' has no config.json at its root; it is not a Hugging Face model checkpoint"
        )
    return snap


def cache_entry(repo: str) -> tuple[Path, int] | None:
    """(repo folder, bytes on disk) of `repo` in the HF cache, or None."""
    found = _cached_repo(_scan(), repo)
    if found:
        return found.repo_path, found.size_on_disk
    folder = _repo_folder(repo)  # present but unparsable (see remove())
    return (
        (folder, sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())) if folder.is_dir() else None
    )


def _repo_folder(repo: str) -> Path:
    return hf_cache_dir() / ("models--" + repo.replace("/", "--"))


def remove(repo: str) -> int:
    """Deletes `repo` (all revisions and their blobs) from the HF cache; returns the bytes freed."""
    if repo == EMBEDDED_MODEL_ID:
        raise ModelError(f"'{repo}' ships with pie and cannot be removed")
    cache = _scan()
    found = _cached_repo(cache, repo)
    if found is None:
        folder = _repo_folder(repo)
        if folder.is_dir():  # a folder scan_cache_dir reports as corrupted (e.g. an interrupted download)
            shutil.rmtree(folder)
            return 0
        raise ModelError(f"model '{repo}' is not in the HF cache ({hf_cache_dir()}); nothing to remove")
    # Scope the deletion to this repo: delete_revisions matches commit hashes across the whole cache,
    # and a mirrored repo can share its commits with the original.
    only_this = dataclasses.replace(cache, repos=frozenset({found}))
    strategy = only_this.delete_revisions(*(r.commit_hash for r in found.revisions))
    strategy.execute()
    if found.repo_path.exists():  # no revisions left to delete (only blobs/refs): remove the rest
        shutil.rmtree(found.repo_path)
    return strategy.expected_freed_size
