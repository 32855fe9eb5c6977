"""A full disk or an I/O error is one line naming the file and the reason, never a traceback: a
cell whose files cannot be written fails alone, a row that cannot be kept stops the grid, and
a report or timing file that cannot be written costs neither the table nor the rows."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

from kt_bench.commands.main import main
from kt_bench.core import atomic
from kt_bench.core.clock import CLOCK
from kt_bench.core.errors import KtBenchError
from kt_bench.sweep.cells import expand
from kt_bench.sweep.config import load_grid

from .conftest import rows_by_method, write_tiny_grid

FULL = "No space left on device"
CPU = ["--device", "cpu", "--precision", "no"]


def disk_full(path) -> OSError:
    """What the system raises for a write to ``path`` on a full disk."""
    return OSError(errno.ENOSPC, FULL, str(path))


def kt_bench_error(path) -> KtBenchError:
    """What kt_bench.core.atomic raises for such a write."""
    return KtBenchError(f"cannot write {path}: {FULL}")


def failing(write, name: str, error, folder: Path | None = None):
    """``write`` (an atomic writer) failing with ``error(path)`` for files called ``name``
    (in ``folder`` only, if given)."""
    def patched(path, obj):
        path = Path(path)
        if path.name == name and folder in (None, path.parent):
            raise error(path)
        return write(path, obj)
    return patched


def _run(capsys, grid: Path, out: Path, report: bool = False) -> tuple[int, str, list[str]]:
    """Run the grid; the exit status, stdout and the lines on stderr (progress bars aside,
    which redraw themselves with CR)."""
    code = main(["run", "--grid", str(grid), "--out", str(out), *CPU,
                 *([] if report else ["--no-report"])])
    stdout, stderr = capsys.readouterr()
    segments = (s.strip() for line in stderr.split("\n") for s in line.split("\r"))
    return code, stdout, [s for s in segments if s and "%|" not in s]


def _cell_dir(grid: Path, out: Path, method: str, seed: int = 0) -> Path:
    """The folder of the cell of ``method`` and ``seed`` (at --precision no)."""
    (cell,) = [c for c in expand(load_grid(str(grid)), "no")
               if c.method == method and c.seed == seed]
    return out / "cells" / cell.cell_id


@pytest.mark.parametrize("error", [disk_full, kt_bench_error], ids=["OSError", "KtBenchError"])
def test_a_row_that_cannot_be_kept_stops_the_grid_with_one_line(tmp_path, capsys, monkeypatch,
                                                                  error):
    grid = write_tiny_grid(tmp_path, seeds=(0, 1))
    out = tmp_path / "out"
    monkeypatch.setattr(atomic, "write_json", failing(atomic.write_json, "result.json", error))
    code, stdout, stderr = _run(capsys, grid, out)
    first = _cell_dir(grid, out, "student")
    assert code == 2 and stderr == [
        f"kt-bench: error: cannot write {first / 'result.json'}: {FULL}; the grid stopped "
        "here, as its rows cannot be kept: rerun the same command once that is fixed"]
    # each cell of the cohort that ran says it on its line; the next cohort never started
    assert f"{'student':<14} seed 0: failed: cannot write {first / 'result.json'}: {FULL}" \
        in stdout
    assert f"{'kd':<14} seed 0: failed: cannot write" in stdout
    assert len(list(out.glob("cells/*/log.txt"))) == 2
    assert "row not kept: cannot write" in (first / "log.txt").read_text()

    monkeypatch.undo()  # room again: the same command runs every cell
    code, _, _ = _run(capsys, grid, out)
    rows = rows_by_method(out)
    assert code == 0 and len(rows) == 4 and set(rows["status"]) == {"ok"}


@pytest.mark.parametrize("writer,name,error,expected", [
    ("torch_save", "checkpoint.pt", kt_bench_error, "cannot write {path}: " + FULL),
    ("torch_save", "checkpoint.pt", disk_full, "OSError: [Errno 28] " + FULL + ": '{path}'"),
    ("write_text", "metrics.jsonl", disk_full, "cannot write {path}: " + FULL),
    ("write_json", "config.json", disk_full, "cannot write {path}: " + FULL),
], ids=["checkpoint", "checkpoint-OSError", "metrics", "config"])
def test_a_cell_whose_file_cannot_be_written_fails_alone(tmp_path, capsys, monkeypatch, writer,
                                                         name, error, expected):
    grid = write_tiny_grid(tmp_path)
    out = tmp_path / "out"
    kd = _cell_dir(grid, out, "kd")
    monkeypatch.setattr(atomic, writer, failing(getattr(atomic, writer), name, error, kd))
    code, _, stderr = _run(capsys, grid, out)
    assert code == 1 and stderr == ["kt-bench: 1 cell(s) did not finish ok: kd seed 0 (failed)"]
    rows = rows_by_method(out)
    assert rows.loc["student", "status"] == "ok"
    assert rows.loc["kd", "status"] == "failed"
    assert rows.loc["kd", "error"] == expected.format(path=kd / name)


def test_a_log_that_cannot_be_written_fails_its_cell_alone(tmp_path, capsys):
    grid = write_tiny_grid(tmp_path)
    out = tmp_path / "out"
    kd = _cell_dir(grid, out, "kd")
    (kd / "log.txt").mkdir(parents=True)  # a log no one can append to, not even root
    code, _, stderr = _run(capsys, grid, out)
    assert code == 1 and stderr == ["kt-bench: 1 cell(s) did not finish ok: kd seed 0 (failed)"]
    rows = rows_by_method(out)
    assert rows.loc["student", "status"] == "ok"
    assert (rows.loc["kd", "status"], rows.loc["kd", "error"]) == (
        "failed", f"cannot write {kd / 'log.txt'}: Is a directory")


@pytest.mark.parametrize("error", [disk_full, kt_bench_error], ids=["OSError", "KtBenchError"])
def test_a_report_that_cannot_be_written_costs_neither_table_nor_rows(tmp_path, capsys,
                                                                        monkeypatch, error):
    import kt_bench.reporting.writer

    grid = write_tiny_grid(tmp_path)
    out = tmp_path / "out"
    plot = out / "report" / "accuracy.png"

    def write_report(out, rows=None, correct="holm"):
        raise error(plot)

    monkeypatch.setattr(kt_bench.reporting.writer, "write_report", write_report)
    code, stdout, stderr = _run(capsys, grid, out, report=True)
    assert "| kd " in stdout and f"rows: {out / 'results.csv'}" in stdout
    assert set(rows_by_method(out)["status"]) == {"ok"}
    said = {disk_full: f"{plot}: {FULL}", kt_bench_error: f"cannot write {plot}: {FULL}"}
    assert code == 1 and stderr == [f"kt-bench: the report was not written: {said[error]}"]


def test_startup_timings_that_cannot_be_written_cost_no_cell(tmp_path, capsys, monkeypatch):
    grid = write_tiny_grid(tmp_path)
    out = tmp_path / "out"
    monkeypatch.setattr(CLOCK, "marks", {})  # a fresh process's clock: its first step to come
    monkeypatch.setattr(atomic, "write_json",
                        failing(atomic.write_json, "startup.json", disk_full))
    code, stdout, stderr = _run(capsys, grid, out)
    assert code == 0 and set(rows_by_method(out)["status"]) == {"ok"}
    assert "start-up: " in stdout
    assert stderr == [f"kt-bench: startup.json not written: {out / 'startup.json'}: {FULL}"]
