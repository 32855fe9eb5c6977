"""Rows read back from a results folder are checked field by field: a row with bad values, no
cell's identity, or no permission to read it never crashes ``run``, ``report`` or ``status``;
each is named in one line, and a run redoes a damaged row's cell but leaves an unreadable one
to its owner. Malformed metrics and an unwritable results.csv do not stop a report either."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest

from kt_bench.core import atomic
from kt_bench.sweep.cells import expand
from kt_bench.sweep.config import load_grid
from kt_bench.sweep.rows import IDENTITY_FIELDS, DamagedRowError, StrayRowError, check_row

from .conftest import run_cli, set_aside, sorted_rows, write_tiny_grid

NUMBERS = ["top1", "top5", "top1_best", "teacher_top1"]


@pytest.fixture
def run_copy(finished, tmp_path):
    """A copy of the finished run to damage: its grid file, folder and kd row's file."""
    grid, out = finished
    shutil.copytree(out, tmp_path / "out")
    out = tmp_path / "out"
    (kd,) = [p for p in (out / "cells").glob("*/result.json")
             if json.loads(p.read_text())["method"] == "kd"]
    return grid, out, kd


def _edit(path: Path, change) -> None:
    """Rewrite the row in ``path`` with ``change(row)`` applied."""
    row = json.loads(path.read_text())
    change(row)
    path.write_text(json.dumps(row))


BAD_VALUES = {
    "top1 a word": (lambda r: r.update(top1="banana"),
                    "top1 = 'banana' is not a number in [0, 100]"),
    "no top1": (lambda r: r.pop("top1"), "an ok row without top1"),
    "top1 NaN": (lambda r: r.update(top1=math.nan), "top1 = nan is not a number"),
    "top1 above 100": (lambda r: r.update(top1=150.0), "top1 = 150.0 is not a number"),
    "negative wall time": (lambda r: r.update(wall_s=-1.0),
                           "wall_s = -1.0 is not a finite number >= 0"),
    "huge wall time": (lambda r: r.update(wall_s=10**400), "wall_s = 1000000"),
    "seed as text": (lambda r: r.update(seed="0"), "seed = '0' is not an integer >= 0"),
    "unknown status": (lambda r: r.update(status="great"), "status = 'great' is not one of"),
    "config not JSON": (lambda r: r.update(config="{bad"), "config is not a JSON object"),
    "empty method": (lambda r: r.update(method=""), "method = '' is not a name"),
    "another cell's id": (lambda r: r.update(cell_id="abc"), "cell_id 'abc' is not its folder's"),
}


@pytest.mark.parametrize("case", list(BAD_VALUES))
def test_a_row_with_bad_values_is_named_and_left_out_of_the_report(run_copy, capsys, case):
    _, out, kd = run_copy
    change, reason = BAD_VALUES[case]
    _edit(kd, change)
    code, stdout, err = run_cli(capsys, "report", str(out))
    assert code == 0
    assert f"kt-bench: warning: {kd} is damaged ({reason}" in err
    assert err.count("\n") == 1
    assert list(sorted_rows(out)["method"]) == ["student"]
    assert (out / "report.md").exists() and "| student " in stdout

    code, stdout, err = run_cli(capsys, "status", str(out))
    assert code == 0 and "result.json is damaged" in stdout


@pytest.mark.parametrize("how", ["list", "empty", "folder", "bad UTF-8"])
def test_a_row_file_that_holds_no_object_is_left_out_of_the_report(run_copy, capsys, how):
    _, out, kd = run_copy
    if how == "list":
        kd.write_text("[1, 2]")
    elif how == "empty":
        kd.write_text("")
    elif how == "folder":
        kd.unlink()
        kd.mkdir()
    else:
        kd.write_bytes(b"\xff\xfe{}")
    code, _, err = run_cli(capsys, "report", str(out))
    assert code == 0 and f"kt-bench: warning: {kd} is damaged (" in err
    assert list(sorted_rows(out)["method"]) == ["student"]


