"""DevDriver end to end (child process with tests/dev_stub_executor.py), interpreter resolution,
and the `pie driver dev ...` commands.

Run as a script to measure the channel's round-trip cost:
    PYTHONPATH=src python tests/test_dev_driver.py [N]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from dev_stub_executor import CRASH_TOKEN, ERROR_TOKEN, GARBAGE_TOKEN, SLEEP_TOKEN, VOCAB

from pie.cli import driver_cmd
from pie.drivers.dev import interpreter
from pie.drivers.dev.client import DevDriver, OutputTail, describe_status
from pie.drivers.protocol import BatchError, ForwardBatch, make_batch
from pie.drivers.spec import ExecutorSpec
from pie.errors import ConfigError, DriverError, PieError

TESTS_DIR = Path(__file__).resolve().parent

SPEC = ExecutorSpec(model_path="/stub/model", num_pages=32, page_size=16)


@pytest.fixture(autouse=True)
def child_can_import_stub(monkeypatch, tmp_path):
    """The child inherits PYTHONPATH (after pie's own root): let it import tests/dev_stub_executor.py."""
    monkeypatch.setenv("PYTHONPATH", str(TESTS_DIR))
    monkeypatch.setenv("PIE_HOME", str(tmp_path / "pie_home"))
    for var in ("PIE_PYTHON", "VIRTUAL_ENV"):
        monkeypatch.delenv(var, raising=False)


def stub_driver(variant: str = "StubExecutor", **kw) -> DevDriver:
    return DevDriver(SPEC, python=sys.executable, executor=f"dev_stub_executor:{variant}", **kw)


def one(tokens: list[int], start: int = 0, page: int = 0, **extra) -> dict:
    """One request whose tokens sit at positions start.. in a single page; the last token is an output."""
    n = len(tokens)
    return dict(
        token_ids=tokens,
        positions=list(range(start, start + n)),
        pages=[page],
        last_page_len=n,
        outputs=[n - 1],
        **extra,
    )


def run(coro, timeout: float = 60.0):
    """asyncio.run with a bound: a driver that hangs fails the test instead of stalling the suite."""
    return asyncio.run(asyncio.wait_for(coro, timeout))


# ---- happy path --------------------------------------------------------------------------------


def test_handshake_forward_round_trip_and_clean_shutdown(capsys):
    async def main():
        d = stub_driver()
        caps = await d.start()
        assert caps.architecture == "stub" and caps.vocab_size == VOCAB and caps.num_pages == 32
        assert d.capabilities is caps and caps.extra["pid"] == d.proc.pid
        assert d.interpreter_rule == "model option python"
        batch = make_batch(
            [one([5, 6, 7], dist_k=3, return_logits=True), one([41], start=9, page=1)], page_size=16
        )
        batch.return_logprobs = True
        res = await d.forward(batch)
        np.testing.assert_array_equal(res.tokens, [8, 42])
        assert res.logits.shape == (1, VOCAB) and res.logits[0].argmax() == 8
        assert res.logprobs.shape == (2,) and res.dist_ids.shape == (2, 3)
        np.testing.assert_array_equal(res.dist_ids[:, 0], [8, 42])
        await d.shutdown()
        assert d.proc.returncode == 0
        with pytest.raises(DriverError, match="shut down"):
            await d.forward(batch)
        await d.shutdown()  # idempotent

    run(main())
    err = capsys.readouterr().err
    assert "[dev-driver] stub: loaded /stub/model" in err  # child output is forwarded with a prefix


def test_concurrent_forwards_get_their_own_results():
    async def main():
        d = stub_driver()
        await d.start()
        # The first forward holds the child for 200 ms, so the other 15 are queued in flight at once.
        batches = [make_batch([one([SLEEP_TOKEN], start=200)], 16)]
        batches += [make_batch([one([i, 10 + i], page=i % 32)], 16) for i in range(15)]
        tasks = [asyncio.create_task(d.forward(b)) for b in batches]
        await asyncio.sleep(0.05)
        assert len(d._pending) == 16
        results = await asyncio.gather(*tasks)
        assert [int(r.tokens[0]) for r in results] == [SLEEP_TOKEN + 1] + [11 + i for i in range(15)]
        await d.shutdown()

    run(main())


def test_forward_errors_are_per_request_and_the_driver_stays_up():
    async def main():
        d = stub_driver()
        await d.start()
        with pytest.raises(DriverError, match=r"forward failed \(ValueError\): stub: token 902 is poisonous"):
            await d.forward(make_batch([one([1, ERROR_TOKEN])], 16))
        with pytest.raises(BatchError, match="kv_page_indices out of range"):
            await d.forward(make_batch([one([1, 2], page=99)], 16))
        res = await d.forward(make_batch([one([1, 2])], 16))
        assert int(res.tokens[0]) == 3 and d.proc.returncode is None
        await d.shutdown()

    run(main())


# ---- failures ------------------------------------------------------------------------------------


def test_child_dying_mid_forward_fails_all_in_flight_and_later_forwards():
    async def main():
        d = stub_driver()
        await d.start()
        t0 = time.monotonic()
        crash = asyncio.create_task(d.forward(make_batch([one([CRASH_TOKEN], start=7)], 16)))
        queued = [asyncio.create_task(d.forward(make_batch([one([i])], 16))) for i in range(3)]
        results = await asyncio.gather(crash, *queued, return_exceptions=True)
        assert time.monotonic() - t0 < 5
        for r in results:
            assert isinstance(r, DriverError)
            assert "dev driver exited with status 7" in str(r) and "stub: crashing with status 7" in str(r)
        with pytest.raises(DriverError, match="exited with status 7"):
            await d.forward(make_batch([one([1])], 16))
        await d.shutdown()

    run(main())


def test_sigkill_mid_forward_fails_promptly_with_the_signal():
    async def main():
        d = stub_driver()
        await d.start()
        slow = asyncio.create_task(d.forward(make_batch([one([SLEEP_TOKEN], start=30_000)], 16)))
        await asyncio.sleep(0.2)
        t0 = time.monotonic()
        os.kill(d.proc.pid, signal.SIGKILL)
        with pytest.raises(DriverError, match=r"exited with status -9 \(killed by SIGKILL\)"):
            await slow
        assert time.monotonic() - t0 < 5
        await d.shutdown()

    run(main())


def test_garbage_on_the_channel_stops_the_child_and_fails_forwards():
    async def main():
        d = stub_driver()
        await d.start()
        t0 = time.monotonic()
        with pytest.raises(
            DriverError, match=r"broke the channel \(ProtocolError: frame length \d+ is implausible"
        ):
            await d.forward(make_batch([one([GARBAGE_TOKEN])], 16))
        assert time.monotonic() - t0 < 4 and d.proc.returncode == -signal.SIGKILL
        with pytest.raises(DriverError, match="broke the channel"):
            await d.forward(make_batch([one([1])], 16))
        await d.shutdown()

    run(main())


def test_never_ready_hits_the_ready_timeout_with_the_output_tail():
    async def main():
        d = stub_driver("never_ready", ready_timeout_s=2.5)
        t0 = time.monotonic()
        with pytest.raises(DriverError) as e:
            await d.start()
        assert 2.5 <= time.monotonic() - t0 < 8
        assert "did not become ready within 2.5 s" in str(e.value) and "stub: waiting forever" in str(e.value)
        assert d.proc.returncode == -signal.SIGKILL

    run(main())


def test_crash_at_startup_reports_status_and_the_last_40_lines():
    async def main():
        with pytest.raises(DriverError) as e:
            await stub_driver("crash_on_start").start()
        msg = str(e.value)
        assert "exited before it was ready (status 3)" in msg
        assert "corrupted shard model-00001.safetensors" in msg and "loading layer 59" in msg
        assert "loading layer 10\n" not in msg  # only the tail

    run(main())


def test_exception_at_startup_is_reported_with_its_message():
    async def main():
        with pytest.raises(DriverError, match="failed to start: RuntimeError: stub: cannot load weights"):
            await stub_driver("raise_on_start").start()
        with pytest.raises(DriverError, match="No module named 'no_such_module'"):
            await DevDriver(SPEC, python=sys.executable, executor="no_such_module:X").start()

    run(main())


def test_shutdown_kills_a_child_that_does_not_answer():
    async def main():
        d = stub_driver(shutdown_timeout_s=0.5)
        await d.start()
        busy = asyncio.create_task(d.forward(make_batch([one([SLEEP_TOKEN], start=30_000)], 16)))
        await asyncio.sleep(0.2)
        t0 = time.monotonic()
        await d.shutdown()
        assert time.monotonic() - t0 < 3
        assert d.proc.returncode == -signal.SIGTERM  # SIGTERM first; it was not stopped
        with pytest.raises(DriverError, match="shut down"):
            await busy

    run(main())


# ---- a wedged child (SIGSTOP) --------------------------------------------------------------------


def test_stopped_child_fails_the_forward_in_flight_and_is_reaped():
    async def main():
        d = stub_driver(heartbeat_timeout_s=1.0)
        await d.start()
        busy = asyncio.create_task(d.forward(make_batch([one([SLEEP_TOKEN], start=30_000)], 16)))
        await asyncio.sleep(0.3)
        t0 = time.monotonic()
        os.kill(d.proc.pid, signal.SIGSTOP)
        with pytest.raises(DriverError, match=r"stopped answering: no heartbeat for \d+\.\d s"):
            await busy
        assert 0.5 <= time.monotonic() - t0 < 5  # the last beat may precede the stop by 1/4 timeout
        assert d.proc.returncode == -signal.SIGKILL  # reaped, not left stopped
        with pytest.raises(DriverError, match="stopped answering"):
            await d.forward(make_batch([one([1])], 16))
        await d.shutdown()

    run(main())


def test_a_long_batch_keeps_beating():
    """No false positive: a forward 3x longer than the heartbeat timeout succeeds."""

    async def main():
        d = stub_driver(heartbeat_timeout_s=1.0)
        await d.start()
        res = await d.forward(make_batch([one([SLEEP_TOKEN], start=3_000)], 16))
        assert int(res.tokens[0]) == SLEEP_TOKEN + 1
        await d.shutdown()
        assert d.proc.returncode == 0

    run(main())


def test_shutdown_of_a_stopped_child_honours_the_timeout_and_reaps_it():
    async def main():
        d = stub_driver(shutdown_timeout_s=0.5, heartbeat_timeout_s=600)
        await d.start()
        busy = asyncio.create_task(d.forward(make_batch([one([SLEEP_TOKEN], start=30_000)], 16)))
        await asyncio.sleep(0.2)
        os.kill(d.proc.pid, signal.SIGSTOP)
        t0 = time.monotonic()
        await d.shutdown()
        assert 0.5 <= time.monotonic() - t0 < 3  # 0.5 s asked, SIGTERM stays pending, 1 s, SIGKILL
        assert d.proc.returncode == -signal.SIGKILL
        with pytest.raises(DriverError, match="shut down"):
            await busy

    run(main())


def test_stopped_during_load_is_reported_as_wedged():
    async def main():
        d = stub_driver("never_ready", heartbeat_timeout_s=1.0, ready_timeout_s=60)
        task = asyncio.create_task(d.start())
        while d._heartbeat is None or d._heartbeat.last_beat is None:  # it is beating
            await asyncio.sleep(0.01)
        os.kill(d.proc.pid, signal.SIGSTOP)
        with pytest.raises(DriverError, match="stopped answering"):
            await task
        assert d.proc.returncode == -signal.SIGKILL

    run(main())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux-only")
def test_a_stopped_child_dies_with_its_parent(tmp_path):
    """The second Ctrl-C case: pie dies mid-shutdown; the stopped driver must not be left behind."""
    import subprocess

    script = tmp_path / "parent.py"
    script.write_text(
        "import asyncio, os, signal, sys\n"
        "from test_dev_driver import stub_driver\n"
        "async def main():\n"
        "    d = stub_driver(heartbeat_timeout_s=600)\n"
        "    await d.start()\n"
        "    os.kill(d.proc.pid, signal.SIGSTOP)\n"
        "    print(d.proc.pid, flush=True)\n"
        "    os._exit(1)\n"
        "asyncio.run(main())\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS_DIR), *sys.path])}
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=60)
    child = int(out.stdout.split()[-1])
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and Path(f"/proc/{child}").exists():
        state = (
            Path(f"/proc/{child}/stat").read_text().split(")")[-1].split()[0]
            if Path(f"/proc/{child}/stat").exists()
            else "X"
        )
        if state in ("Z", "X"):  # a zombie waiting for init to reap it is dead
            break
        time.sleep(0.05)
    else:
        if Path(f"/proc/{child}").exists():
            os.kill(child, signal.SIGKILL)
            pytest.fail(f"dev driver child {child} outlived its parent")


def test_missing_interpreter_and_forward_before_start():
    async def main():
        d = DevDriver(SPEC, python="/nonexistent/bin/python")
        with pytest.raises(
            DriverError, match=r"/nonexistent/bin/python does not exist \(chosen by model option"
        ):
            await d.start()
        with pytest.raises(DriverError, match="start"):
            await d.forward(make_batch([one([1])], 16))

    run(main())


def test_output_tail_keeps_final_progress_state_and_split_utf8():
    class Sink:
        text = ""

        def write(self, s):
            self.text += s

        def flush(self):
            pass

    sink = Sink()
    tail = OutputTail(maxlen=3, echo=sink)
    for chunk in [b"load 10%\rload 50%", b"\rload 100%\n", b"caf\xc3", b"\xa9\r\nline", b"A\nB\nC\nend"]:
        tail.feed(chunk)
    tail.close()
    assert list(tail.lines) == ["B", "C", "end"]
    assert sink.text.startswith("[dev-driver] load 10%\r[dev-driver] load 50%\r[dev-driver] load 100%\n")
    assert "[dev-driver] café\n[dev-driver] lineA\n" in sink.text and sink.text.endswith("end\n")
    assert describe_status(-9) == "status -9 (killed by SIGKILL)" and describe_status(2) == "status 2"


# ---- the real executor ---------------------------------------------------------------------------


def test_real_executor_in_the_child_matches_in_process(tmp_path, monkeypatch):
    executor_mod = pytest.importorskip("pie.drivers.executor", reason="pie.drivers.executor not written yet")
    tiny = pytest.importorskip("tiny_models", reason="tests/tiny_models.py not written yet")
    ckpt = tiny.make_tiny_checkpoint(tmp_path / "qwen3", "qwen3")
    spec = ExecutorSpec(model_path=str(ckpt), num_pages=8, page_size=16, attention_backend="torch")
    batch = make_batch(
        [one([3, 17, 42, 5], return_logits=True), one([7, 8], page=2, return_logits=True)], page_size=16
    )
    expected = executor_mod.ModelExecutor(spec).execute(batch)

    async def main():
        d = DevDriver(spec, python=sys.executable, ready_timeout_s=120)
        caps = await d.start()
        assert caps.architecture == "qwen3"
        try:
            return await d.forward(batch)
        finally:
            await d.shutdown()

    got = run(main())
    assert got.logits.shape == expected.logits.shape == (2, caps_vocab(ckpt))
    np.testing.assert_allclose(got.logits, expected.logits, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(got.tokens, expected.tokens)


def caps_vocab(ckpt: Path) -> int:
    import json

    return json.loads((ckpt / "config.json").read_text())["vocab_size"]


# ---- interpreter resolution ----------------------------------------------------------------------


def fake_python(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\nexit 0\n")
    path.chmod(0o755)
    return path


def test_interpreter_resolution_order(tmp_path, monkeypatch):
    model_venv = fake_python(tmp_path / "model_venv/bin/python")
    model_py = fake_python(tmp_path / "model_py/python3.12")
    set_venv = fake_python(tmp_path / "set_venv/bin/python")
    env_py = fake_python(tmp_path / "env/python")
    active = fake_python(tmp_path / "active/bin/python")
    path_py = fake_python(tmp_path / "path/python3")
    monkeypatch.setenv("PATH", str(path_py.parent))
    resolve = interpreter.resolve_python

    assert resolve() == (str(path_py), "python3 on PATH")
    monkeypatch.setenv("VIRTUAL_ENV", str(tmp_path / "active"))
    assert resolve() == (str(active), "VIRTUAL_ENV")
    monkeypatch.setenv("PIE_PYTHON", str(env_py))
    assert resolve() == (str(env_py), "PIE_PYTHON")
    interpreter.write_settings("venv", str(tmp_path / "set_venv"))
    assert resolve() == (str(set_venv), "setting venv")
    assert resolve(python=str(model_py)) == (str(model_py), "model option python")
    assert resolve(venv=str(tmp_path / "model_venv")) == (str(model_venv), "model option venv")
    interpreter.write_settings("python", "python3")  # a bare name is looked up on PATH
    assert resolve() == (str(path_py), "setting python")
    interpreter.write_settings(None, None)
    assert resolve() == (str(env_py), "PIE_PYTHON")


def test_interpreter_resolution_errors_name_the_rule(tmp_path, monkeypatch):
    resolve = interpreter.resolve_python
    with pytest.raises(DriverError, match=r"does not exist \(chosen by model option `venv`\)"):
        resolve(venv=str(tmp_path / "nope"))
    with pytest.raises(ConfigError, match="both `venv` and `python`"):
        resolve(venv="a", python="b")
    monkeypatch.setenv("VIRTUAL_ENV", str(tmp_path / "gone"))
    with pytest.raises(DriverError, match=r"gone/bin/python does not exist \(chosen by \$VIRTUAL_ENV"):
        resolve()
    monkeypatch.setenv("PIE_PYTHON", "no-such-python-3.99")
    with pytest.raises(DriverError, match=r"'no-such-python-3.99' is not on PATH \(chosen by \$PIE_PYTHON\)"):
        resolve()
    interpreter.write_settings("venv", str(tmp_path / "deleted"))
    with pytest.raises(DriverError, match="chosen by `pie driver dev set`"):
        resolve()
    interpreter.settings_path().write_text("venv = [unclosed")
    with pytest.raises(ConfigError, match="dev-driver.toml"):
        resolve()


def test_child_env_puts_this_pie_first():
    env = interpreter.child_env({"PYTHONPATH": "/elsewhere"})
    root = interpreter.pie_import_root()
    assert env["PYTHONPATH"] == f"{root}{os.pathsep}/elsewhere" and (root / "pie" / "__init__.py").is_file()


# ---- `pie driver dev ...` --------------------------------------------------------------------------


def cli(*argv: str) -> int:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-c", "--config", default=None)
    parser = argparse.ArgumentParser(prog="pie", parents=[common])
    driver_cmd.register(parser.add_subparsers(), common)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except PieError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code


def test_install_prints_the_commands(capsys, tmp_path):
    assert cli("driver", "dev", "install", str(tmp_path / "v"), "--extra", "cu126") == 0
    out = capsys.readouterr().out.splitlines()
    pip = str(tmp_path / "v/bin/pip")
    assert out[1] == f"{sys.executable} -m venv {tmp_path / 'v'}"
    assert out[2] == f"{pip} install torch --index-url https://download.pytorch.org/whl/cu126"
    root = interpreter.pie_import_root().parent  # this test runs from a checkout: src/..
    assert out[3] == f"{pip} install 'pie[cu126] @ {root.as_uri()}'"
    assert cli("driver", "dev", "install", "--extra", "metal") == 0
    out = capsys.readouterr().out
    assert "venvs/dev/bin/pip install torch\n" in out and "pie[metal]" in out


def test_set_show_and_clear(capsys, tmp_path):
    venv = fake_python(tmp_path / "v/bin/python").parent.parent
    assert cli("driver", "dev", "set", "venv", str(tmp_path / "missing")) != 0
    assert "is not a virtualenv" in capsys.readouterr().err
    assert cli("driver", "dev", "set", "venv", str(venv)) == 0
    assert cli("driver", "dev", "show") == 0
    assert f"{venv}/bin/python\n  chosen by: setting venv" in capsys.readouterr().out
    assert cli("driver", "dev", "show", "--python", sys.executable) == 0
    assert "chosen by: command-line option python" in capsys.readouterr().out
    assert cli("driver", "dev", "set", "--clear") == 0
    assert not interpreter.settings_path().exists()
    assert cli("driver", "dev", "set", "python") != 0


def test_doctor_on_the_current_interpreter(capsys):
    rc = cli("driver", "dev", "doctor", "--python", sys.executable)
    out = capsys.readouterr().out
    assert "✓ python 3." in out and "✓ pie driver package imports" in out and "✓ torch " in out
    try:
        import flashinfer  # noqa: F401

        assert "✓ flashinfer" in out
    except ImportError:
        assert "✗ flashinfer: not installed: pip install flashinfer-python==0.6.3 (optional on CPU)" in out
    assert rc == 0 and "dev driver environment OK" in out  # flashinfer is a warning, not a failure


def test_doctor_fails_for_a_broken_interpreter(capsys, tmp_path):
    broken = tmp_path / "py"
    broken.write_text("#!/bin/sh\necho 'bad interpreter' >&2\nexit 4\n")
    broken.chmod(0o755)
    assert cli("driver", "dev", "doctor", "--python", str(broken)) == 1
    assert "✗ interpreter" in (out := capsys.readouterr().out) and "status 4: bad interpreter" in out
    assert cli("driver", "dev", "doctor", "--venv", str(tmp_path / "none")) == 1
    assert "✗ interpreter" in capsys.readouterr().out


# ---- channel round-trip cost ---------------------------------------------------------------------


def decode_batch(num_requests: int) -> ForwardBatch:
    """A decode step: one new token and one output per request, 4 KV pages each."""
    reqs = [
        dict(
            token_ids=[r % 800],
            positions=[60],
            pages=[4 * r + j for j in range(4)],
            last_page_len=13,
            outputs=[0],
        )
        for r in range(num_requests)
    ]
    return make_batch(reqs, 16)


async def measure_round_trip(n: int = 300, batch: ForwardBatch | None = None) -> tuple[float, float]:
    """(median, p90) seconds of one forward through the stub executor (default: 1 token, 1 output)."""
    d = DevDriver(
        ExecutorSpec(model_path="/stub", num_pages=4096),
        python=sys.executable,
        executor="dev_stub_executor:StubExecutor",
    )
    await d.start()
    batch = batch or make_batch([one([1])], 16)
    times = []
    try:
        for _ in range(n):
            t = time.perf_counter()
            await d.forward(batch)
            times.append(time.perf_counter() - t)
    finally:
        await d.shutdown()
    return statistics.median(times), statistics.quantiles(times, n=10)[-1]


def test_round_trip_cost_is_small():
    median, _ = run(measure_round_trip(100))
    assert median < 0.02  # measured ~0.2 ms; 20 ms would mean something is polling or sleeping


if __name__ == "__main__":
    os.environ["PYTHONPATH"] = str(TESTS_DIR)
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 2000
    for label, batch in [("1 request, 1 token", None), ("decode, 256 requests", decode_batch(256))]:
        med, p90 = asyncio.run(measure_round_trip(n, batch))
        print(f"dev driver round trip ({label}): median {med * 1e6:.0f} us, p90 {p90 * 1e6:.0f} us")


def test_unactivated_venv_of_pie_is_the_active_venv(tmp_path, monkeypatch):
    """`venv/bin/pie` without `activate` (or pipx): pie's own venv wins over python3 on PATH."""
    path_py = fake_python(tmp_path / "path/python3")
    monkeypatch.setenv("PATH", str(path_py.parent))
    venv = tmp_path / "venv"
    own = fake_python(venv / "bin/python")
    monkeypatch.setattr(sys, "prefix", str(venv))
    monkeypatch.setattr(sys, "executable", str(own))
    assert interpreter.resolve_python() == (str(own), "pie's own virtualenv")
    monkeypatch.setenv("VIRTUAL_ENV", str(tmp_path / "active"))  # an activated venv still wins
    active = fake_python(tmp_path / "active/bin/python")
    assert interpreter.resolve_python() == (str(active), "VIRTUAL_ENV")
    monkeypatch.delenv("VIRTUAL_ENV")
    monkeypatch.setattr(sys, "prefix", sys.base_prefix)  # outside any venv: python3 on PATH
    assert interpreter.resolve_python() == (str(path_py), "python3 on PATH")


def test_interpreter_without_pie_dependencies_says_which_and_how_to_choose(tmp_path):
    bare = tmp_path / "bare/python3"
    bare.parent.mkdir()
    bare.write_text(
        "#!/bin/sh\necho 'Traceback (most recent call last):' >&2\n"
        "echo \"ModuleNotFoundError: No module named 'msgpack'\" >&2\nexit 1\n"
    )
    bare.chmod(0o755)

    async def main():
        d = DevDriver(SPEC, python=str(bare))
        with pytest.raises(DriverError) as e:
            await d.start()
        return str(e.value)

    msg = run(main())
    assert f"{bare} cannot import 'msgpack'" in msg
    assert "pie driver dev set venv PATH" in msg and "PIE_PYTHON" in msg


def test_install_picks_the_cpu_extra_without_cuda(capsys, tmp_path, monkeypatch):
    import tomllib

    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.setattr(os.path, "exists", lambda p: False)  # no /proc/driver/nvidia
    monkeypatch.setattr("shutil.which", lambda name: None)  # no nvidia-smi
    assert driver_cmd.default_extra() == "cpu"
    assert cli("driver", "dev", "install", str(tmp_path / "v")) == 0
    out = capsys.readouterr().out
    assert "(cpu)" in out and "install torch --index-url https://download.pytorch.org/whl/cpu" in out
    assert "pie[cpu]" in out
    # the extra exists, so pip accepts `pie[cpu]` without a warning
    pyproject = tomllib.loads((interpreter.pie_import_root().parent / "pyproject.toml").read_text())
    assert pyproject["project"]["optional-dependencies"]["cpu"] == []
    monkeypatch.setattr("shutil.which", lambda name: "/usr/bin/nvidia-smi" if name == "nvidia-smi" else None)
    assert driver_cmd.default_extra() == "cu128"
