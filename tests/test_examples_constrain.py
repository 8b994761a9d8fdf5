"""The constrained- and speculative-decoding examples run end to end on the embedded default model."""

import json
import re
from pathlib import Path

import jsonschema

from pie.cli.main import main

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def run(capsys, *argv: str) -> str:
    assert main(["run", "--in-process", *argv]) == 0, capsys.readouterr().err
    return capsys.readouterr().out


def test_json_schema_example_returns_a_conforming_object(capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("json_schema_example", EXAMPLES / "json_schema.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    for seed in ("1", "2"):
        out = run(capsys, str(EXAMPLES / "json_schema.py"), "--", "--seed", seed)
        jsonschema.validate(json.loads(out), mod.PERSON_SCHEMA)


def test_ebnf_example_output_is_a_sentence_of_the_grammar(capsys):
    for seed in ("1", "4"):
        text, check = run(capsys, str(EXAMPLES / "ebnf.py"), "--", "--seed", seed).rstrip("\n").split("\n")
        assert check.startswith("[valid, complete,"), (text, check)
        assert re.fullmatch(r'\[\{"name":"[A-Za-z ]{1,20}","born":[0-9]{1,4}\}(,\{.*\})*\]', text)


def test_speculative_example_matches_plain_greedy(capsys):
    out = run(capsys, str(EXAMPLES / "speculative.py"), "--", "--max-tokens", "40")
    plain, custom, system = out.strip().splitlines()
    assert plain.startswith("plain:") and custom.startswith("custom:") and system.startswith("system:")
    assert custom.endswith("same text as plain") and system.endswith("same text as plain")
    drafted = int(re.search(r"(\d+) drafted", custom).group(1))
    assert drafted > 0  # the prompt-lookup speculator found matches and they were verified
