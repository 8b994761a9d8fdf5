"""The service examples (launch, messaging, a ReAct agent with a tool) run end to end on the embedded model."""

import json
import re
import sys
from pathlib import Path

from pie.cli.main import main

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def run(capsys, *argv: str) -> str:
    assert main(["run", "--in-process", *argv]) == 0, capsys.readouterr().err
    return capsys.readouterr().out


def test_launch_caller_gets_each_callees_result_and_cancel_frees_pages(capsys):
    prompts = "Name a prime.|Name a color."
    got = json.loads(
        run(capsys, str(EXAMPLES / "launch_caller.py"), "--", "--prompts", prompts, "--max-tokens", "8")
    )
    for prompt in prompts.split("|"):  # the same greedy answer as running the callee on its own
        alone = run(capsys, str(EXAMPLES / "launch_callee.py"), "--", "--prompt", prompt, "--max-tokens", "8")
        assert got["answers"][prompt] == alone.removesuffix("\n")
    assert "was cancelled" in got["slow"] and got["pages_used"] == 0


def test_agent_swarm_answers_every_task_once_and_stops_every_worker(capsys):
    topics = ["rivers", "mountains", "deserts", "forests", "lakes"]
    argv = ["--workers", "3", "--topics", "|".join(topics), "--max-tokens", "6"]
    got = json.loads(run(capsys, str(EXAMPLES / "agent_swarm.py"), "--", *argv))
    assert [r["task"] for r in got["results"]] == list(range(len(topics)))
    assert all(r["text"] and 0 <= r["worker"] < 3 for r in got["results"])
    workers = got["workers"]
    assert [w["worker"] for w in workers] == [0, 1, 2] and all(w["stop"] == "stop" for w in workers)
    assert sum(w["done"] for w in workers) == len(topics)


def test_react_agent_runs_the_calculator_on_every_action(capsys):
    sys.path.insert(0, str(EXAMPLES))
    try:
        from react_agent import calculator
    finally:
        sys.path.remove(str(EXAMPLES))
    assert calculator("12 * (3 + 4)") == "84" and calculator("2 ** 10 / 4") == "256"
    assert calculator("__import__('os')").startswith("error:") and calculator("1/0").startswith("error:")
    got = json.loads(
        run(capsys, str(EXAMPLES / "react_agent.py"), "--", "--max-steps", "2", "--max-tokens", "24")
    )
    steps = re.findall(r"Action: calculator\[([^\]\n]*)\]\nObservation: ([^\n]*)", got["trace"])
    assert 1 <= len(steps) <= 2
    assert all(obs == calculator(expr) for expr, obs in steps)
    assert "Final Answer:" in got["trace"]
