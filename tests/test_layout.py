"""The package layout of docs/dev/CONVENTIONS.md, checked on the source with ``ast``:

- a stage package (``data``, ``transfer``, ``train``, ``evaluate``, ``demo``) imports another stage only
  through that stage's public package (``from clp_transfer.data import TokenShards``), never its modules;
- the shared modules below the stages (``models``, ``atomic``, ``config``, ...) import no stage at all;
- no function in ``src/`` is longer than MAX_LINES lines.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "clp_transfer"
STAGES = ("data", "transfer", "train", "evaluate", "demo")
ENTRY = ("clp_transfer.cli", "clp_transfer")  # the CLI and the public API name stage modules as strings only


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in the file, function-level ones included."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            # `from clp_transfer.data import shards` imports the module clp_transfer.data.shards
            for a in node.names:
                sub = f"{target}.{a.name}"
                is_module = (PACKAGE.parent / Path(*sub.split("."))).with_suffix(".py").is_file()
                out.append((node.lineno, sub if is_module else target))
    return [(line, m) for line, m in out if m == "clp_transfer" or m.startswith("clp_transfer.")]


def stage_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in STAGES else None


SOURCES = sorted(PACKAGE.rglob("*.py"))


def test_every_stage_is_a_package():
    for stage in STAGES:
        assert (PACKAGE / stage / "__init__.py").is_file(), stage


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: module_name(p))
def test_no_stage_imports_another_stages_internals(path):
    me = module_name(path)
    mine = stage_of(me)
    bad = []
    for line, target in imported_modules(path):
        theirs = stage_of(target)
        if theirs is None or theirs == mine:
            continue
        if mine is None:
            bad.append(f"line {line}: shared module {me} imports the stage {target}")
        elif target != f"clp_transfer.{theirs}":
            bad.append(f"line {line}: {me} imports {target}, an internal of stage {theirs!r}; import its public "
                       f"package clp_transfer.{theirs}")
    assert not bad, "\n".join(bad)


MAX_LINES = 80
# Functions still longer than MAX_LINES, to be split; the list may only shrink (a new long function, or a
# listed one that grew, fails; a listed one that got short must be taken off the list).
KNOWN_LONG: dict[str, int] = {}


def function_lengths() -> dict[str, int]:
    out = {}
    for path in SOURCES:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                out[f"{module_name(path)}.{node.name}"] = max(out.get(f"{module_name(path)}.{node.name}", 0),
                                                             node.end_lineno - node.lineno + 1)
    return out


def test_no_function_in_src_is_longer_than_80_lines():
    lengths = function_lengths()
    long = {name: n for name, n in lengths.items() if n > MAX_LINES}
    new = [f"{name}: {n} lines" for name, n in long.items() if n > KNOWN_LONG.get(name, MAX_LINES)]
    assert not new, "functions over 80 lines (split them):\n" + "\n".join(new)
    fixed = sorted(set(KNOWN_LONG) - set(long))
    assert not fixed, f"now at most {MAX_LINES} lines, take them off KNOWN_LONG: {fixed}"
