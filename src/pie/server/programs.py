"""Installed programs: a Python source plus its Pie.toml manifest, per user, under $PIE_HOME/programs.

The manifest is what the client's `@inferlet` decorator writes:

    [package]
    name = "beam-search"
    version = "0.1234.5678"
    [runtime]
    language = "python"
    entry = "beam_search"        # a function defined at the source's top level
    call = "kwargs"              # main(**input); "input" calls main(input) with the input dict

Layout: programs/<user>/<name>/<version>/{Pie.toml, program.py}. Installing validates the manifest
schema, that the source is UTF-8 Python that parses and defines the entry, and the size limits.
"""

from __future__ import annotations

import ast
import inspect
import re
import shutil
import tomllib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

from pie.errors import PieError

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
VERSION_RE = re.compile(r"[0-9A-Za-z][0-9A-Za-z.+-]{0,63}")
MAX_MANIFEST_BYTES = 64 * 1024
CALLS = ("kwargs", "input")


class ProgramError(PieError):
    """A program that cannot be installed, found or loaded; the message says what and how to fix it."""


@dataclass(frozen=True)
class Manifest:
    name: str
    version: str
    entry: str
    call: str
    description: str | None
    parameters: dict

    @property
    def program(self) -> str:
        return f"{self.name}@{self.version}"


def parse_manifest(text: str) -> Manifest:
    if len(text.encode("utf-8", "surrogatepass")) > MAX_MANIFEST_BYTES:
        raise ProgramError(f"the manifest is over {MAX_MANIFEST_BYTES} bytes")
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ProgramError(f"the manifest is not valid TOML: {e}") from None
    package, runtime = doc.get("package"), doc.get("runtime")
    if not isinstance(package, dict):
        raise ProgramError('the manifest needs a [package] table with name = "..." and version = "..."')
    if not isinstance(runtime, dict):
        raise ProgramError(
            'the manifest needs a [runtime] table: language = "python", entry = "<function>", call = "kwargs"'
        )
    name, version = package.get("name"), package.get("version")
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise ProgramError(
            f"[package] name {name!r} is not a valid program name (letters, digits, '_', '.', '-'; "
            "at most 64 characters, starting with a letter or digit)"
        )
    if not isinstance(version, str) or not VERSION_RE.fullmatch(version):
        raise ProgramError(f"[package] version {version!r} is not a valid version (like 0.1.0)")
    language = runtime.get("language")
    if language != "python":
        raise ProgramError(
            f'[runtime] language is {language!r}: pie runs Python programs only (language = "python"); '
            "WebAssembly components are not supported"
        )
    entry = runtime.get("entry", "main")
    if not isinstance(entry, str) or not entry.isidentifier():
        raise ProgramError(f"[runtime] entry {entry!r} must be the name of a function in the source")
    call = runtime.get("call", "kwargs")
    if call not in CALLS:
        raise ProgramError(f"[runtime] call {call!r} must be one of {', '.join(CALLS)}")
    description = package.get("description")
    if description is not None and not isinstance(description, str):
        raise ProgramError("[package] description must be a string")
    parameters = doc.get("parameters", {})
    if not isinstance(parameters, dict) or not all(isinstance(v, dict) for v in parameters.values()):
        raise ProgramError('[parameters] must map each name to a table like {type = "string"}')
    return Manifest(name, version, entry, call, description, parameters)


