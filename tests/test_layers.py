"""The package is laid out by layers, and no import runs back up: each module imports only
modules of its own layer or the layers below it (function-local imports included), as the
README's Development section draws them."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

#: Each subpackage's layer, bottom first; the built-in method plugins sit on the API.
LAYERS = {
    "core": 0,
    "api": 1,
    "methods": 2,
    "models": 2,
    "data": 2,
    "training": 3,
    "downstream": 3,  # evaluations of trained students, beside the engine
    "sweep": 4,
    "reporting": 5,
    "bench": 5,  # apart: beside reporting, importing neither
    "commands": 6,
    "workflow": 6,  # the run and the Python API that the commands share, beside them
}


def layer_of(module: str) -> int | None:
    """The layer of ``kt_bench.<package>...`` (None for the package's own top level)."""
    parts = module.split(".")
    return LAYERS.get(parts[1]) if len(parts) > 1 and parts[0] == "kt_bench" else None


def imported(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every kt_bench module that ``path`` imports, anywhere in it."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "kt_bench":  # from kt_bench import atomic
                out += [(node.lineno, f"kt_bench.{a.name}") for a in node.names]
            elif node.module.startswith("kt_bench."):
                out.append((node.lineno, node.module))
        elif isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names if a.name.startswith("kt_bench.")]
    return out


def modules(root: Path) -> list[tuple[str, Path]]:
    """Every module of the package under ``root`` with its dotted name (the plugins in
    ``methods/`` as kt_bench.methods)."""
    found = [("kt_bench." + ".".join(p.relative_to(root / "kt_bench").with_suffix("").parts), p)
             for p in sorted((root / "kt_bench").rglob("*.py"))]
    found += [(f"kt_bench.methods.{p.stem}", p) for p in sorted((root / "methods").glob("*.py"))]
    return found


def upward_imports(root: Path = ROOT) -> list[str]:
    """Each import that runs from a module up to a higher layer, as ``file:line -> module``."""
    bad = []
    for name, path in modules(root):
        own = layer_of(name)
        if own is None:
            continue
        for line, target in imported(path):
            theirs = layer_of(target)
            if theirs is not None and theirs > own:
                bad.append(f"{path.relative_to(root)}:{line} -> {target}")
    return bad


def test_every_subpackage_has_a_layer():
    packages = {p.name for p in (ROOT / "kt_bench").iterdir()
                if p.is_dir() and (p / "__init__.py").exists()}
    assert packages <= set(LAYERS), sorted(packages - set(LAYERS))


def test_no_import_runs_back_up():
    assert upward_imports() == []


def test_an_upward_import_is_found(tmp_path):
    """The check itself: a function-local import of the engine in core, and a plugin importing
    the runner, are reported; a plugin importing the API is not."""
    (tmp_path / "kt_bench" / "core").mkdir(parents=True)
    (tmp_path / "methods").mkdir()
    (tmp_path / "kt_bench" / "core" / "bad.py").write_text(
        "def f():\n    from kt_bench.training.engine import train\n")
    (tmp_path / "methods" / "mine.py").write_text(
        "from kt_bench.api.method import Method\nimport kt_bench.sweep.runner\n")
    assert upward_imports(tmp_path) == [
        "kt_bench/core/bad.py:2 -> kt_bench.training.engine",
        "methods/mine.py:2 -> kt_bench.sweep.runner"]


@pytest.mark.parametrize("line,expected", [
    ("from kt_bench import atomic", ["kt_bench.atomic"]),
    ("import kt_bench.sweep.launch as launch", ["kt_bench.sweep.launch"]),
    ("from . import x", []),
])
def test_imports_are_read_in_every_form(tmp_path, line, expected):
    path = tmp_path / "m.py"
    path.write_text(line + "\n")
    assert [m for _, m in imported(path)] == expected


def test_every_subpackage_is_installed_by_a_plain_pip_install():
    # pyproject lists the packages one by one (methods/ and results/reference/ are mapped
    # into the package): a subpackage missing there works in an editable install and the
    # tests, and is absent from `pip install .` (README's first command)
    import sys

    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover
        import tomli as tomllib
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())
                 ["tool"]["setuptools"]["packages"])
    found = {"kt_bench." + ".".join(p.parent.relative_to(ROOT / "kt_bench").parts)
             for p in (ROOT / "kt_bench").rglob("__init__.py")}
    found = {name.rstrip(".") for name in found}
    assert found - listed == set()
