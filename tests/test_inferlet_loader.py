"""pie.inferlets.loader: an inferlet file imports helpers beside it; non-str results become JSON."""

from __future__ import annotations

import asyncio
import sys

from pie.inferlets.loader import load_inferlet


def test_inferlet_imports_a_helper_module_beside_it(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "path", list(sys.path))  # undo the loader's insertion after the test
    d = tmp_path / "my_inferlet"
    d.mkdir()
    (d / "pie_test_helper_mod.py").write_text("def greet(name):\n    return 'hello ' + name\n")
    (d / "main.py").write_text(
        "import pie_test_helper_mod\n\n"
        "async def main(input):\n"
        "    import pie_test_helper_mod as again  # imports inside main run later: still found\n"
        "    return again.greet(input['name'])\n"
    )
    main = load_inferlet(str(d / "main.py"))
    assert asyncio.run(main({"name": "pie"})) == "hello pie"
    sys.modules.pop("pie_test_helper_mod", None)


def test_non_str_results_are_json_encoded_as_documented(capsys, tmp_path, monkeypatch):
    """docs/inferlets.md: a dict prints as JSON, None as an empty line (what `pie run` prints)."""
    from pie.cli.main import main

    monkeypatch.setenv("PIE_HOME", str(tmp_path / "home"))
    f = tmp_path / "ret.py"
    f.write_text("async def main(input):\n    return {'n': input['n'], 'ok': True, 'txt': 'é'}\n")
    assert main(["run", "--in-process", str(f), "--", "--n", "3"]) == 0
    assert capsys.readouterr().out == '{"n": 3, "ok": true, "txt": "é"}\n'
