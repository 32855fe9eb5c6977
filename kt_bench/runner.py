"""Running a grid: cells -> run directories -> one tidy result row per cell."""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list

from kt_bench import atomic
from kt_bench.cells import Cell
from kt_bench.data import load_dataset
from kt_bench.data.bundle import DataBundle
from kt_bench.engine import DivergedError, TrainResult, train_cohort
from kt_bench.errors import KtBenchError, first_line
from kt_bench.locks import FileLock
from kt_bench.method import Method, NotApplicable, build_method
from kt_bench.rows import finished_row, result_path, write_results_csv
from kt_bench.startup import CLOCK
from kt_bench.teachers import get_teacher


def _row_identity(cell: Cell, world_size: int) -> dict[str, Any]:
    return {**cell.identity(), "world_size": world_size}


def _log_line(cell_dir: Path, text: str) -> None:
    with open(cell_dir / "log.txt", "a") as fh:
        fh.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {text}\n")


def _row_for(cell: Cell, result: TrainResult | None, error: BaseException | None,
             world_size: int, teacher_top1: float | None) -> dict[str, Any]:
    row = _row_identity(cell, world_size)
    if teacher_top1 is not None:
        row["teacher_top1"] = teacher_top1
    if error is None and result is not None:
        row.update(top1=result.top1, top5=result.top5, top1_best=result.top1_best,
                   wall_s=result.wall_s, images_per_s=result.images_per_s, status="ok",
                   error="", init_epochs=sum(h.get("stage") == "init" for h in result.history),
                   **result.facts)
    elif isinstance(error, NotApplicable):  # as the published tables print N/A
        row.update(status="n/a", error=first_line(error))
    elif isinstance(error, DivergedError):
        row.update(status="diverged", error=first_line(error))
    elif isinstance(error, torch.cuda.OutOfMemoryError):
        row.update(status="oom", error=first_line(error))
    else:
        row.update(status="failed", error=first_line(error))
    return row


