"""The example inferlets in examples/ run end to end on the embedded default model (in-process, CPU)."""

from pathlib import Path

from pie.cli.main import main

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def run(capsys, *argv: str) -> str:
    assert main(["run", "--in-process", *argv]) == 0, capsys.readouterr().err
    return capsys.readouterr().out


def test_best_of_n_forks_and_is_reproducible(capsys):
    args = [str(EXAMPLES / "best_of_n.py"), "--", "--prompt", "What does str.split do?", "--n", "3"]
    first = run(capsys, *args, "--max-tokens", "12")
    assert first.startswith("[best of 3, mean logprob -") and len(first.splitlines()) >= 2
    assert run(capsys, *args, "--max-tokens", "12") == first  # seeded samplers: same answer


def test_next_token_probe_prints_a_distribution(capsys):
    out = run(
        capsys, str(EXAMPLES / "next_token_probe.py"), "--", "--prompt", "The for statement", "--k", "4"
    )
    probs = [float(line.split()[0]) for line in out.strip().splitlines()]
    assert len(probs) == 4 and probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1.0001