def test_a_stray_row_without_identity_is_skipped_with_one_line(run_copy, capsys):
    grid, out, _ = run_copy
    stray = out / "cells" / "x" / "result.json"
    stray.parent.mkdir()
    stray.write_text(json.dumps({"status": "ok", "top1": 3.0}))
    code, _, err = run_cli(capsys, "report", str(out))
    assert code == 0
    assert f"kt-bench: warning: {stray} is not a cell's result row (no grid, " in err
    assert err.rstrip().endswith("; skipped")
    assert len(sorted_rows(out)) == 2

    # a run rebuilds results.csv after each cell: the stray row is named once, and kept
    for row in (out / "cells").glob("*/result.json"):
        if row != stray:
            row.unlink()
    code, _, err = run_cli(capsys, "run", "--grid", str(grid), "--out", str(out), "--no-report")
    assert code == 0 and err.count(f"{stray} is not a cell's result row") == 1
    assert stray.exists() and not set_aside(stray)
    assert list(sorted_rows(out)["status"]) == ["ok", "ok"]


@pytest.mark.parametrize("case", ["top1 a word", "no top1", "seed as text"])
def test_a_run_sets_a_bad_row_aside_and_runs_its_cell_again(run_copy, capsys, case):
    grid, out, kd = run_copy
    before = sorted_rows(out)
    original = kd.read_text()
    _edit(kd, BAD_VALUES[case][0])
    damaged = kd.read_text()
    code, stdout, err = run_cli(capsys, "run", "--grid", str(grid), "--out", str(out),
                             "--no-report")
    assert code == 0
    assert f"kt-bench: warning: {kd} is damaged ({BAD_VALUES[case][1]}" in err
    assert len(set_aside(kd)) == 1 and set_aside(kd)[0].read_text() == damaged
    after = sorted_rows(out)
    assert list(after["status"]) == ["ok", "ok"]
    assert after[NUMBERS].equals(before[NUMBERS])  # rebuilt from the cell's checkpoint
    assert json.loads(kd.read_text())["top1"] == json.loads(original)["top1"]


def test_a_run_sets_aside_a_folder_named_result_json(run_copy, capsys):
    grid, out, kd = run_copy
    kd.unlink()
    kd.mkdir()
    code, _, err = run_cli(capsys, "run", "--grid", str(grid), "--out", str(out), "--no-report")
    assert code == 0 and f"{kd} is damaged (not readable JSON)" in err
    assert kd.is_file() and set_aside(kd)[0].is_dir()


def _refuse_to_read(monkeypatch, unreadable: Path) -> None:
    """Make ``unreadable`` a file this user may not read (as another user's file with mode
    0600 is), whoever runs the tests (root reads every file)."""
    read_json = atomic.read_json

    def refuse(path):
        if Path(path) == unreadable:
            raise atomic.unreadable(path)
        return read_json(path)

    monkeypatch.setattr(atomic, "read_json", refuse)


@pytest.fixture
def unreadable(run_copy, monkeypatch):
    """The kd row made one this user may not read."""
    _, _, kd = run_copy
    _refuse_to_read(monkeypatch, kd)
    return kd


def test_an_unreadable_row_is_named_by_report_and_status(run_copy, unreadable, capsys):
    _, out, kd = run_copy
    code, stdout, err = run_cli(capsys, "report", str(out))
    assert code == 0
    assert f"kt-bench: warning: cannot read {kd}: permission denied" in err
    assert err.rstrip().endswith("its row is left out") and err.count("\n") == 1
    assert list(sorted_rows(out)["method"]) == ["student"]
    code, stdout, _ = run_cli(capsys, "status", str(out))
    assert code == 0 and " unreadable " in stdout and "1 unreadable" in stdout


