"""Running a grid: cells -> run directories -> one tidy result row per cell."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list

from kt_bench.api.method import Method, NotApplicable, build_method
from kt_bench.core import atomic
from kt_bench.core.clock import CLOCK
from kt_bench.core.durations import time_left
from kt_bench.core.errors import KtBenchError, first_line
from kt_bench.core.interrupts import cell_failure, is_stop, stop_reason
from kt_bench.core.locks import FileLock
from kt_bench.data import load_dataset
from kt_bench.data.bundle import DataBundle
from kt_bench.sweep.cells import Cell
from kt_bench.sweep.diagnostics import measure_cells, row_columns
from kt_bench.sweep.fusion_choice import choose_fusion
from kt_bench.sweep.progress import (
    CELL_PROGRESS,
    GridProgress,
    active,
    progress_record,
    write_progress,
)
from kt_bench.sweep.rows import finished_row, result_path, write_results_csv
from kt_bench.sweep.teachers import get_teacher, teacher_path
from kt_bench.training.engine import DivergedError, TrainResult, train_cohort
from kt_bench.training.hooks import EpochClock, EpochLines, say, standard_hooks, timing
from kt_bench.training.lifecycle import total_epochs
from kt_bench.training.tracking import CellRuns


class RowsNotKept(KtBenchError):
    """A cell's row could not be written to its ``result.json``: the grid stops, as no row it
    went on to make could be kept either."""


def _row_identity(cell: Cell, world_size: int) -> dict[str, Any]:
    return {**cell.identity(), "world_size": world_size}


@contextlib.contextmanager
def _writing(path: Path) -> Iterator[None]:
    """Within the block, an OSError is the one-line error ``cannot write PATH: reason`` (the
    writes of :mod:`kt_bench.core.atomic` raise such errors themselves)."""
    try:
        yield
    except OSError as exc:
        raise KtBenchError(f"cannot write {path}: {exc.strerror or first_line(exc)}") from None


def _log_line(cell_dir: Path, text: str) -> None:
    path = cell_dir / "log.txt"
    with _writing(path):
        atomic.append_line(path, text)


def _log_quietly(cell_dir: Path, text: str) -> None:
    """Append ``text`` to the cell's log if it can be: for the lines written on the way out
    (an end, a stop), where the row or the interrupt already says what matters."""
    with contextlib.suppress(KtBenchError):
        _log_line(cell_dir, text)


def _from_main(accelerator: Accelerator, value: Any) -> Any:
    """``value`` as the main process has it, on every process."""
    if accelerator.num_processes == 1:
        return value
    box = [value]
    broadcast_object_list(box, from_process=0)
    return box[0]


def _row_for(cell: Cell, result: TrainResult | None, error: BaseException | None,
             world_size: int, teacher_top1: float | None,
             diagnostics: dict[str, Any] | None = None,
             cohort_step_s: float | None = None) -> dict[str, Any]:
    row = _row_identity(cell, world_size)
    if teacher_top1 is not None:
        row["teacher_top1"] = teacher_top1
    if error is None and result is not None:
        row.update(top1=result.top1, top5=result.top5, top1_best=result.top1_best,
                   wall_s=result.wall_s, images_per_s=result.images_per_s,
                   step_s=result.step_s, fused=result.fused_steps > 0, status="ok",
                   cohort_step_s=result.step_s if cohort_step_s is None else cohort_step_s,
                   error="", init_epochs=sum(h.get("stage") == "init" for h in result.history),
                   **result.facts, **row_columns(diagnostics))
    elif isinstance(error, NotApplicable):  # as the published tables print N/A
        row.update(status="n/a", error=first_line(error))
    elif isinstance(error, DivergedError):
        row.update(status="diverged", error=first_line(error))
    elif isinstance(error, torch.cuda.OutOfMemoryError):
        row.update(status="oom", error=first_line(error))
    else:
        row.update(status="failed", error=first_line(error))
    return row


def _start_cells(cells: list[Cell], dirs: list[Path],
                 accelerator: Accelerator) -> dict[int, BaseException]:
    """Write each cell's ``config.json`` and the start line of its log; return the cells
    (by index) whose files cannot be written, with the error that fails them. The main
    process writes and decides for all."""
    problems: dict[int, str] = {}
    if accelerator.is_main_process:
        job = os.environ.get("SLURM_JOB_ID") or os.environ.get("SUBMITIT_LOCAL_JOB_ID")
        cohort = f" in a cohort of {len(cells)}" if len(cells) > 1 else ""
        for i, (cell, cell_dir) in enumerate(zip(cells, dirs, strict=True)):
            try:
                with _writing(cell_dir / "config.json"):
                    atomic.write_json(cell_dir / "config.json", cell.config())
                resume = (" (resuming from checkpoint.pt)"
                          if (cell_dir / "checkpoint.pt").exists() else "")
                _log_line(cell_dir, f"start host={socket.gethostname()} pid={os.getpid()}"
                                    f"{f' job={job}' if job else ''}{cohort}{resume}")
            except KtBenchError as exc:
                problems[i] = first_line(exc)
    return {i: KtBenchError(text) for i, text in _from_main(accelerator, problems).items()}


def _build_methods(cells: list[Cell], errors: dict[int, BaseException]) -> dict[int, Method]:
    """The methods of the cells not failed yet; a plugin that cannot be built (or exits)
    fails its own cell only, its error added to ``errors``."""
    built: dict[int, Method] = {}
    for i, cell in enumerate(cells):
        if i in errors:
            continue
        try:
            built[i] = build_method(cell.method, cell.method_config)
        except BaseException as exc:  # noqa: BLE001 - an interrupt is raised again
            errors[i] = cell_failure(exc, f"method '{cell.method}'")
    return built


def _epoch_logger(cell_dir: Path, epochs: int,
                  clock: EpochClock) -> Callable[[list[dict[str, Any]]], None]:
    """After each epoch: rewrite the cell's ``metrics.jsonl``, add a line to its log (``epoch
    3: loss ... top1 ... (3/12, 2m10s, ETA 6m30s)``, of its ``epochs`` global epochs, with the
    time since ``clock`` started and the time left at that pace) and rewrite its
    ``progress.json`` (what ``kt-bench status`` shows of a running cell)."""
    run = 0  # epochs of this run (a resumed cell starts after its checkpoint's)

    def on_epoch(history: list[dict[str, Any]]) -> None:
        nonlocal run
        run += 1
        lines = "".join(json.dumps(h, sort_keys=True) + "\n" for h in history)
        with _writing(cell_dir / "metrics.jsonl"):
            atomic.write_text(cell_dir / "metrics.jsonl", lines)
        last = history[-1]
        elapsed = clock.elapsed()
        eta = time_left(elapsed, run, epochs - last["epoch"])
        stage = " init" if last.get("stage") == "init" else ""
        _log_line(cell_dir, f"epoch {last['epoch']}: loss {last['loss']:.4f} "
                            f"top1 {last['top1']:.2f} ({last['epoch']}/{epochs}{stage}, "
                            f"{timing(elapsed, eta, last['epoch'] >= epochs)})")
        write_progress(cell_dir / CELL_PROGRESS,
                       progress_record(last["epoch"], epochs, elapsed, eta))
    return on_epoch


def run_group(cells: list[Cell], out: Path, accelerator: Accelerator, teacher_cache: Path,
              data: DataBundle, compile: bool = False,
              trackers: tuple[str, ...] = (), fuse: bool = True) -> list[dict[str, Any]]:
    """Train cells that differ only in method together (a cohort; one cell is a solo run)
    and return their rows. Their teacher comes first, from the cache if there.

    Each cell's folder receives its resolved ``config.json``, ``metrics.jsonl`` (rewritten
    after every epoch), ``log.txt`` (a line per start, epoch and end) and its last
    ``checkpoint.pt``; a student that trained to the end is then measured against the teacher
    (:func:`~kt_bench.sweep.diagnostics.measure_cells`: ``diagnostics.json`` and the row's
    ``agreement``, ``kl_teacher``, ``ece``, ``diagnostics_s``; a failed measurement fails no
    cell). A cell whose files cannot be written fails (its row names the file and
    the reason); the others go on. An interrupt (Ctrl-C, SIGTERM, a preempted job's exit) is
    logged in each cell's log and raised again: the next run resumes from the checkpoints.
    ``compile`` runs the networks through ``torch.compile``. ``trackers`` (``--log-with``)
    each get a run per cell under ``<out>/tracking`` (:mod:`kt_bench.training.tracking`).
    With ``fuse``, a cohort trains as one fused network where that pays
    (:func:`~kt_bench.sweep.fusion_choice.choose_fusion`).
    """
    main = accelerator.is_main_process
    dirs = [out / "cells" / c.cell_id for c in cells]
    errors = _start_cells(cells, dirs, accelerator)
    runs, stopped, teacher_top1 = CellRuns(), False, None
    rows: list[dict[str, Any]] = []
    try:
        if main:  # a run of its own per cell and tracker (in the try: closed if interrupted)
            runs = CellRuns.open(trackers, out / "tracking", cells, list(errors))
        results: dict[int, TrainResult] = {}
        diagnostics: dict[int, dict[str, Any]] = {}
        if len(errors) < len(cells):  # else no cell to train: no teacher either
            teacher, t_metrics = get_teacher(cells[0], data, accelerator, teacher_cache)
            CLOCK.mark("teacher")
            teacher_top1 = t_metrics["top1"]
            results = _train_built(cells, _build_methods(cells, errors), dirs, accelerator,
                                   data, teacher, compile, runs, fuse and not compile)
            # what each student took from the teacher (a failure here fails no cell)
            diagnostics = measure_cells(results, dirs, teacher, data, accelerator,
                                        cells[0].recipe.eval_batch_size)
        rows = [_row_for(c, results.get(i), results[i].error if i in results else errors[i],
                         accelerator.num_processes, teacher_top1, diagnostics.get(i),
                         # every member's steps, a failed one's too: its share of wall_s
                         sum(r.step_s for r in results.values()))
                for i, c in enumerate(cells)]
    except BaseException as exc:  # noqa: BLE001 - an interrupt is raised again
        if is_stop(exc):  # resumable: every finished epoch is in a checkpoint
            stopped = True
            if main:
                why = stop_reason(exc)
                for cell_dir in dirs:
                    _log_quietly(cell_dir, f"stopped{f' {why}' if why else ''}; a new run "
                                           "resumes from checkpoint.pt")
            raise
        # failed cells are recorded and the grid goes on
        rows = [_row_for(c, None, exc, accelerator.num_processes, teacher_top1) for c in cells]
    finally:
        runs.finish(stopped, [i for i, r in enumerate(rows) if r["status"] not in ("ok", "n/a")]
                    if not stopped else ())
    if main:
        for row, cell_dir in zip(rows, dirs, strict=True):
            _log_quietly(cell_dir, f"end status={row['status']} {row.get('error', '')}".rstrip())
    return rows


def _train_built(cells: list[Cell], built: dict[int, Method], dirs: list[Path],
                 accelerator: Accelerator, data: DataBundle, teacher: torch.nn.Module | None,
                 compile: bool, runs: CellRuns | None = None,
                 fuse: bool = False) -> dict[int, TrainResult]:
    """Train the ``built`` methods' students as one cohort, logging into the cells' tracker
    ``runs``, fused where ``fuse`` and it pays; their results by cell index."""
    if not built:
        return {}
    cell = cells[0]
    label = f"{cell.dataset.label} {cell.teacher.label}->{cell.student.label} seed {cell.seed}"
    epochs = [total_epochs(m, cell.recipe.epochs) for m in built.values()]
    clock = EpochClock()
    hooks = [clock, *standard_hooks(accelerator, label, max(epochs),
                                    tracking=runs.hook(list(built)) if runs else None)]
    if accelerator.is_main_process:
        hooks.append(EpochLines(label, [cells[i].method for i in built], epochs, clock, say))
    main = accelerator.is_main_process
    fused = fuse and choose_fusion(cell, data, len(built), accelerator, dirs[0].parent.parent,
                                   say if main else _silent)
    trained = train_cohort(data, cell.student, list(built.values()), cell.recipe, cell.seed,
                           accelerator, teacher, [dirs[i] / "checkpoint.pt" for i in built],
                           [_epoch_logger(dirs[i], n, clock) for i, n in zip(built, epochs,
                                                                              strict=True)],
                           compile, hooks, fused,
                           _cohort_log([dirs[i] for i in built]) if main else _silent)
    grid = active()
    if grid is not None:  # the pace of this cohort's epochs, for the grid's time left
        grid.measured_cells(trained[0].wall_s, sum(len(r.epoch_s) for r in trained))
    return dict(zip(built, trained, strict=True))


def _cohort_log(dirs: list[Path]) -> Callable[[str], None]:
    """A log of a cohort's training: each line on stdout and in every cell's log."""
    def log(line: str) -> None:
        say(f"kt-bench: {line}")
        for cell_dir in dirs:
            _log_quietly(cell_dir, line)
    return log


def _silent(line: str) -> None:
    """A log that drops its lines (another process than the main one)."""


def cohort_key(cell: Cell) -> str:
    """Cells with equal keys differ only in method and can train as one cohort."""
    return json.dumps([cell.dataset.to_dict(), cell.teacher_config(), cell.student.to_dict(),
                       cell.seed, cell.recipe.to_dict(), cell.precision], sort_keys=True)


def cohorts(cells: list[Cell], cohort: bool = True) -> list[list[Cell]]:
    """``cells`` grouped into cohorts (cells differing only in method), or one per group."""
    return [[c for _, c in group] for group in _groups(list(enumerate(cells)), cohort)]


def _groups(pending: list[tuple[int, Cell]], cohort: bool) -> list[list[tuple[int, Cell]]]:
    if not cohort:
        return [[item] for item in pending]
    groups: dict[str, list[tuple[int, Cell]]] = {}
    for item in pending:
        groups.setdefault(cohort_key(item[1]), []).append(item)
    return list(groups.values())


def run_cells(cells: list[Cell], out: Path, accelerator: Accelerator, teacher_cache: Path,
              data_root: str | None = None,
              on_row: Callable[[int, dict[str, Any]], None] | None = None,
              poll_s: float = 2.0, cohort: bool = True,
              compile: bool = False, trackers: tuple[str, ...] = (),
              fuse: bool = True) -> list[dict[str, Any]]:
    """Run every cell not finished yet; return the rows of ``cells`` (old and new) in order.

    A cell whose row exists with status ok or diverged is skipped; a failed cell is run again.
    A row that cannot be written to its ``result.json`` is passed to ``on_row`` as a failed
    row naming the file and the reason, and then :class:`RowsNotKept` stops the grid.
    With ``cohort``, cells that differ only in method train together (one teacher pass per
    batch for all of them). Each cell is locked while it runs: a cell another runner holds
    is left for later and waited for, so runners sharing ``out`` run every cell once.
    ``compile``, ``trackers`` and ``fuse``: see :func:`run_group`.

    The main process prints the grid's progress on stdout (see
    :class:`~kt_bench.sweep.progress.GridProgress`): at the start and after each cohort it
    ran, a line of the cells done, failed and left and the time left; each epoch of a
    cohort or a teacher, a line of its own.
    """
    datasets: dict[str, DataBundle] = {}
    rows: dict[int, dict[str, Any]] = {}
    grid = (GridProgress(cells, out, lambda c: (None if c.teacher_is_pretrained
                                                else teacher_path(teacher_cache, c)), say)
            if accelerator.is_main_process else None)

    def record(i: int, row: dict[str, Any]) -> None:
        rows[i] = row
        if grid is not None:
            grid.finished(i, row)
        if on_row:
            on_row(i, row)

    with grid.tracking() if grid is not None else contextlib.nullcontext():
        if grid is not None:
            grid.say()
        pending = list(enumerate(cells))
        while pending:
            deferred = []
            for group in _groups(pending, cohort):
                mine, done, later, locks = _claim(group, out, accelerator)
                deferred += later
                for i, row in done:
                    record(i, row)
                try:
                    if mine:
                        new, problem = _run_cells_now([c for _, c in mine], out, accelerator,
                                                      teacher_cache, data_root, datasets,
                                                      compile, trackers, fuse)
                        for (i, _), row in zip(mine, new, strict=True):
                            record(i, row)
                        if problem:
                            raise RowsNotKept(f"{problem}; the grid stopped here, as its rows "
                                              "cannot be kept: rerun the same command once "
                                              "that is fixed")
                        if grid is not None:
                            grid.say()
                finally:
                    for lock in locks:
                        lock.release()
            if len(deferred) == len(pending):
                time.sleep(poll_s)  # every remaining cell is running elsewhere
            pending = deferred
    return [rows[i] for i in range(len(cells))]


def _claim(group: list[tuple[int, Cell]], out: Path, accelerator: Accelerator):
    """Split ``group`` into cells to run now (locked here), finished rows, and cells another
    runner holds. With several processes the main one decides and tells the others, which
    take no locks: they train the same cells with it."""
    mine, done, later, locks = [], [], [], []
    if accelerator.is_main_process:
        for i, cell in group:
            lock = FileLock(out / "cells" / cell.cell_id / "lock")
            if finished_row(out, cell.cell_id) is None and not lock.acquire(blocking=False):
                later.append((i, cell))
                continue
            row = finished_row(out, cell.cell_id)  # checked again, now under the lock
            if row is not None:
                lock.release()
                done.append((i, row))
                continue
            mine.append((i, cell))
            locks.append(lock)
    if accelerator.num_processes > 1:
        by_index = dict(group)
        decision = [([i for i, _ in mine], done, [i for i, _ in later])]
        broadcast_object_list(decision, from_process=0)
        mine_i, done, later_i = decision[0]
        mine = [(i, by_index[i]) for i in mine_i]
        later = [(i, by_index[i]) for i in later_i]
    return mine, done, later, locks


def _run_cells_now(cells: list[Cell], out: Path, accelerator: Accelerator, teacher_cache: Path,
                   data_root: str | None, datasets: dict[str, DataBundle],
                   compile: bool, trackers: tuple[str, ...] = (),
                   fuse: bool = True) -> tuple[list[dict], str | None]:
    """Run ``cells`` (one cohort) and write their rows; a cohort that runs out of GPU memory
    is run again one cell at a time (each resuming from its checkpoint). Returns the rows and,
    if one could not be written, why (on every process)."""
    key = json.dumps(cells[0].dataset.to_dict(), sort_keys=True)
    try:
        if key not in datasets:
            datasets[key] = load_dataset(cells[0].dataset, data_root)
        CLOCK.mark("data")
    except KtBenchError as exc:
        rows = [{**_row_identity(c, accelerator.num_processes), "status": "failed",
                 "error": first_line(exc)} for c in cells]
    else:
        rows = run_group(cells, out, accelerator, teacher_cache, datasets[key], compile,
                         trackers, fuse)
        if len(cells) > 1 and any(r["status"] == "oom" for r in rows):
            torch.cuda.empty_cache()
            rows = [run_group([c], out, accelerator, teacher_cache, datasets[key], compile,
                              trackers)[0]
                    if r["status"] == "oom" else r for c, r in zip(cells, rows, strict=True)]
    problem = None
    if accelerator.is_main_process:
        rows, problem = _keep_rows(out, cells, rows)
        write_results_csv(out)
    return rows, _from_main(accelerator, problem)


def _keep_rows(out: Path, cells: list[Cell],
               rows: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], str | None]:
    """Write each row to its cell's ``result.json``. A row that cannot be written comes back
    failed, its error naming the file and the reason; the first such reason comes with them."""
    kept, problem = [], None
    for cell, row in zip(cells, rows, strict=True):
        path = result_path(out, cell.cell_id)
        try:
            with _writing(path):
                atomic.write_json(path, row)
        except KtBenchError as exc:
            reason = first_line(exc)
            _log_quietly(path.parent, f"row not kept: {reason}")
            row = {**row, "status": "failed", "error": reason}
            problem = problem or reason
        kept.append(row)
    return kept, problem
