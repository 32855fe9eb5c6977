"""Commands that need no network start without torch: ``--help``, ``--version``, ``status``,
``report`` and ``list grids`` import neither torch nor Accelerate (checked with
``python -X importtime``, in a fresh process), and ``--version`` prints the package's
version."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest

import kt_bench
from kt_bench.commands.main import COMMANDS, build_parser, main
from kt_bench.sweep.cells import count_cells, expand
from kt_bench.sweep.config import builtin_grids, load_grid

#: Top-level packages a light command must not import.
HEAVY = ("torch", "accelerate")


def imported_modules(*argv: str) -> tuple[subprocess.CompletedProcess, list[str]]:
    """Run ``python -X importtime -m kt_bench *argv``; fail unless it succeeds; return the
    process and the names of the modules it imported."""
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "kt_bench", *argv],
                          capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        pytest.fail(f"kt-bench {' '.join(argv)} exited {proc.returncode}: {proc.stderr[-2000:]}")
    names = [line.rsplit("|", 1)[1].strip() for line in proc.stderr.splitlines()
             if line.startswith("import time:") and "|" in line]
    assert names, "no -X importtime output"
    return proc, names


def heavy_modules(names: list[str]) -> list[str]:
    """The modules of ``names`` that belong to a package of :data:`HEAVY`."""
    return [n for n in names if n.split(".")[0] in HEAVY]


@pytest.mark.parametrize("argv", [["--version"], ["--help"], ["report", "--help"],
                                  ["status", "--help"]], ids=" ".join)
def test_help_and_version_import_no_torch(argv):
    _, names = imported_modules(*argv)
    assert heavy_modules(names) == []


@pytest.mark.parametrize("command", ["status", "report"])
def test_reading_a_finished_run_imports_no_torch(finished, command):
    _, out = finished
    proc, names = imported_modules(command, str(out))
    assert heavy_modules(names) == []
    assert "kd" in proc.stdout


def test_list_grids_imports_no_torch():
    proc, names = imported_modules("list", "grids")
    assert "demo" in proc.stdout
    assert heavy_modules(names) == []


def test_list_grids_counts_the_cells_a_run_expands():
    """The torch-free count that ``list grids`` shows equals the cells of the validated grid
    (every built-in grid), and a grid with a method listed twice counts it once."""
    for name, path in builtin_grids().items():
        light = count_cells(load_grid(str(path), validate=False))
        assert light == len(expand(load_grid(str(path)))), name
    grid = load_grid("demo")
    twice = dataclasses.replace(grid, methods=[*grid.methods, "kd"])
    assert count_cells(twice) == len(expand(twice)) == len(expand(grid))


def test_version_prints_the_package_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out == f"kt-bench {kt_bench.__version__}\n"
    proc, _ = imported_modules("--version")
    assert proc.stdout == f"kt-bench {kt_bench.__version__}\n"


def test_every_command_has_a_module_with_its_parser_and_code():
    parser = build_parser()  # every command's module, in full
    for name, (module, help_line) in COMMANDS.items():
        args = parser.parse_args([name, *{"list": ["grids"], "run": ["--grid", "demo"],
                                          "status": ["x"], "report": ["x"],
                                          "downstream": ["x"]}.get(name, [])])
        assert args.command == name and help_line
        assert callable(sys.modules[module].run)