def test_a_run_leaves_an_unreadable_row_and_its_cell_to_the_owner(run_copy, unreadable,
                                                                    capsys):
    grid, out, kd = run_copy
    text, stamp = kd.read_text(), kd.stat().st_mtime_ns
    argv = ["run", "--grid", str(grid), "--out", str(out), "--no-report"]
    code, stdout, err = run_cli(capsys, *argv)
    assert code == 0
    assert (f"kt-bench: warning: cannot read {kd}: permission denied" in err
            and "its cell is left to the file's owner" in err)
    assert kd.read_text() == text and kd.stat().st_mtime_ns == stamp and not set_aside(kd)
    assert "| kd " not in stdout and "| student " in stdout

    code, _, err = run_cli(capsys, *argv, "--only", "method=kd")
    assert code == 2 and "nothing to run" in err and not set_aside(kd)


def test_an_unreadable_manifest_is_left_as_it_is(run_copy, capsys, monkeypatch):
    grid, out, _ = run_copy
    manifest = out / "manifest.json"
    text = manifest.read_text()
    _refuse_to_read(monkeypatch, manifest)
    code, stdout, err = run_cli(capsys, "status", str(out))
    assert code == 0 and "2 cells: 2 ok" in stdout
    assert f"kt-bench: warning: cannot read {manifest}: permission denied" in err
    code, _, err = run_cli(capsys, "run", "--grid", str(grid), "--out", str(out), "--no-report")
    assert code == 0 and "status finds the cells by their config.json" in err
    assert manifest.read_text() == text and not set_aside(manifest)


def test_identity_fields_are_those_a_cell_and_the_runner_write(tmp_path):
    (cell,) = expand(load_grid(str(write_tiny_grid(tmp_path, methods=("kd",)))))
    written = set(cell.identity()) | {"world_size"}
    assert set(IDENTITY_FIELDS) == written
    row = {**cell.identity(), "world_size": 1, "status": "failed", "error": "boom"}
    assert check_row(row, cell.cell_id) is row
    with pytest.raises(DamagedRowError, match="an ok row without top1, top5"):
        check_row({**row, "status": "ok", "error": ""}, cell.cell_id)
    with pytest.raises(StrayRowError, match="no dataset"):
        check_row({k: v for k, v in row.items() if k != "dataset"}, cell.cell_id)


@pytest.mark.parametrize("metrics", [
    "{bad\n", "[1, 2]\n", '{"epoch": 1, "loss": 1.0}\n', '{"epoch": 1, "top1": "x", "loss": 1}\n',
    None,
])
def test_malformed_metrics_leave_out_one_curve_only(run_copy, capsys, metrics):
    _, out, kd = run_copy
    path = kd.parent / "metrics.jsonl"
    path.unlink()
    if metrics is None:
        path.mkdir()
    else:
        path.write_text(metrics)
    code, _, err = run_cli(capsys, "report", str(out))
    assert code == 0 and f"kt-bench: warning: {path} " in err and "its curves are left out" in err
    assert (out / "report" / "curves.png").exists()
    code, stdout, _ = run_cli(capsys, "status", str(out))
    assert code == 0 and "2 cells: 2 ok" in stdout


def test_a_results_csv_that_cannot_be_written_does_not_stop_the_report(run_copy, capsys):
    _, out, _ = run_copy
    (out / "results.csv").unlink()
    (out / "results.csv").mkdir()
    code, stdout, err = run_cli(capsys, "report", str(out))
    assert code == 0 and f"cannot write {out / 'results.csv'}" in err
    assert "| kd " in stdout and (out / "report.md").exists()


def test_a_report_of_rows_all_left_out_says_there_are_no_results(run_copy, capsys):
    _, out, _ = run_copy
    for path in (out / "cells").glob("*/result.json"):
        path.write_text("{}")
    code, stdout, err = run_cli(capsys, "report", str(out))
    assert code == 0 and "(no results)" in stdout and err.count("is not a cell's result") == 2
    assert "(no results)" in (out / "report.md").read_text()


def test_swept_values_that_are_lists_or_names_do_not_stop_a_report(run_copy, capsys):
    _, out, kd = run_copy
    _edit(kd, lambda r: r.update({"kd.layers": ["stage1", "stage2"], "kd.mode": "soft"}))
    code, stdout, err = run_cli(capsys, "report", str(out))
    assert code == 0 and err == ""
    assert '["stage1", "stage2"]' in stdout and "soft" in stdout
