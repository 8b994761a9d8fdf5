"""GPU: scripts/bench_sdk.py runs on CUDA with the embedded model; speculative rows equal plain greedy."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from gpu_marks import needs_cuda

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.gpu
@needs_cuda
def test_bench_sdk_on_cuda(tmp_path):
    out = tmp_path / "rows.json"
    cmd = [
        sys.executable,
        str(ROOT / "scripts" / "bench_sdk.py"),
        "--tokens",
        "48",
        "--repeats",
        "1",
        "--json",
        str(out),
    ]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = {row["mode"]: row for row in json.loads(out.read_text())}
    assert set(rows) == {"engine", "plain", "json", "regex", "oracle k=4", "oracle k=8", "system"}
    for mode in ("engine", "plain", "oracle k=4", "oracle k=8", "system"):
        assert rows[mode]["same_as_plain"], mode  # speculative greedy (bf16, batched verify) == plain greedy
    assert rows["oracle k=8"]["accepted"] == rows["oracle k=8"]["drafted"] > 0
    assert rows["oracle k=8"]["passes"] < rows["plain"]["passes"]
    print(r.stdout)
