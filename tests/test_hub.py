"""pie.models.hub against a fake HF cache laid out like the real one (no network)."""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

import pytest

from pie.config import parse_config
from pie.errors import ModelError
from pie.models import hub
from pie.paths import EMBEDDED_MODEL_ID, embedded_model_dir

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def tiny_safetensors() -> bytes:
    """A valid safetensors file of one small tensor (the checks read headers only)."""
    import numpy as np
    from safetensors.numpy import save

    return save({"x": np.zeros(4, dtype=np.float32)})


def checkpoint_files(
    model_type: str = "qwen3", safetensors: bool = True, tokenizer: bool = True
) -> dict[str, str | bytes]:
    """Files of a checkpoint that passes pie.models.check: a real config (the embedded model's, with
    `model_type` replaced), a readable safetensors header; the tokenizer files are placeholders."""
    config = json.loads((embedded_model_dir() / "config.json").read_text())
    files: dict[str, str | bytes] = {
        "config.json": json.dumps({**config, "model_type": model_type}),
        "tokenizer_config.json": "{}",
    }
    if safetensors:
        files["model.safetensors"] = tiny_safetensors()
    if tokenizer:
        files["tokenizer.json"] = "{}"
    return files


def add_cached_repo(cache: Path, repo: str, files: dict[str, str | bytes], kind: str = "models") -> Path:
    """Writes `repo` into an HF cache the way huggingface_hub does: blobs/ by hash, snapshots/<commit>/
    symlinks into them, refs/main naming the commit. Returns the snapshot directory."""
    folder = cache / f"{kind}--{repo.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True, exist_ok=True)
    (folder / "refs" / "main").write_text(COMMIT)
    snap = folder / "snapshots" / COMMIT
    snap.mkdir(parents=True, exist_ok=True)
    (folder / "blobs").mkdir(exist_ok=True)
    for name, content in files.items():
        data = content.encode() if isinstance(content, str) else content
        blob = folder / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        link = snap / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    return snap


def write_dir(path: Path, files: dict[str, str | bytes]) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        (path / name).write_bytes(content.encode() if isinstance(content, str) else content)
    return path


