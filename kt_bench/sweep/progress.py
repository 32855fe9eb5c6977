"""Where a sweep is: the grid line a runner prints (cells done, failed and left, teachers still
to train, and the time left at the pace measured so far), and the small progress files that
``kt-bench status`` reads while a cell or a teacher trains. Light to import (no torch)."""

from __future__ import annotations

import contextlib
import contextvars
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from kt_bench.core import atomic
from kt_bench.core.durations import format_duration, time_left
from kt_bench.core.errors import KtBenchError
from kt_bench.sweep.cells import Cell
from kt_bench.sweep.rows import finished_row

#: A training cell's progress file (in its folder), rewritten after every epoch.
CELL_PROGRESS = "progress.json"
#: The folder of a run folder holding a progress file per teacher being trained for it.
TEACHERS_TRAINING = "teachers_training"
#: Statuses of finished cells that count as done well (any other one counts as failed).
GOOD_STATUSES = ("ok", "n/a")


def progress_record(epoch: int | None, epochs: int, elapsed_s: float, eta_s: float | None,
                    **extra: Any) -> dict[str, Any]:
    """What a progress file holds: the last epoch done (None before the first one of this
    run) of ``epochs``, the seconds spent and expected left, when it was written (Unix time),
    and ``extra`` facts."""
    return {"epoch": epoch, "epochs": epochs, "elapsed_s": round(elapsed_s, 1),
            "eta_s": None if eta_s is None else round(eta_s, 1), "updated": time.time(),
            **extra}


def write_progress(path: Path, record: dict[str, Any]) -> None:
    """Write a progress file if it can be: it only informs ``status``, so a file that cannot
    be written stops nothing."""
    with contextlib.suppress(KtBenchError, OSError):
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic.write_json(path, record)


def read_progress(path: Path) -> dict[str, Any] | None:
    """The progress file at ``path``; None when it is missing, damaged or not ours to read."""
    try:
        record = atomic.read_json(path)
    except KtBenchError:
        return None
    ok = isinstance(record, dict) and isinstance(record.get("epochs"), int) and isinstance(
        record.get("updated"), (int, float))
    return record if ok else None


def eta_now(record: dict[str, Any], now: float | None = None) -> float | None:
    """The seconds left by a progress ``record`` as of ``now``: its estimate less the time
    since it was written (never below 0); None where it has none."""
    eta = record.get("eta_s")
    if not isinstance(eta, (int, float)):
        return None
    return max(0.0, eta - ((time.time() if now is None else now) - record["updated"]))


def cell_epochs(cell: Cell) -> int:
    """The global epochs of ``cell``'s student: its recipe's and an initialisation stage's
    (the largest ``init_epochs`` of its method's members; known from the resolved options,
    without building the method)."""
    init = [opts.get("init_epochs", 0) for opts in cell.method_config.values()
            if isinstance(opts, dict)]
    return cell.recipe.epochs + max([e for e in init if isinstance(e, int)], default=0)


def epochs_done(cell_dir: Path) -> int:
    """The lines of the cell's ``metrics.jsonl`` (one per epoch); 0 when it cannot be read."""
    try:
        return len((cell_dir / "metrics.jsonl").read_bytes().splitlines())
    except OSError:  # missing, a folder, or not ours to read
        return 0


class _Pace:
    """Seconds of work measured over units of work done."""

    def __init__(self) -> None:
        self.seconds, self.units = 0.0, 0

    def add(self, seconds: float, units: int) -> None:
        """Count ``units`` done in ``seconds``."""
        if units > 0:
            self.seconds += seconds
            self.units += units

    def left(self, units: int) -> float | None:
        """The seconds ``units`` more take at this pace; None before any was measured."""
        return time_left(self.seconds, self.units, units)


#: The grid progress of the runner in this context (see :meth:`GridProgress.tracking`).
_ACTIVE: contextvars.ContextVar[GridProgress | None] = contextvars.ContextVar(
    "kt_bench_grid_progress", default=None)


def active() -> GridProgress | None:
    """The :class:`GridProgress` of the runner running now in this context, if any: teachers
    and cohorts report their measured pace to it, and teachers announce their training in its
    run folder."""
    return _ACTIVE.get()


