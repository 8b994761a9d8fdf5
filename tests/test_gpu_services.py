"""Services and decoders on the cuda_native driver (the embedded model in bf16): launch, messaging and the
ReAct agent examples, and bids choosing the preemption victim with a tiny KV cache on the GPU."""

import asyncio
import json
import re
from pathlib import Path

import pytest
from gpu_marks import needs_cuda

from inferlet import Context, Model, scheduling
from pie.cli.main import main
from pie.paths import embedded_model_dir
from pie.runtime.sequence import RESIDENT

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
pytestmark = [pytest.mark.gpu, needs_cuda]


@pytest.fixture(scope="module")
def cuda_config(tmp_path_factory):
    cfg = tmp_path_factory.mktemp("gpu-services") / "config.toml"
    cfg.write_text(
        '[[model]]\nname = "default"\nhf_repo = "pie/embedded-default"\n[model.driver]\ntype = "cuda_native"\n'
        'device = ["cuda:0"]\nactivation_dtype = "bfloat16"\n'
    )
    return cfg


def run(capsys, cfg, *argv: str) -> str:
    assert main(["run", "-c", str(cfg), *argv]) == 0, capsys.readouterr().err
    return capsys.readouterr().out


def test_examples_on_cuda(cuda_config, capsys):
    got = json.loads(run(capsys, cuda_config, str(EXAMPLES / "launch_caller.py"), "--", "--max-tokens", "8"))
    assert len(got["answers"]) == 2 and "was cancelled" in got["slow"] and got["pages_used"] == 0
    got = json.loads(run(capsys, cuda_config, str(EXAMPLES / "agent_swarm.py"), "--", "--workers", "4",
                         "--topics", "a|b|c|d|e|f|g|h", "--max-tokens", "8"))  # fmt: skip
    assert [r["task"] for r in got["results"]] == list(range(8))
    assert sum(w["done"] for w in got["workers"]) == 8
    got = json.loads(run(capsys, cuda_config, str(EXAMPLES / "react_agent.py"), "--", "--max-steps", "2"))
    assert re.search(r"Action: calculator\[[^\]\n]*\]\nObservation: ", got["trace"])


def test_bids_choose_the_victim_on_the_cuda_driver():
    from pie.drivers.cuda_native import CudaNativeDriver
    from pie.drivers.spec import ExecutorSpec
    from pie.models.tokenizer import Tokenizer
    from pie.runtime.engine import Engine

    async def inferlet(input):
        model = Model.load()
        a, b = Context(model), Context(model)
        for c in (a, b):
            c.append(list(range(1, 25)))  # 24 tokens: 6 pages of 4
            await c.flush()
        a.set_bid(input["a"])
        b.set_bid(input["b"])
        c = Context(model)
        c.append(list(range(100, 124)))
        await c.flush()
        lost = [n for n, x in (("a", a), ("b", b)) if x._inner._seq.state != RESIDENT]
        return f"{','.join(lost)} {scheduling.rent(c)} {scheduling.latency(c) > 0}"

    async def go(bids):
        path = embedded_model_dir()
        spec = ExecutorSpec(model_path=str(path), device="cuda:0", activation_dtype="bfloat16", page_size=4,
                            num_pages=12, kv_policy="cuda_native")  # fmt: skip
        e = Engine.from_drivers(
            {"m": (CudaNativeDriver(spec, ready_timeout_s=300), Tokenizer.from_dir(path))}
        )
        await e.start()
        try:
            return await e.run_inferlet(inferlet, bids)
        finally:
            await e.shutdown()

    assert asyncio.run(go({"a": 5.0, "b": 1.0})) == "b 1.0 True"
    assert asyncio.run(go({"a": 1.0, "b": 5.0})) == "a 1.0 True"