def isolate(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """PIE_HOME and the HF cache in tmp; returns the (empty, not yet created) HF hub cache dir."""
    cache = tmp_path / "hf" / "hub"
    monkeypatch.setenv("PIE_HOME", str(tmp_path / "pie"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    return cache


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    return isolate(tmp_path, monkeypatch)


@pytest.fixture
def embedded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    d = write_dir(tmp_path / "embedded", checkpoint_files())
    monkeypatch.setattr(hub, "embedded_model_dir", lambda: d)
    return d


@pytest.fixture
def registry(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hub, "_supported_types", lambda: ["llama", "qwen3"])


def test_cache_dir_follows_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    assert hub.hf_cache_dir() == tmp_path / "home" / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "c"))
    assert hub.hf_cache_dir() == tmp_path / "c"


def test_resolve_embedded(embedded: Path) -> None:
    assert hub.resolve_model_dir(EMBEDDED_MODEL_ID) == embedded.resolve()


def test_resolve_embedded_broken(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hub, "embedded_model_dir", lambda: write_dir(tmp_path / "e", {}))
    with pytest.raises(ModelError, match="no config.json"):
        hub.resolve_model_dir(EMBEDDED_MODEL_ID)


def test_resolve_local_dirs(cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    d = write_dir(tmp_path / "models" / "m", checkpoint_files())
    assert hub.resolve_model_dir(str(d)) == d.resolve()
    monkeypatch.chdir(tmp_path)
    assert hub.resolve_model_dir("models/m") == d.resolve()
    assert hub.resolve_model_dir("./models/m") == d.resolve()
    monkeypatch.setenv("HOME", str(tmp_path))
    assert hub.resolve_model_dir("~/models/m") == d.resolve()


def test_resolve_local_errors(cache: Path, tmp_path: Path) -> None:
    no_config = write_dir(tmp_path / "nocfg", {"model.safetensors": "w"})
    with pytest.raises(ModelError, match="has no config.json"):
        hub.resolve_model_dir(str(no_config))
    with pytest.raises(ModelError, match="does not exist"):
        hub.resolve_model_dir(str(tmp_path / "missing" / "dir"))
    (tmp_path / "file").write_text("x")
    with pytest.raises(ModelError, match="not a directory"):
        hub.resolve_model_dir(str(tmp_path / "file"))


def test_resolve_from_cache(cache: Path) -> None:
    snap = add_cached_repo(cache, "Qwen/Qwen3-0.6B", checkpoint_files())
    assert hub.resolve_model_dir("Qwen/Qwen3-0.6B") == snap.resolve()
    assert hub.is_cached("Qwen/Qwen3-0.6B")
    assert not hub.is_cached("Qwen/Other")


def test_resolve_uses_hf_home_when_hub_cache_unset(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hfhome"))
    snap = add_cached_repo(tmp_path / "hfhome" / "hub", "org/m", checkpoint_files())
    assert hub.resolve_model_dir("org/m") == snap.resolve()


def test_resolve_missing_repo(cache: Path) -> None:
    with pytest.raises(ModelError) as e:
        hub.resolve_model_dir("org/missing")
    msg = str(e.value)
    assert f"model 'org/missing' is not in the HF cache ({cache})" in msg
    assert "run `pie model download org/missing` or set hf_repo to a local directory" in msg


def test_resolve_bad_repo_id(cache: Path) -> None:
    with pytest.raises(ModelError, match="valid repo id"):
        hub.resolve_model_dir("not a repo!")


def test_list_models_statuses(cache: Path, tmp_path: Path, embedded: Path, registry: None) -> None:
    add_cached_repo(cache, "Qwen/Qwen3-0.6B", checkpoint_files())
    add_cached_repo(cache, "org/gpt", checkpoint_files("gpt2"))
    add_cached_repo(cache, "org/nosafe", checkpoint_files(safetensors=False))
    add_cached_repo(cache, "org/notok", checkpoint_files(tokenizer=False))
    add_cached_repo(cache, "org/noconfig", {"README.md": "hi"})  # not a model checkpoint: not listed
    add_cached_repo(cache, "org/data", checkpoint_files(), kind="datasets")  # not a model repo
    local = write_dir(tmp_path / "local-llama", checkpoint_files("llama"))
    cfg = parse_config(
        {
            "model": [
                {"name": "default", "hf_repo": "Qwen/Qwen3-0.6B", "driver": {"type": "dev"}},
                {"name": "mine", "hf_repo": str(local), "driver": {"type": "dev"}},
                {"name": "gone", "hf_repo": "org/not-downloaded", "driver": {"type": "dev"}},
                {"name": "tiny", "hf_repo": EMBEDDED_MODEL_ID, "driver": {"type": "dev"}},
                {"name": "nodir", "hf_repo": str(tmp_path / "no" / "dir"), "driver": {"type": "dev"}},
            ]
        },
        "test",
    )
    rows = {m.id: m for m in hub.list_models(cfg)}
    assert set(rows) == {
        EMBEDDED_MODEL_ID, "Qwen/Qwen3-0.6B", "org/gpt", "org/nosafe", "org/notok", str(local),
        "org/not-downloaded", str(tmp_path / "no" / "dir"),
    }  # fmt: skip
    qwen = rows["Qwen/Qwen3-0.6B"]
    assert (qwen.source, qwen.supported, qwen.drivers, qwen.model_type) == (
        "hf-cache", True, ["cuda_native", "dev"], "qwen3",
    )  # fmt: skip
    assert qwen.config_names == ["default"] and qwen.size_bytes and qwen.size_bytes > 0
    assert rows["org/gpt"].supported is False
    assert rows["org/gpt"].reasons == ["unsupported model_type 'gpt2' (pie runs: llama, qwen3)"]
    [nosafe] = rows["org/nosafe"].reasons
    assert nosafe.startswith("no model.safetensors") and not rows["org/nosafe"].drivers
    [notok] = rows["org/notok"].reasons
    assert notok.startswith("no tokenizer files in") and "tokenizer.json" in notok
    assert rows[str(local)].source == "local" and rows[str(local)].supported
    assert rows[str(local)].config_names == ["mine"]
    gone = rows["org/not-downloaded"]
    assert gone.source == "missing" and "pie model download org/not-downloaded" in gone.reasons[0]
    assert rows[str(tmp_path / "no" / "dir")].reasons == ["directory does not exist"]
    assert rows[EMBEDDED_MODEL_ID].supported and rows[EMBEDDED_MODEL_ID].config_names == ["tiny"]
    json.dumps([m.to_dict() for m in rows.values()])  # machine-readable form serializes


def test_list_models_real_registry(cache: Path, embedded: Path) -> None:
    add_cached_repo(cache, "org/q", checkpoint_files("qwen3"))
    add_cached_repo(cache, "org/w", checkpoint_files("not_a_real_arch"))
    rows = {m.id: m for m in hub.list_models(None)}
    assert rows["org/q"].supported is True
    assert rows["org/w"].reasons[0].startswith("unsupported model_type 'not_a_real_arch' (pie runs: ")


def test_list_models_without_registry(cache: Path, embedded: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pie.models.registry", None)  # import now raises ImportError
    add_cached_repo(cache, "org/q", checkpoint_files())
    add_cached_repo(cache, "org/nosafe", checkpoint_files(safetensors=False))
    rows = {m.id: m for m in hub.list_models(None)}
    assert rows["org/q"].supported is None and "registry" in rows["org/q"].reasons[0]
    assert rows["org/nosafe"].supported is False  # a missing file is known without the registry


def test_list_models_empty_cache(cache: Path, embedded: Path) -> None:
    assert [m.id for m in hub.list_models(None)] == [EMBEDDED_MODEL_ID]


def test_remove(cache: Path, registry: None) -> None:
    add_cached_repo(cache, "org/a", checkpoint_files())
    add_cached_repo(cache, "org/b", checkpoint_files("llama"))
    assert hub.cache_entry("org/a") is not None
    freed = hub.remove("org/a")
    assert freed > 0 and not (cache / "models--org--a").exists()
    assert (cache / "models--org--b").is_dir()
    assert hub.cache_entry("org/a") is None
    with pytest.raises(ModelError, match="not in the HF cache"):
        hub.remove("org/a")
    with pytest.raises(ModelError, match="ships with pie"):
        hub.remove(EMBEDDED_MODEL_ID)
    (cache / "models--org--broken" / "blobs").mkdir(parents=True)  # interrupted download: no snapshots/
    assert hub.cache_entry("org/broken") is not None
    hub.remove("org/broken")
    assert not (cache / "models--org--broken").exists()


def test_download_passes_patterns_and_checks_result(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub

    seen: dict = {}
    real = huggingface_hub.snapshot_download

    def fake_snapshot_download(repo_id: str, **kw) -> str:
        seen.update(kw, repo_id=repo_id)
        return str(add_cached_repo(Path(kw["cache_dir"]), repo_id, checkpoint_files()))

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    snap = hub.download("org/new")
    assert (snap / "config.json").is_file() and seen["cache_dir"] == cache
    for pattern in ("config.json", "*.safetensors", "model.safetensors.index.json", "tokenizer.json",
                    "tokenizer_config.json", "chat_template.jinja", "tokenizer.model", "merges.txt"):  # fmt: skip
        assert pattern in seen["allow_patterns"]
    monkeypatch.setattr(huggingface_hub, "snapshot_download", real)
    assert hub.resolve_model_dir("org/new") == snap.resolve()  # found offline afterwards


def test_download_errors_become_model_errors(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    def offline(repo_id: str, **kw) -> str:
        raise LocalEntryNotFoundError("Got: ConnectError: Name or service not known")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(ModelError, match="could not download 'org/x'.*Name or service not known"):
        hub.download("org/x")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo_id, **kw: str(cache))
    with pytest.raises(ModelError, match="no config.json"):
        hub.download("org/x")
    with pytest.raises(ModelError, match="ships with pie"):
        hub.download(EMBEDDED_MODEL_ID)


# ---- broken model directories: ✓ means it runs; every problem names the file -------------------


def _broken_dirs(tmp_path: Path) -> dict[str, Path]:
    good = checkpoint_files("qwen3")
    config = json.loads(good["config.json"])
    # a rope type pie rejects (yarn was one until it was implemented)
    longrope = {**config, "rope_parameters": {"rope_theta": 1e6, "rope_type": "longrope", "factor": 4.0}}
    full = tiny_safetensors()
    return {
        "ok": write_dir(tmp_path / "ok", good),
        "notok": write_dir(tmp_path / "notok", checkpoint_files(tokenizer=False)),
        "badjson": write_dir(tmp_path / "badjson", {**good, "config.json": "{not json"}),
        "zero": write_dir(tmp_path / "zero", {**good, "model.safetensors": b""}),
        "trunc": write_dir(tmp_path / "trunc", {**good, "model.safetensors": full[: len(full) - 7]}),
        "longrope": write_dir(tmp_path / "longrope", {**good, "config.json": json.dumps(longrope)}),
    }


def test_model_list_marks_only_runnable_dirs(tmp_path: Path, cache: Path, embedded: Path) -> None:
    dirs = _broken_dirs(tmp_path)
    rows = {name: hub.inspect_dir(name, "local", d) for name, d in dirs.items()}
    assert rows["ok"].supported is True and rows["ok"].reasons == []
    for name in ("notok", "badjson", "zero", "trunc", "longrope"):
        assert rows[name].supported is False, name
    [r] = rows["notok"].reasons
    assert "no tokenizer files in" in r and str(dirs["notok"]) in r
    [r] = rows["badjson"].reasons
    assert f"{dirs['badjson'] / 'config.json'} is not valid JSON" in r and "tokenizer" not in r
    [r] = rows["zero"].reasons
    assert f"{dirs['zero'] / 'model.safetensors'} is empty (0 bytes" in r and "re-download" in r
    [r] = rows["trunc"].reasons
    assert f"{dirs['trunc'] / 'model.safetensors'} is not a readable safetensors file" in r
    [r] = rows["longrope"].reasons
    assert str(dirs["longrope"] / "config.json") in r and "rope type 'longrope' is not supported" in r


def test_tokenizer_reports_a_broken_config_and_missing_tokenizer_by_name(tmp_path: Path) -> None:
    from pie.models.tokenizer import Tokenizer

    dirs = _broken_dirs(tmp_path)
    with pytest.raises(ModelError, match=r"no tokenizer files in .*notok"):
        Tokenizer.from_dir(dirs["notok"])
    with pytest.raises(ModelError, match=r"badjson/config.json is not valid JSON"):
        Tokenizer.from_dir(dirs["badjson"])


def test_driver_factory_names_a_truncated_safetensors_file(tmp_path: Path) -> None:
    from pie.config import DevOptions, DriverConfig, ModelEntry
    from pie.drivers.factory import executor_spec

    dirs = _broken_dirs(tmp_path)
    for name in ("zero", "trunc"):
        entry = ModelEntry("m", str(dirs[name]), DriverConfig("dev", ["cpu"], 1, "float32", DevOptions()))
        with pytest.raises(ModelError, match=f"{name}/model.safetensors is"):
            executor_spec(entry)


def test_weight_loader_names_a_truncated_file(tmp_path: Path, tiny_checkpoint) -> None:
    """Even past the checks (a file truncated after them), loading names the file: no traceback."""
    import shutil

    import torch

    from pie.models.weights import load_weights

    d = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint("qwen3"), d)
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelError, match=r"ckpt/model.safetensors is not a readable safetensors file"):
        load_weights(torch.nn.Linear(2, 2), d)


def test_doctor_reports_a_broken_default_model(tmp_path: Path, cache: Path, capsys) -> None:
    from pie.cli.main import main

    dirs = _broken_dirs(tmp_path)
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[[model]]\nhf_repo = "{dirs["zero"]}"\n[model.driver]\ntype = "dev"\n')
    assert main(["doctor", "-c", str(cfg)]) == 1
    out = capsys.readouterr().out
    assert "✗ default model (default)" in out and "model.safetensors is empty (0 bytes" in out
