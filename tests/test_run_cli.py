"""`pie run`: argument parsing, and end to end on a tiny model (in-process and through the dev driver)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from pie.cli.main import build_parser, main
from pie.cli.run_cmd import UsageError, build_input, parse_inferlet_args, parse_value
from pie.paths import embedded_model_dir

SRC = Path(__file__).resolve().parents[1] / "src"


def test_parse_value_types():
    assert [parse_value(v) for v in ["64", "-3", "0.5", "1e-3", "true", "False", "hi", "1.2.3", ""]] == [
        64,
        -3,
        0.5,
        1e-3,
        True,
        False,
        "hi",
        "1.2.3",
        "",
    ]
    assert isinstance(parse_value("7"), int) and isinstance(parse_value("7.0"), float)


def test_parse_inferlet_args():
    got = parse_inferlet_args(
        [
            "--max-tokens",
            "64",
            "--prompt",
            "Hi there",
            "--ignore-eos",
            "--temperature",
            "-1.5",
            "--stop=--",
            "--flag",
        ]
    )
    assert got == {
        "max_tokens": 64,
        "prompt": "Hi there",
        "ignore_eos": True,
        "temperature": -1.5,
        "stop": "--",
        "flag": True,
    }
    with pytest.raises(UsageError, match="unexpected inferlet argument 'stray'"):
        parse_inferlet_args(["--a", "1", "stray"])
    with pytest.raises(UsageError, match="unexpected inferlet argument '--'"):
        parse_inferlet_args(["--"])


def _input(argv):
    return build_input(build_parser().parse_args(argv))


def test_input_from_argv():
    assert _input(["run", "x.py", "--", "--max-tokens", "64", "--flag"]) == {"max_tokens": 64, "flag": True}
    assert _input(["run", "x.py"]) == {}
    # --input JSON, before or after NAME_OR_PATH; trailing arguments override its keys
    assert _input(["run", "--input", '{"a": 1, "b": [2]}', "x.py"]) == {"a": 1, "b": [2]}
    assert _input(["run", "x.py", "--input", '{"a": 1}', "--", "--a", "2", "--c", "x"]) == {"a": 2, "c": "x"}
    args = build_parser().parse_args(["run", "x.py", "--model", "m2", "--in-process", "--", "--model", "m3"])
    assert build_input(args) == {"model": "m3"} and args.model == "m2" and args.in_process
    with pytest.raises(UsageError, match="not valid JSON"):
        _input(["run", "x.py", "--input", "{nope"])
    with pytest.raises(UsageError, match="must be a JSON object"):
        _input(["run", "x.py", "--input", "[1]"])


# ---- end to end ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory):
    pytest.importorskip("pie.drivers.executor", reason="the model executor is not in this tree yet")
    from tiny_models import make_tiny_checkpoint

    root = tmp_path_factory.mktemp("run")
    model = make_tiny_checkpoint(root / "qwen3", "qwen3")
    cfg = root / "config.toml"
    cfg.write_text(
        f'[[model]]\nname = "tiny"\nhf_repo = "{model}"\n[model.driver]\ntype = "dev"\ndevice = ["cpu"]\n'
        'activation_dtype = "float32"\n[model.driver.options]\nkv_page_size = 4\nmax_batch_tokens = 64\n'
    )
    return cfg


@pytest.fixture(autouse=True)
def pie_home(tmp_path, monkeypatch):
    monkeypatch.setenv("PIE_HOME", str(tmp_path / "pie-home"))


PROMPT = ["--", "--prompt", "Hello there", "--max-tokens", "8", "--temperature", "0"]


def test_run_in_process_prints_only_the_result(tiny_config, capsys):
    assert main(["run", "-c", str(tiny_config), "--in-process", "text-completion", *PROMPT]) == 0
    out, err = capsys.readouterr()
    assert out.endswith("\n") and out.count("\n") >= 1 and "pie: model 'tiny' ready" in err
    assert "pie:" not in out
    first = out
    assert main(["run", "-c", str(tiny_config), "--in-process", "text-completion", *PROMPT]) == 0
    assert capsys.readouterr().out == first  # argmax: the same text again


def test_run_errors_and_exit_codes(tiny_config, tmp_path, capsys):
    bad = tmp_path / "bad.py"
    bad.write_text("async def main(input):\n    raise ValueError('boom ' + str(input['n']))\n")
    assert main(["run", "-c", str(tiny_config), "--in-process", str(bad), "--", "--n", "3"]) == 1
    out, err = capsys.readouterr()
    assert out == "" and "inferlet failed: ValueError: boom 3" in err and f"{bad}:2 in main" in err
    # a PieError from the inferlet exits with its code and its message
    assert main(["run", "-c", str(tiny_config), "--in-process", "text-completion"]) == 1
    assert "missing argument --prompt" in capsys.readouterr().err
    assert main(["run", "-c", str(tiny_config), "--model", "nope", "text-completion", *PROMPT]) == 1
    assert "configured models: 'tiny'" in capsys.readouterr().err
    assert main(["run", "-c", str(tiny_config), "no-such-inferlet"]) == 1
    assert "unknown inferlet 'no-such-inferlet'" in capsys.readouterr().err
    assert main(["run", "-c", str(tmp_path / "missing.toml"), "text-completion", *PROMPT]) == 2
    assert "no config file" in capsys.readouterr().err


def assert_dev_driver_matches_in_process(cfg: Path, args: list[str], capsys, **env: str) -> str:
    """`pie run -c cfg --in-process ARGS`, then `python -m pie run -c cfg ARGS` in a subprocess (the dev driver
    in its own process; env added to its environment): the same stdout. Returns that stdout."""
    assert main(["run", "-c", str(cfg), "--in-process", *args]) == 0
    in_process = capsys.readouterr().out
    r = subprocess.run(
        [sys.executable, "-m", "pie", "run", "-c", str(cfg), *args],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(SRC), **env},
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout == in_process and "dev driver" in r.stderr
    return in_process


def test_run_through_the_dev_driver_subprocess(tiny_config, capsys):
    pytest.importorskip("pie.drivers.dev.client", reason="the dev driver is not in this tree yet")
    assert_dev_driver_matches_in_process(tiny_config, ["text-completion", *PROMPT], capsys)


def test_missing_default_config_uses_defaults_and_says_so(capsys):
    rc = main(["run", "text-completion", "--in-process", "--", "--prompt", "Hi", "--max-tokens", "4"])
    err = capsys.readouterr().err
    assert "using the default config" in err
    if not (embedded_model_dir() / "model.safetensors").exists():
        assert rc != 0 and "embedded model" in err


def test_default_embedded_model_end_to_end(capsys):
    if not (embedded_model_dir() / "model.safetensors").exists():
        pytest.skip(
            "the embedded default model (src/pie/assets/default-model/model.safetensors) is not there yet"
        )
    argv = ["run", "--in-process", "text-completion", "--", "--prompt", "Hello", "--max-tokens", "8"]
    assert main([*argv, "--temperature", "0"]) == 0
    out, err = capsys.readouterr()
    assert out.endswith("\n") and "pie: model 'default' ready" in err and "pie:" not in out


def test_doctor_passes_on_a_valid_dev_config_and_fails_on_a_broken_one(tiny_config, tmp_path, capsys):
    pytest.importorskip("pie.drivers.dev.interpreter", reason="the dev driver is not in this tree yet")
    assert main(["doctor", "-c", str(tiny_config)]) == 0
    out = capsys.readouterr().out
    assert "✓ config" in out and "✓ default model (tiny)" in out and "(qwen3, dev driver)" in out
    broken = tmp_path / "broken.toml"
    broken.write_text(
        '[[model]]\nname = "x"\nhf_repo = "/nonexistent/model"\n[model.driver]\ntype = "dev"\n'
        'device = ["cpu"]\n'
    )
    assert main(["doctor", "-c", str(broken)]) == 1
    out = capsys.readouterr().out
    assert "✗ default model (x)" in out and "hint:" in out and "1 required check(s) failed" in out


def test_factory_maps_config_options_to_the_executor_spec(tmp_path):
    from pie.config import CudaNativeOptions, DevOptions, DriverConfig, ModelEntry
    from pie.drivers.factory import create_driver, executor_spec
    from pie.drivers.inprocess import InProcessDriver
    from pie.errors import ConfigError

    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text((embedded_model_dir() / "config.json").read_text())
    (model / "model.safetensors").symlink_to(embedded_model_dir() / "model.safetensors")
    opts = CudaNativeOptions(kv_page_size=64, max_num_kv_pages=77, gpu_mem_utilization=0.5, max_batch_size=9)
    entry = ModelEntry("a", str(model), DriverConfig("cuda_native", ["cuda:1"], 1, "bfloat16", opts))
    spec = executor_spec(entry)
    assert (spec.model_path, spec.device, spec.activation_dtype, spec.kv_policy) == (
        str(model.resolve()),
        "cuda:1",
        "bfloat16",
        "cuda_native",
    )
    assert (spec.page_size, spec.max_num_kv_pages, spec.gpu_mem_utilization, spec.max_batch_size) == (
        64,
        77,
        0.5,
        9,
    )
    assert spec.weight_dtype == "bfloat16"
    dev = ModelEntry("b", str(model), DriverConfig("dev", ["cpu"], 1, "float32", DevOptions(max_dist_size=5)))
    spec = executor_spec(dev)
    assert (spec.kv_policy, spec.page_size, spec.max_dist_size, spec.weight_dtype) == ("dev", 16, 5, "auto")
    assert isinstance(create_driver(dev, in_process=True), InProcessDriver)
    tp = ModelEntry("c", str(model), DriverConfig("dev", ["cpu", "cpu"], 2, "float32", DevOptions()))
    spec = executor_spec(tp)
    assert (spec.tensor_parallel_size, spec.devices, spec.device) == (2, ["cpu", "cpu"], "cpu")
    # 6 query heads do not split over 4 ranks: said before any process starts
    tp4 = ModelEntry("d", str(model), DriverConfig("dev", ["cpu"] * 4, 4, "float32", DevOptions()))
    with pytest.raises(
        ConfigError, match="num_attention_heads = 6 is not divisible by tensor_parallel_size 4"
    ):
        executor_spec(tp4)


def test_unsupported_model_type_fails_before_a_driver_starts(tmp_path):
    from pie.config import DevOptions, DriverConfig, ModelEntry
    from pie.drivers.factory import create_driver
    from pie.errors import ModelError

    (tmp_path / "config.json").write_text('{"model_type": "gpt2", "n_embd": 64}')
    entry = ModelEntry("m", str(tmp_path), DriverConfig("dev", ["cpu"], 1, "float32", DevOptions()))
    with pytest.raises(
        ModelError, match="'gpt2' is not supported; supported types: .*llama, ministral.*qwen3"
    ):
        create_driver(entry)


def test_run_with_a_stopped_dev_driver_fails_and_leaves_no_process(tiny_config, tmp_path):
    """SIGSTOP on the dev child: `pie run` fails with a DriverError after heartbeat_timeout_s, no hang."""
    import signal
    import time

    cfg = tmp_path / "config.toml"
    cfg.write_text(tiny_config.read_text() + "heartbeat_timeout_s = 1\nshutdown_timeout_s = 0.5\n")
    forever = tmp_path / "forever.py"
    forever.write_text(
        "from pie.sdk import Context, Model, Sampler\n"
        "async def main(input):\n"
        "    while True:\n"
        "        async with Context(Model.load()) as ctx:\n"
        "            ctx.user('hello').cue()\n"
        "            await ctx.generate(Sampler.argmax(), max_tokens=8).collect_text()\n"
    )
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    p = subprocess.Popen(
        [sys.executable, "-m", "pie", "run", "-c", str(cfg), str(forever)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        child = None
        deadline = time.monotonic() + 120
        while child is None and time.monotonic() < deadline and p.poll() is None:
            kids = subprocess.run(["pgrep", "-P", str(p.pid)], capture_output=True, text=True).stdout.split()
            child = int(kids[0]) if kids else None
            time.sleep(0.2)
        assert child is not None, "the dev driver child never started"
        time.sleep(3)  # let it load and start generating
        os.kill(child, signal.SIGSTOP)
        out, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 1 and out == ""
    assert "dev driver stopped answering: no heartbeat for" in err and "Traceback" not in err
    assert (
        not Path(f"/proc/{child}").exists()
        or "Z" in Path(f"/proc/{child}/stat").read_text().split(")")[1][:3]
    )


def test_verbose_shows_info_logs_on_stderr_and_keeps_stdout_clean(tiny_config):
    """`pie -v run`: log.info of the executor (in the dev driver's child) reaches stderr; not without -v."""
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    env.pop("PIE_LOG_LEVEL", None)
    base = [sys.executable, "-m", "pie"]
    args = ["run", "-c", str(tiny_config), "text-completion", *PROMPT]
    quiet = subprocess.run(base + args, capture_output=True, text=True, env=env, timeout=300)
    loud = subprocess.run(base + ["-v"] + args, capture_output=True, text=True, env=env, timeout=300)
    assert quiet.returncode == loud.returncode == 0, loud.stderr
    assert "executor ready: qwen3 on cpu" not in quiet.stderr
    assert "pie: INFO pie.drivers.executor: executor ready: qwen3 on cpu" in loud.stderr
    assert loud.stdout == quiet.stdout and "INFO" not in loud.stdout


def test_verbose_in_process_and_after_the_subcommand(tiny_config, capsys):
    import logging

    try:
        assert main(["run", "-v", "-c", str(tiny_config), "--in-process", "text-completion", *PROMPT]) == 0
        out, err = capsys.readouterr()
        assert "executor ready" in err and "executor ready" not in out
    finally:
        logging.getLogger("pie").setLevel(logging.WARNING)
        os.environ.pop("PIE_LOG_LEVEL", None)


def test_text_that_is_not_unicode_is_rejected_where_it_enters(tmp_path):
    with pytest.raises(UsageError, match=r"argument --prompt is not valid text: byte 0xff at character 1"):
        _input(["run", "x.py", "--", "--prompt", "a\udcffb"])  # how Python decodes argv byte 0xff
    with pytest.raises(UsageError, match=r"--input\['m'\]\[1\] is not valid text: lone surrogate U\+D800"):
        _input(["run", "x.py", "--input", '{"m": ["ok", "x\\ud800"]}'])
    from pie.errors import ModelError
    from pie.models.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(embedded_model_dir())
    with pytest.raises(ModelError, match="cannot tokenize text: lone surrogate U\\+DFFF at character 2"):
        tok.encode("ab\udfff")
    # end to end: a non-UTF-8 byte on the command line, no traceback
    r = subprocess.run(
        [sys.executable, "-m", "pie", "run", "text-completion", "--", "--prompt", b"a\xffb"],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(SRC), "PIE_HOME": str(tmp_path)},
        timeout=120,
    )
    assert (
        r.returncode == 2
        and "byte 0xff at character 1 is not UTF-8" in r.stderr
        and "Traceback" not in r.stderr
    )
