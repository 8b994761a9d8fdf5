"""`pie config` and `pie model` through pie.cli.main.main, with only these two command modules loaded."""

from __future__ import annotations

import io
import json
import tomllib
from pathlib import Path

import pytest
from test_hub import add_cached_repo, checkpoint_files, isolate, write_dir

import pie.cli.main as cli
from pie.config import loader
from pie.models import hub
from pie.paths import EMBEDDED_MODEL_ID


@pytest.fixture(autouse=True)
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Isolated PIE_HOME / HF cache, no CUDA, a fake embedded model, a fixed registry."""
    cache = isolate(tmp_path, monkeypatch)
    monkeypatch.setattr(cli, "COMMANDS", ["config_cmd", "model_cmd"])  # other modules may not exist yet
    monkeypatch.setattr(loader, "_cuda_available", lambda: False)
    embedded = write_dir(tmp_path / "embedded", checkpoint_files())
    monkeypatch.setattr(hub, "embedded_model_dir", lambda: embedded)
    monkeypatch.setattr(hub, "_supported_types", lambda: ["llama", "qwen3"])
    return cache


def pie(*argv: str) -> int:
    return cli.main(list(argv))


def test_init_writes_dev_cpu_with_embedded_model(tmp_path: Path, capsys) -> None:
    assert pie("config", "init") == 0
    path = tmp_path / "pie" / "config.toml"  # $PIE_HOME/config.toml
    doc = tomllib.loads(path.read_text())
    model = doc["model"][0]
    assert model["hf_repo"] == EMBEDDED_MODEL_ID
    assert (model["driver"]["type"], model["driver"]["device"]) == ("dev", ["cpu"])
    assert model["driver"]["activation_dtype"] == "float32"
    err = capsys.readouterr().err
    assert str(path) in err and "pie model download Qwen/Qwen3-0.6B" in err


def test_init_prefers_cached_qwen(env: Path, tmp_path: Path) -> None:
    add_cached_repo(env, "Qwen/Qwen3-0.6B", checkpoint_files())
    path = tmp_path / "elsewhere.toml"
    assert pie("config", "init", "-c", str(path)) == 0
    assert tomllib.loads(path.read_text())["model"][0]["hf_repo"] == "Qwen/Qwen3-0.6B"


def test_init_on_cuda(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(loader, "_cuda_available", lambda: True)
    path = tmp_path / "c.toml"
    assert pie("config", "init", "-c", str(path)) == 0
    driver = tomllib.loads(path.read_text())["model"][0]["driver"]
    assert (driver["type"], driver["device"], driver["activation_dtype"]) == (
        "cuda_native",
        ["cuda:0"],
        "bfloat16",
    )


def test_init_refuses_to_overwrite_without_force(tmp_path: Path, capsys) -> None:
    path = tmp_path / "c.toml"
    path.write_text("# mine\n")
    assert pie("config", "init", "-c", str(path)) == 2
    err = capsys.readouterr().err
    assert "already exists" in err and "--force" in err and "Traceback" not in err
    assert path.read_text() == "# mine\n"
    assert pie("config", "init", "-c", str(path), "--force") == 0
    assert "[[model]]" in path.read_text()


def test_show_fills_defaults(tmp_path: Path, capsys) -> None:
    path = tmp_path / "c.toml"
    path.write_text('[[model]]\nhf_repo = "org/m"\n[model.driver]\ntype = "dev"\n')
    assert pie("config", "show", "-c", str(path)) == 0
    out = capsys.readouterr().out
    doc = tomllib.loads(out)  # pipe-friendly: stdout is valid TOML
    opts = doc["model"][0]["driver"]["options"]
    assert opts["kv_page_size"] == 16 and opts["max_num_adapters"] == 32 and opts["weight_dtype"] == "auto"
    assert doc["model"][0]["name"] == "default" and doc["model"][0]["driver"]["device"] == ["cpu"]
    assert "# cap on the k of a distribution probe" in out


def test_show_without_file_prints_defaults(capsys) -> None:
    assert pie("config", "show") == 0
    captured = capsys.readouterr()
    assert tomllib.loads(captured.out)["model"][0]["driver"]["type"] == "dev"
    assert "no config file" in captured.err


def test_show_reports_errors_without_traceback(tmp_path: Path, capsys) -> None:
    path = tmp_path / "c.toml"
    path.write_text("[[model]]\n[model.driver.options]\ngpu_mem_utilisation = 0.5\n")
    assert pie("config", "show", "-c", str(path)) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {path}: ") and "did you mean 'gpu_mem_utilization'" in err
    assert "Traceback" not in err


def test_set_edits_and_validates(tmp_path: Path, capsys) -> None:
    path = tmp_path / "c.toml"
    assert pie("config", "init", "-c", str(path)) == 0
    assert pie("config", "set", "model.driver.options.kv_page_size", "32", "-c", str(path)) == 0
    assert tomllib.loads(path.read_text())["model"][0]["driver"]["options"]["kv_page_size"] == 32
    before = path.read_bytes()
    assert pie("config", "set", "model.driver.options.kv_page_size", "24", "-c", str(path)) == 2
    assert path.read_bytes() == before
    assert "power of two" in capsys.readouterr().err


def test_runtime_section_set_and_show(tmp_path: Path, capsys) -> None:
    path = tmp_path / "c.toml"
    assert pie("config", "init", "-c", str(path)) == 0
    assert pie("config", "set", "runtime.snapshot_dir", "snaps", "-c", str(path)) == 0
    assert tomllib.loads(path.read_text())["runtime"] == {"snapshot_dir": "snaps"}
    capsys.readouterr()
    assert pie("config", "show", "-c", str(path)) == 0
    out = capsys.readouterr().out
    assert (
        "[runtime]\n# directory where named context snapshots persist" in out
        and 'snapshot_dir = "snaps"' in out
    )
    before = path.read_bytes()
    assert pie("config", "set", "runtime.snapshot_dri", "x", "-c", str(path)) == 2
    err = capsys.readouterr().err
    assert (
        "[runtime]: unknown key 'snapshot_dri'; did you mean 'snapshot_dir'?" in err
        and "Traceback" not in err
    )
    assert path.read_bytes() == before


def test_config_without_subcommand_prints_help(capsys) -> None:
    assert pie("config") == 2
    assert "init" in capsys.readouterr().err


def _populate(cache: Path) -> None:
    add_cached_repo(cache, "Qwen/Qwen3-0.6B", checkpoint_files())
    add_cached_repo(cache, "org/gpt", checkpoint_files("gpt2"))


def test_model_list_table(env: Path, capsys) -> None:
    _populate(env)
    assert pie("model", "list") == 0
    lines = {line.split()[1]: line for line in capsys.readouterr().out.splitlines()[1:]}
    assert lines["Qwen/Qwen3-0.6B"].startswith("✓") and "cuda_native, dev" in lines["Qwen/Qwen3-0.6B"]
    assert lines["org/gpt"].startswith("○") and "unsupported model_type 'gpt2'" in lines["org/gpt"]
    assert lines[EMBEDDED_MODEL_ID].startswith("✓")


def test_model_list_json(env: Path, tmp_path: Path, capsys) -> None:
    _populate(env)
    path = tmp_path / "c.toml"
    path.write_text('[[model]]\nname = "main"\nhf_repo = "Qwen/Qwen3-0.6B"\n[model.driver]\ntype = "dev"\n')
    assert pie("model", "list", "--json", "-c", str(path)) == 0
    rows = {r["id"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["Qwen/Qwen3-0.6B"]["supported"] is True and rows["Qwen/Qwen3-0.6B"]["config_names"] == [
        "main"
    ]
    assert rows["org/gpt"]["supported"] is False and rows["org/gpt"]["drivers"] == []


def test_model_remove(env: Path, capsys, monkeypatch: pytest.MonkeyPatch) -> None:
    _populate(env)
    monkeypatch.setattr("sys.stdin", io.StringIO(""))  # not a terminal: needs -y
    assert pie("model", "remove", "org/gpt") == 1
    assert "-y" in capsys.readouterr().err and (env / "models--org--gpt").exists()
    monkeypatch.setattr("sys.stdin", io.StringIO("n\n"))
    monkeypatch.setattr("sys.stdin.isatty", lambda: True)
    assert pie("model", "remove", "org/gpt") == 1
    assert (env / "models--org--gpt").exists()
    assert pie("model", "remove", "org/gpt", "-y") == 0
    assert not (env / "models--org--gpt").exists() and (env / "models--Qwen--Qwen3-0.6B").exists()
    assert pie("model", "remove", "org/gpt", "-y") == 1
    assert "not in the HF cache" in capsys.readouterr().err


def test_model_download_failure_is_clean(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    def offline(repo_id: str, **kw) -> str:
        raise LocalEntryNotFoundError("cannot reach the Hub")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    assert pie("model", "download", "org/x") == 1
    err = capsys.readouterr().err
    assert (
        "error: could not download 'org/x'" in err
        and "cannot reach the Hub" in err
        and "Traceback" not in err
    )


def test_model_download_prints_snapshot(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    import huggingface_hub

    def fake(repo_id: str, **kw) -> str:
        return str(add_cached_repo(Path(kw["cache_dir"]), repo_id, checkpoint_files()))

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    assert pie("model", "download", "org/new") == 0
    captured = capsys.readouterr()
    assert Path(captured.out.strip()).joinpath("config.json").is_file()
    assert "✓ org/new runs on cuda_native, dev" in captured.err


def test_model_list_keeps_the_cache_line_apart_from_the_table(env: Path, capsys, monkeypatch) -> None:
    """Shared terminal (or 2>&1): the HF cache line is separated from the last row by a blank line."""
    import sys

    shared = io.StringIO()
    monkeypatch.setattr(sys, "stdout", shared)
    monkeypatch.setattr(sys, "stderr", shared)
    assert pie("model", "list") == 0
    lines = shared.getvalue().splitlines()
    assert lines[-1] == f"HF cache: {env}" and lines[-2] == "" and lines[-3].startswith("✓ ")