class GridProgress:
    """A runner's way through ``cells`` (in run folder ``out``): which finished, the epochs
    each has left, the teachers still to train (``teacher_file``: a cell's teacher cache
    file, None for a teacher that is loaded, not trained), the pace of the cell epochs and
    teacher epochs trained so far, and the grid line saying it all (to ``write``)."""

    def __init__(self, cells: list[Cell], out: Path,
                 teacher_file: Callable[[Cell], Path | None],
                 write: Callable[[str], None] | None = None) -> None:
        self.cells, self.out, self.write = cells, out, write
        self.statuses: dict[int, str] = {}
        self.epochs_left: dict[int, int] = {}
        #: The teacher cache file of each unfinished cell (None: its teacher is loaded).
        self.teacher_files: dict[int, Path | None] = {}
        for i, cell in enumerate(cells):
            try:
                row = finished_row(out, cell.cell_id)
            except KtBenchError:  # not ours to read: the run leaves it, and so do we
                row = None
            if row is not None:
                self.statuses[i] = row["status"]
            else:
                done = epochs_done(out / "cells" / cell.cell_id)
                self.epochs_left[i] = max(cell_epochs(cell) - done, 0)
                self.teacher_files[i] = teacher_file(cell)
        self.cell_pace, self.teacher_pace = _Pace(), _Pace()

    @contextlib.contextmanager
    def tracking(self) -> Iterator[GridProgress]:
        """Within the block, this is the :func:`active` grid progress."""
        token = _ACTIVE.set(self)
        try:
            yield self
        finally:
            _ACTIVE.reset(token)

    def finished(self, index: int, row: dict[str, Any]) -> None:
        """Cell ``index`` has its row."""
        self.statuses[index] = row.get("status", "failed")
        self.epochs_left.pop(index, None)

    def measured_cells(self, seconds: float, cell_epochs: int) -> None:
        """A cohort trained ``cell_epochs`` epochs of its cells (summed) in ``seconds``."""
        self.cell_pace.add(seconds, cell_epochs)

    def measured_teacher(self, seconds: float, epochs: int) -> None:
        """A teacher trained ``epochs`` epochs in ``seconds``."""
        self.teacher_pace.add(seconds, epochs)

    def teachers_left(self) -> dict[Path, int]:
        """The teachers the unfinished cells still need trained (not in the cache), with
        their epochs."""
        left: dict[Path, int] = {}
        for i in self.epochs_left:
            path = self.teacher_files[i]
            if path is not None and path not in left and not path.exists():
                left[path] = self.cells[i].teacher_recipe.epochs
        return left

    def line(self) -> str:
        """``grid: 8/24 cells done (1 failed), 16 left, 1 teacher to train, ETA 12m``."""
        total, done = len(self.cells), len(self.statuses)
        failed = sum(s not in GOOD_STATUSES for s in self.statuses.values())
        text = f"grid: {done}/{total} cells done ({failed} failed)"
        if done == total:
            return text
        teachers = self.teachers_left()
        text += f", {total - done} left"
        if teachers:
            text += f", {len(teachers)} teacher{'s' if len(teachers) > 1 else ''} to train"
        return text + _eta_words(self.cell_pace.left(sum(self.epochs_left.values())),
                                 self.teacher_pace.left(sum(teachers.values())), len(teachers))

    def say(self) -> None:
        """Write the grid line (where there is somewhere to write it)."""
        if self.write is not None:
            self.write(self.line())


def _eta_words(cells_s: float | None, teachers_s: float | None, teachers: int) -> str:
    """``, ETA 12m`` for the time left; ``, ETA 12m + 1 teacher`` while no teacher's pace
    is measured; nothing while no cell's is."""
    if cells_s is None:
        return ""
    if teachers and teachers_s is None:
        return f", ETA {format_duration(cells_s)} + {teachers} teacher{'s' * (teachers > 1)}"
    return f", ETA {format_duration(cells_s + (teachers_s or 0.0))}"


def teacher_marker(out: Path, cache_file: Path) -> Path:
    """Where a runner for run folder ``out`` announces that it trains the teacher cached in
    ``cache_file``."""
    return out / TEACHERS_TRAINING / f"{cache_file.stem}.json"


def teacher_markers(out: Path) -> list[dict[str, Any]]:
    """The teacher progress files of run folder ``out`` (readable ones), by name."""
    records = []
    for path in sorted((out / TEACHERS_TRAINING).glob("*.json")):
        record = read_progress(path)
        if record is not None:
            records.append(record)
    return records