def check_source(source: bytes, manifest: Manifest) -> str:
    """The source as text, once it is UTF-8 Python that defines the manifest's entry at top level."""
    try:
        text = source.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ProgramError(
            f"the program source is not UTF-8 text (byte {e.start}): upload Python source"
        ) from None
    try:
        tree = ast.parse(text, filename=f"{manifest.program}.py")
    except SyntaxError as e:
        raise ProgramError(f"the program source does not parse: line {e.lineno}: {e.msg}") from None
    defined = {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
    if manifest.entry not in defined:
        have = ", ".join(sorted(defined)) or "none"
        raise ProgramError(
            f"the entry {manifest.entry!r} named in [runtime] is not a function defined at the top level of "
            f"the source (functions there: {have})"
        )
    return text


ProgramMain = Callable[[dict], Awaitable[object]]


def entry_main(source: str, manifest: Manifest, filename: str) -> ProgramMain:
    """An inferlet `main(input)` that calls the program's entry as its manifest says."""
    namespace: dict = {"__name__": f"pie_program_{manifest.name.replace('-', '_')}", "__file__": filename}
    try:
        exec(compile(source, filename, "exec"), namespace)  # noqa: S102  (the user's own program)
    except Exception as e:
        raise ProgramError(f"loading {manifest.program} failed: {type(e).__name__}: {e}") from e
    fn = namespace.get(manifest.entry)
    if not callable(fn):
        raise ProgramError(f"{manifest.program}: {manifest.entry!r} is not a function after loading")

    async def main(input: dict) -> object:
        if manifest.call == "kwargs":
            try:
                inspect.signature(fn).bind(**input)
            except TypeError as e:
                raise ProgramError(
                    f"{manifest.program}: the input does not fit {manifest.entry}(): {e}"
                ) from None
            result = fn(**input)
        else:
            result = fn(input)
        if inspect.isawaitable(result):
            result = await result
        return result

    return main


def _user_dir(user: str) -> str:
    return quote(user, safe="") or "_"


class ProgramStore:
    """Programs installed by each user, on disk (they survive restarts)."""

    def __init__(self, root: Path, max_source_bytes: int) -> None:
        self.root = root
        self.max_source_bytes = max_source_bytes

    def _dir(self, user: str, name: str, version: str) -> Path:
        return self.root / _user_dir(user) / name / version

    def exists(self, user: str, name: str, version: str) -> bool:
        if not (NAME_RE.fullmatch(name) and VERSION_RE.fullmatch(version)):
            return False
        return (self._dir(user, name, version) / "Pie.toml").is_file()

    def install(self, user: str, source: bytes, manifest_text: str, force: bool) -> Manifest:
        if len(source) > self.max_source_bytes:
            raise ProgramError(
                f"the program is {len(source)} bytes, over the server's limit of {self.max_source_bytes} "
                "(pie serve --max-upload-bytes)"
            )
        manifest = parse_manifest(manifest_text)
        text = check_source(source, manifest)
        where = self._dir(user, manifest.name, manifest.version)
        if where.exists() and not force:
            if (where / "program.py").read_text("utf-8") == text:
                return manifest  # the same program again: nothing to do
            raise ProgramError(
                f"{manifest.program} is already installed with another source; bump the version or "
                "install with force_overwrite"
            )
        tmp = where.with_name(f".{manifest.version}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        (tmp / "Pie.toml").write_text(manifest_text, "utf-8")
        (tmp / "program.py").write_text(text, "utf-8")
        shutil.rmtree(where, ignore_errors=True)
        tmp.rename(where)  # a program is either fully there or absent
        return manifest

    def resolve(self, user: str, spec: str) -> tuple[str, ProgramMain] | None:
        """(`name@version`, main) of an installed program (a bare name: its newest install), else None."""
        name, _, version = spec.partition("@")
        if not NAME_RE.fullmatch(name) or (version and not VERSION_RE.fullmatch(version)):
            raise ProgramError(f"{spec!r} is not a program name (name@version, or a bare name)")
        base = self.root / _user_dir(user) / name
        if version:
            where = base / version
            if not (where / "Pie.toml").is_file():
                return None
        else:
            found = [d for d in base.glob("*") if (d / "Pie.toml").is_file()] if base.is_dir() else []
            if not found:
                return None
            where = max(found, key=lambda d: (d / "Pie.toml").stat().st_mtime)
        manifest = parse_manifest((where / "Pie.toml").read_text("utf-8"))
        source = (where / "program.py").read_text("utf-8")
        return manifest.program, entry_main(source, manifest, str(where / "program.py"))

    def list(self, user: str) -> list[str]:
        base = self.root / _user_dir(user)
        if not base.is_dir():
            return []
        return sorted(f"{d.parent.name}@{d.name}" for d in base.glob("*/*") if (d / "Pie.toml").is_file())
