"""Where a sweep is, as a run says it and as ``kt-bench status`` reads it: a line per epoch of
each cohort and teacher (its epoch of N, each student's top-1 and loss, the time spent and
left), the grid's line (cells done, failed and left, teachers to train, time left), plain
lines without bar frames in a file, the progress files status shows running cells and
teachers by, and ``--teacher-epochs``."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kt_bench.core.durations import format_duration, time_left
from kt_bench.core.errors import KtBenchError
from kt_bench.core.locks import FileLock
from kt_bench.reporting.status import cell_states, format_status, format_teacher, teacher_states
from kt_bench.sweep import progress
from kt_bench.sweep.cells import expand
from kt_bench.sweep.config import load_grid
from kt_bench.sweep.manifest import write_manifest
from kt_bench.sweep.teachers import teacher_path
from kt_bench.training import hooks
from kt_bench.workflow.run import apply_overrides
from kt_bench.workflow.settings import RunSettings

from .conftest import run_cli, write_tiny_grid

#: The tiny grid's dataset, as lines name it.
TINY_DATA = re.escape("synthetic(image_size=8,n_test=48,n_train=96,noise=2.0)")
TINY_PAIR = TINY_DATA + re.escape(" resnet8(width=0.5)->resnet8(width=0.25)")
TIME = r"(\d+[smhd]){1,2}"


@pytest.mark.parametrize("seconds,shown", [
    (0, "0s"), (-3, "0s"), (44.6, "45s"), (59.6, "1m00s"), (130, "2m10s"), (599, "9m59s"),
    (720, "12m"), (3599, "59m"), (3900, "1h05m"), (3 * 86400 + 4 * 3600 + 59, "3d04h")])
def test_a_duration_reads_to_the_precision_its_size_needs(seconds, shown):
    assert format_duration(seconds) == shown


def test_time_left_is_the_pace_so_far_times_the_work_left():
    assert time_left(10.0, 2, 3) == 15.0
    assert time_left(10.0, 2, -1) == 0.0
    assert time_left(10.0, 0, 3) is None  # nothing measured yet


class FakeClock(hooks.EpochClock):
    """An epoch clock that reads what the test sets."""

    def __init__(self) -> None:
        super().__init__()
        self.now = 0.0

    def elapsed(self) -> float:
        return self.now


def record(epoch: int, top1: float, loss: float, **more) -> dict:
    return {"epoch": epoch, "lr": 0.1, "top1": top1, "top5": 99.0, "loss": loss, **more}


def test_an_epoch_line_names_the_cohort_each_student_and_the_time_left():
    lines: list[str] = []
    clock = FakeClock()
    label = "digits resnet20->resnet8(width=0.5) seed 1"
    # ab has a 3-epoch initialisation stage: 15 global epochs against the others' 12
    report = hooks.EpochLines(label, ["student", "kd", "fitnet", "ab"], [12, 12, 12, 15], clock,
                              lines.append)
    clock.now = 60.0
    report.epoch_end(10, {0: record(1, 50.0, 2.0), 1: record(1, 52.25, 3.5),
                          2: record(1, 40.0, 12.345), 3: record(1, 10.0, 0.5, stage="init")})
    clock.now = 130.0
    # fitnet stopped in epoch 2 (its row says why)
    report.epoch_end(20, {0: record(2, 91.24, 0.4123), 1: record(2, 93.0, 1.2),
                          3: record(2, 11.0, 0.25, stage="init")})
    assert lines == [
        f"[{label}] epoch 1/15  student 50.0% (loss 2), kd 52.2% (loss 3.5), fitnet 40.0% "
        "(loss 12.3), ab 10.0% (loss 0.5, init)  1m00s, ETA 14m",  # 60 s x 14 epochs left
        f"[{label}] epoch 2/15  student 91.2% (loss 0.412), kd 93.0% (loss 1.2), fitnet "
        "stopped, ab 11.0% (loss 0.25, init)  2m10s, ETA 14m",  # 65 s x 13 epochs left
    ]
    clock.now = 900.0
    # past epoch 12 only ab trains: the others finished, not stopped
    report.epoch_end(150, {3: record(15, 60.0, 0.3)})
    assert lines[-1] == f"[{label}] epoch 15/15  ab 60.0% (loss 0.3)  done in 15m"


def test_a_teachers_epoch_line_shows_its_top1_and_loss():
    lines: list[str] = []
    clock = FakeClock()
    report = hooks.EpochLines("teacher resnet20 on digits, seed 0", None, [30], clock,
                              lines.append)
    for epoch in (1, 2):
        clock.now = 5.0 * epoch
        report.epoch_end(epoch, {0: record(epoch, 80.0 + epoch, 0.5)})
    assert lines[-1] == ("[teacher resnet20 on digits, seed 0] epoch 2/30  top-1 82.0% "
                         "(loss 0.5)  10s, ETA 2m20s")


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_bars_are_drawn_on_a_terminal_only(monkeypatch):
    monkeypatch.setattr(sys, "stderr", io.StringIO())  # a file, a pipe, a job's log
    assert not hooks.bars_wanted()
    assert hooks.ProgressBar("x").disable
    monkeypatch.setattr(sys, "stderr", _Terminal())
    assert hooks.bars_wanted()
    assert not hooks.ProgressBar("x").disable
    assert hooks.ProgressBar("x", disable=True).disable  # not the local main process


def tiny_cells(tmp_path: Path, seeds=(0, 1), **overrides):
    grid = apply_overrides(load_grid(str(write_tiny_grid(tmp_path, seeds=seeds))),
                           RunSettings(**overrides))
    return expand(grid, "no")


def test_the_grid_line_counts_cells_and_teachers_and_times_what_is_left(tmp_path):
    cells = tiny_cells(tmp_path)  # student and kd, seeds 0 and 1: two teachers, two epochs
    out, cache = tmp_path / "out", tmp_path / "cache"
    resumed = out / "cells" / cells[3].cell_id / "metrics.jsonl"  # kd seed 1: 1 epoch done
    resumed.parent.mkdir(parents=True)
    resumed.write_text("{}\n")
    lines: list[str] = []
    grid = progress.GridProgress(cells, out, lambda c: teacher_path(cache, c), lines.append)
    grid.say()
    assert lines == ["grid: 0/4 cells done (0 failed), 4 left, 2 teachers to train"]

    grid.finished(0, {"status": "ok"})
    grid.finished(1, {"status": "failed"})  # seed 0's cells have rows: its teacher is not due
    grid.measured_cells(40.0, 4)  # 10 s a cell-epoch
    # seed 1's cells have 2 + 1 epochs left; no teacher's pace yet
    assert grid.line() == ("grid: 2/4 cells done (1 failed), 2 left, 1 teacher to train, "
                           "ETA 30s + 1 teacher")
    grid.measured_teacher(30.0, 2)  # 15 s a teacher epoch, 2 epochs a teacher
    assert grid.line().endswith(", 1 teacher to train, ETA 1m00s")  # 30 s + 30 s
    cache.mkdir()
    teacher_path(cache, cells[2]).write_bytes(b"")  # seed 1's teacher is cached now
    assert grid.line() == "grid: 2/4 cells done (1 failed), 2 left, ETA 30s"
    grid.finished(2, {"status": "ok"})
    grid.finished(3, {"status": "n/a"})
    assert grid.line() == "grid: 4/4 cells done (1 failed)"


def test_the_grid_line_counts_rows_of_earlier_runs(tmp_path):
    cells = tiny_cells(tmp_path, seeds=(0,))
    out = tmp_path / "out"
    (out / "cells" / cells[0].cell_id).mkdir(parents=True)
    row = {**cells[0].identity(), "world_size": 1, "status": "ok", "error": "", "top1": 50.0,
           "top5": 90.0, "top1_best": 50.0, "teacher_top1": 60.0, "wall_s": 1.0,
           "images_per_s": 1.0}
    (out / "cells" / cells[0].cell_id / "result.json").write_text(json.dumps(row))
    grid = progress.GridProgress(cells, out, lambda c: None)  # teachers loaded, not trained
    assert grid.line() == "grid: 1/2 cells done (0 failed), 1 left"


def test_a_cells_epochs_count_its_initialisation_stage(tmp_path):
    cell = tiny_cells(tmp_path, seeds=(0,))[0]
    assert progress.cell_epochs(cell) == 2
    staged = dataclasses.replace(cell, method_config={"ab": {"init_epochs": 3, "margin": 1.0}})
    assert progress.cell_epochs(staged) == 5


def _run_to_files(tmp_path: Path, *flags: str) -> tuple[str, str]:
    """``kt-bench run`` on the tiny grid (seed 0, a 1-epoch teacher) as a cluster job runs it:
    stdout and stderr to files. Both as written."""
    grid = write_tiny_grid(tmp_path)
    stdout, stderr = tmp_path / "stdout.txt", tmp_path / "stderr.txt"
    with open(stdout, "wb") as out, open(stderr, "wb") as err:
        proc = subprocess.run([sys.executable, "-m", "kt_bench", "run", "--grid", str(grid),
                               "--out", str(tmp_path / "out"), "--device", "cpu",
                               "--precision", "no", "--no-report", *flags],
                              stdout=out, stderr=err, timeout=600)
    assert proc.returncode == 0, stderr.read_text()[-2000:]
    return stdout.read_text(), stderr.read_text()


def test_a_run_written_to_a_file_says_each_epoch_and_the_grid_in_plain_lines(tmp_path):
    stdout, stderr = _run_to_files(tmp_path, "--teacher-epochs", "1")
    assert "\r" not in stdout + stderr  # no bar frames
    assert "%|" not in stderr
    lines = stdout.splitlines()
    said = [ln for ln in lines if ln.startswith(("grid:", "["))]
    teacher = rf"\[teacher resnet8\(width=0.5\) on {TINY_DATA}, seed 0\]"
    epoch = r"student \d+\.\d% \(loss [-+.e\d]+\), kd \d+\.\d% \(loss [-+.e\d]+\)"
    expected = [
        r"grid: 0/2 cells done \(0 failed\), 2 left, 1 teacher to train",
        rf"{teacher} epoch 1/1  top-1 \d+\.\d% \(loss [-+.e\d]+\)  done in {TIME}",
        rf"\[{TINY_PAIR} seed 0\] epoch 1/2  {epoch}  {TIME}, ETA {TIME}",
        rf"\[{TINY_PAIR} seed 0\] epoch 2/2  {epoch}  done in {TIME}",
        r"\[1/2\] student +seed 0: top1 ",
        r"\[2/2\] kd +seed 0: top1 ",
        r"grid: 2/2 cells done \(0 failed\)",
    ]
    assert len(said) == len(expected), stdout
    for line, pattern in zip(said, expected, strict=True):
        assert re.match(pattern, line), (line, pattern)
    for log in (tmp_path / "out" / "cells").glob("*/log.txt"):
        text = log.read_text()
        assert re.search(rf" epoch 1: loss [\d.]+ top1 [\d.]+ \(1/2, {TIME}, ETA {TIME}\)\n",
                         text), text
        assert re.search(rf" epoch 2: loss [\d.]+ top1 [\d.]+ \(2/2, done in {TIME}\)\n",
                         text), text
        state = json.loads((log.parent / "progress.json").read_text())
        assert (state["epoch"], state["epochs"], state["eta_s"]) == (2, 2, 0.0)
    # the teacher's announcement is taken back once it is trained
    assert not (tmp_path / "out" / progress.TEACHERS_TRAINING).exists()


def test_status_shows_the_teacher_training_and_each_running_cells_epoch(tmp_path, capsys,
                                                                       monkeypatch):
    from kt_bench.sweep import runner, teachers

    grid = write_tiny_grid(tmp_path)
    out = tmp_path / "out"
    seen: dict[str, str] = {}

    def say_and_look(line: str) -> None:  # what status shows as each progress line is said
        if " epoch 1/" in line:
            kind = "teacher" if line.startswith("[teacher") else "cohort"
            states = teacher_states(out)
            seen[kind] = format_status(cell_states(out, states), states)

    monkeypatch.setattr(teachers, "say", say_and_look)
    monkeypatch.setattr(runner, "say", say_and_look)
    code, _, _ = run_cli(capsys, "run", "--grid", str(grid), "--out", str(out), "--device",
                         "cpu", "--precision", "no", "--no-report", "--teacher-epochs", "2")
    assert code == 0
    where = f"{socket.gethostname()} {os.getpid()}"
    status = seen["teacher"].splitlines()
    assert re.fullmatch(rf"teacher resnet8\(width=0.5\) on {TINY_DATA}, seed 0: training on "
                        rf"{where}, epoch 1/2, ETA {TIME}", status[-1]), status[-1]
    assert status[-2] == "2 cells: 2 running"
    for line in status[2:4]:
        assert re.search(rf" running +0/2 +on {where}, waiting for its teacher$", line), line

    status = seen["cohort"].splitlines()
    assert status[-1] == "2 cells: 2 running"  # the teacher is trained
    for line in status[2:4]:
        assert re.search(rf" running +1/2 +on {where}, epoch 1/2, ETA {TIME}$", line), line


def _manifest_with_running_cell(tmp_path: Path):
    cells = tiny_cells(tmp_path, seeds=(0,))
    out = tmp_path / "out"
    write_manifest(out, cells)
    cell_dir = out / "cells" / cells[0].cell_id
    cell_dir.mkdir(parents=True)
    return cells, out, cell_dir


def test_status_shows_a_running_cells_epoch_and_time_left_as_of_now(tmp_path):
    cells, out, cell_dir = _manifest_with_running_cell(tmp_path)
    path = cell_dir / progress.CELL_PROGRESS
    record = progress.progress_record(3, 12, 60.0, 300.0)
    lock = FileLock(cell_dir / "lock")
    lock.acquire()
    try:
        locked_at = float((cell_dir / "lock").read_text().split()[2])
        path.write_text(json.dumps({**record, "updated": locked_at - 10}))
        # written before this runner took the cell: an earlier run's, not shown
        assert cell_states(out).loc[0, "progress"] == "starting"
        path.write_text(json.dumps({**record, "updated": time.time()}))  # by this runner
        progress_now = cell_states(out).loc[0, "progress"]
    finally:
        lock.release()
    assert re.fullmatch(r"epoch 3/12, ETA (5m00s|4m59s)", progress_now), progress_now
    # written 100 s ago with 300 s left: 200 s left now
    assert progress.eta_now(record, now=record["updated"] + 100) == 200.0
    assert progress.eta_now(record, now=record["updated"] + 400) == 0.0
    assert progress.eta_now({**record, "eta_s": None}) is None


def test_status_shows_a_teacher_whose_runner_is_gone_as_stopped(tmp_path):
    cells, out, _ = _manifest_with_running_cell(tmp_path)
    marker = out / progress.TEACHERS_TRAINING / "resnet8-abc.json"
    marker.parent.mkdir(parents=True)
    facts = {"teacher": "resnet20", "dataset": "digits", "seed": 0, "where": "node7 12",
             "lock": str(tmp_path / "cache" / "resnet8-abc.lock")}
    marker.write_text(json.dumps(progress.progress_record(12, 30, 100.0, 150.0, **facts)))
    (out / progress.TEACHERS_TRAINING / "broken.json").write_text("{")  # no teacher
    states = teacher_states(out)
    assert [s["state"] for s in states] == ["stopped"]
    assert format_status(cell_states(out, states), states).splitlines()[-1] == (
        "teacher resnet20 on digits, seed 0: stopped at epoch 12/30 (its runner is gone; a run "
        "resumes it from its checkpoint)")

    lock = FileLock(facts["lock"])  # a runner holds it: training
    lock.acquire()
    try:
        (state,) = teacher_states(out)
    finally:
        lock.release()
    assert state["state"] == "training"
    assert re.fullmatch(r"teacher resnet20 on digits, seed 0: training on node7 12, epoch "
                        r"12/30, ETA 2m(29|30)s", format_teacher(state))


def test_teacher_epochs_replace_the_teacher_recipes_and_make_another_teacher(tmp_path):
    grid = load_grid("demo")
    short = apply_overrides(grid, RunSettings(teacher_epochs=3))
    assert (short.teacher_recipe.epochs, short.recipe.epochs) == (3, 12)
    before, after = expand(grid)[0], expand(short)[0]
    assert after.teacher_config()["recipe"]["epochs"] == 3
    assert after.cell_id != before.cell_id  # another teacher: other cells
    assert teacher_path(Path("c"), after) != teacher_path(Path("c"), before)

    crd = apply_overrides(load_grid("crd-cifar100"), RunSettings(teacher_epochs=24))
    assert crd.teacher_recipe.milestones == (15, 18, 21)  # 150, 180, 210 of 240, in proportion
    paper = apply_overrides(load_grid("paper"), RunSettings(teacher_epochs=2))
    assert {part.teacher_recipe.epochs for part in paper.leaves()} == {2}


def test_teacher_epochs_below_one_is_a_one_line_error(tmp_path, capsys):
    code, _, err = run_cli(capsys, "run", "--grid", "demo", "--teacher-epochs", "0",
                           "--dry-run")
    assert code == 2 and err == "kt-bench: error: --teacher-epochs must be >= 1, got 0\n"
    with pytest.raises(KtBenchError, match="^teacher_epochs must be >= 1, got -1$"):
        apply_overrides(load_grid("demo"), RunSettings(teacher_epochs=-1))
    code, stdout, _ = run_cli(capsys, "run", "--grid", "demo", "--teacher-epochs", "3",
                              "--dry-run", "--only", "method=kd", "--only", "seed=0")
    assert code == 0 and "1 cells; results would go to" in stdout


def test_a_student_waiting_in_a_resumed_cohort_is_not_called_stopped():
    """In a resumed cohort a student whose checkpoint is ahead trains only from its own next
    epoch: until then it has no records, and it has not stopped."""
    lines: list[str] = []
    clock = FakeClock()
    report = hooks.EpochLines("c", ["student", "kd"], [4, 4], clock, lines.append)
    clock.now = 10.0
    report.epoch_end(10, {0: record(3, 50.0, 1.0)})  # kd resumed after epoch 3
    clock.now = 20.0
    report.epoch_end(20, {0: record(4, 60.0, 0.5), 1: record(4, 70.0, 0.8)})
    assert lines == ["[c] epoch 3/4  student 50.0% (loss 1)  10s, ETA 10s",
                     "[c] epoch 4/4  student 60.0% (loss 0.5), kd 70.0% (loss 0.8)  done in 20s"]
