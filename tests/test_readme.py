"""The README's first command, as a user runs it: `pie run ...` in a fresh PIE_HOME (no config file, so
the defaults: dev driver subprocess on CPU, embedded model), result alone on stdout, exit 0."""

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def readme_commands() -> list[str]:
    return re.findall(r"```bash\n(.*?)\n```", README.read_text(), flags=re.S)[:2]


def test_readme_has_the_two_commands_and_ci_runs_the_second():
    install_and_run, install_and_test = readme_commands()
    assert "pip install" in install_and_run and "pie run text-completion" in install_and_run
    assert "pip install" in install_and_test and "pytest" in install_and_test
    ci = (README.parent / ".ci" / "run").read_text()
    assert install_and_test in ci


def test_readme_first_command_runs_offline(tmp_path):
    run_part = readme_commands()[0].split("&&", 1)[1].strip()
    argv = shlex.split(run_part)
    assert argv[:2] == ["pie", "run"]
    argv = [sys.executable, "-m", "pie", *argv[1:]]
    argv[argv.index("--max-tokens") + 1] = "8"  # keep the test short
    env = {**os.environ, "PIE_HOME": str(tmp_path), "HF_HUB_OFFLINE": "1"}
    r = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip(), "no completion on stdout"
    assert "using the default config" in r.stderr and "dev driver" in r.stderr