def run_group(cells: list[Cell], out: Path, accelerator: Accelerator, teacher_cache: Path,
              data: DataBundle, compile: bool = False) -> list[dict[str, Any]]:
    """Train cells that differ only in method together (a cohort; one cell is a solo run)
    and return their rows. Their teacher comes first, from the cache if there.

    Each cell's folder receives its resolved ``config.json``, ``metrics.jsonl`` (rewritten
    after every epoch), ``log.txt`` (a line per start, epoch and end) and its last
    ``checkpoint.pt``. ``compile`` runs the networks through ``torch.compile``.
    """
    main = accelerator.is_main_process
    dirs = [out / "cells" / c.cell_id for c in cells]
    for cell, cell_dir in zip(cells, dirs, strict=True):
        if main:
            atomic.write_json(cell_dir / "config.json", cell.config())
            resume = " (resuming from checkpoint.pt)" if (cell_dir / "checkpoint.pt").exists() \
                else ""
            cohort = f" in a cohort of {len(cells)}" if len(cells) > 1 else ""
            job = os.environ.get("SLURM_JOB_ID") or os.environ.get("SUBMITIT_LOCAL_JOB_ID")
            _log_line(cell_dir, f"start host={socket.gethostname()} pid={os.getpid()}"
                                f"{f' job={job}' if job else ''}{cohort}{resume}")

    def logger(cell_dir: Path):
        def on_epoch(history: list[dict[str, Any]]) -> None:
            lines = "".join(json.dumps(h, sort_keys=True) + "\n" for h in history)
            atomic.write_text(cell_dir / "metrics.jsonl", lines)
            last = history[-1]
            _log_line(cell_dir, f"epoch {last['epoch']}: loss {last['loss']:.4f} "
                                f"top1 {last['top1']:.2f}")
        return on_epoch

    if accelerator.log_with:  # a run of its own per cell, in <out>/tracking/<cell_id>
        config = {k: v for k, v in cells[0].identity().items() if k != "config"}
        accelerator.init_trackers(cells[0].cell_id, config=config)
    teacher_top1 = None
    try:
        teacher, t_metrics = get_teacher(cells[0], data, accelerator, teacher_cache)
        CLOCK.mark("teacher")
        teacher_top1 = t_metrics["top1"]
        built: dict[int, Method] = {}
        errors: dict[int, BaseException] = {}
        for i, c in enumerate(cells):  # a plugin that cannot be built fails its own cell only
            try:
                built[i] = build_method(c.method, c.method_config)
            except Exception as exc:  # noqa: BLE001
                errors[i] = exc
        results: dict[int, TrainResult] = {}
        if built:
            desc = (f"{cells[0].method} s{cells[0].seed}" if len(cells) == 1
                    else f"cohort of {len(built)} s{cells[0].seed}")
            trained = train_cohort(data, cells[0].student, list(built.values()),
                                   cells[0].recipe, cells[0].seed, accelerator, teacher,
                                   [dirs[i] / "checkpoint.pt" for i in built], desc,
                                   [logger(dirs[i]) for i in built], compile)
            results = dict(zip(built, trained, strict=True))
        rows = [_row_for(c, results.get(i), results[i].error if i in results else errors[i],
                         accelerator.num_processes, teacher_top1)
                for i, c in enumerate(cells)]
    except (KeyboardInterrupt, SystemExit):  # stopped (e.g. a preempted job): resumable
        if main:
            for cell_dir in dirs:
                _log_line(cell_dir, "stopped; a new run resumes from checkpoint.pt")
        raise
    except Exception as exc:  # noqa: BLE001 - failed cells are recorded and the grid goes on
        rows = [_row_for(c, None, exc, accelerator.num_processes, teacher_top1) for c in cells]
    finally:
        # finish this cell's trackers (end_training would also end a distributed run)
        for tracker in accelerator.trackers:
            tracker.finish()
        accelerator.trackers.clear()
    if main:
        for row, cell_dir in zip(rows, dirs, strict=True):
            _log_line(cell_dir, f"end status={row['status']} {row.get('error', '')}".rstrip())
    return rows


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
              compile: bool = False) -> list[dict[str, Any]]:
    """Run every cell not finished yet; return the rows of ``cells`` (old and new) in order.

    A cell whose row exists with status ok or diverged is skipped; a failed cell is run again.
    With ``cohort``, cells that differ only in method train together (one teacher pass per
    batch for all of them); tracking (``--log-with``) runs cells one at a time. Each cell is
    locked while it runs: a cell another runner holds is left for later and waited for, so
    runners sharing ``out`` run every cell once. ``compile``: see :func:`run_group`.
    """
    cohort = cohort and not accelerator.log_with
    datasets: dict[str, DataBundle] = {}
    rows: dict[int, dict[str, Any]] = {}

    def record(i: int, row: dict[str, Any]) -> None:
        rows[i] = row
        if on_row:
            on_row(i, row)

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
                    new = _run_cells_now([c for _, c in mine], out, accelerator, teacher_cache,
                                         data_root, datasets, compile)
                    for (i, _), row in zip(mine, new, strict=True):
                        record(i, row)
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
                   compile: bool) -> list[dict]:
    """Run ``cells`` (one cohort) and write their rows; a cohort that runs out of GPU memory
    is run again one cell at a time (each resuming from its checkpoint)."""
    key = json.dumps(cells[0].dataset.to_dict(), sort_keys=True)
    try:
        if key not in datasets:
            datasets[key] = load_dataset(cells[0].dataset, data_root)
        CLOCK.mark("data")
    except KtBenchError as exc:
        rows = [{**_row_identity(c, accelerator.num_processes), "status": "failed",
                 "error": first_line(exc)} for c in cells]
    else:
        rows = run_group(cells, out, accelerator, teacher_cache, datasets[key], compile)
        if len(cells) > 1 and any(r["status"] == "oom" for r in rows):
            torch.cuda.empty_cache()
            rows = [run_group([c], out, accelerator, teacher_cache, datasets[key], compile)[0]
                    if r["status"] == "oom" else r for c, r in zip(cells, rows, strict=True)]
    if accelerator.is_main_process:
        for cell, row in zip(cells, rows, strict=True):
            atomic.write_json(result_path(out, cell.cell_id), row)
        write_results_csv(out)
    return rows
