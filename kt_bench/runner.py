"""Running a grid: cells -> run directories -> one tidy result row per cell."""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from accelerate import Accelerator

from kt_bench import atomic
from kt_bench.cells import Cell
from kt_bench.data import load_dataset
from kt_bench.data.bundle import DataBundle
from kt_bench.engine import DivergedError, train
from kt_bench.errors import KtBenchError
from kt_bench.locks import FileLock
from kt_bench.method import build_method
from kt_bench.teachers import get_teacher

RESULT_COLUMNS = [
    "grid", "dataset", "teacher", "student", "method", "seed", "epochs", "top1", "top5",
    "top1_best", "teacher_top1", "wall_s", "images_per_s", "world_size", "status", "error",
    "cell_id",
]
#: Statuses of cells that are finished and never run again (failed and oom cells are retried).
DONE_STATUSES = ("ok", "diverged")


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    msg = text[0] if text else ""
    return msg if isinstance(exc, KtBenchError) else f"{type(exc).__name__}: {msg}"


def base_row(cell: Cell, world_size: int) -> dict[str, Any]:
    """The identifying columns of ``cell``'s row."""
    return {"grid": cell.grid, "dataset": cell.dataset.label, "teacher": cell.teacher.label,
            "student": cell.student.label, "method": cell.method, "seed": cell.seed,
            "epochs": cell.recipe.epochs, "world_size": world_size, "cell_id": cell.cell_id,
            "options": json.dumps(cell.method_config, sort_keys=True), **dict(cell.params)}


def _log_line(cell_dir: Path, text: str) -> None:
    with open(cell_dir / "log.txt", "a") as fh:
        fh.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {text}\n")


def _tracker_config(cell: Cell) -> dict[str, Any]:
    return {"method": cell.method, "seed": cell.seed, "dataset": cell.dataset.label,
            "teacher": cell.teacher.label, "student": cell.student.label,
            "epochs": cell.recipe.epochs, "lr": cell.recipe.lr, **dict(cell.params)}


def run_cell(cell: Cell, out: Path, accelerator: Accelerator, teacher_cache: Path,
             data: DataBundle) -> dict[str, Any]:
    """Train one cell (its teacher first, from the cache if there) and return its row.

    The cell's folder receives its resolved ``config.json``, ``metrics.jsonl`` and
    ``log.txt`` (both rewritten after every epoch) and its last ``checkpoint.pt``.
    """
    cell_dir = out / "cells" / cell.cell_id
    main = accelerator.is_main_process
    if main:
        atomic.write_json(cell_dir / "config.json", cell.config())
        resume = " (resuming from checkpoint.pt)" if (cell_dir / "checkpoint.pt").exists() else ""
        _log_line(cell_dir, f"start host={socket.gethostname()} pid={os.getpid()}{resume}")
    row = base_row(cell, accelerator.num_processes)

    def on_epoch(history: list[dict[str, Any]]) -> None:
        lines = "".join(json.dumps(h, sort_keys=True) + "\n" for h in history)
        atomic.write_text(cell_dir / "metrics.jsonl", lines)
        last = history[-1]
        _log_line(cell_dir, f"epoch {last['epoch']}: loss {last['loss']:.4f} "
                            f"top1 {last['top1']:.2f}")

    if accelerator.log_with:  # a run of its own per cell, in <out>/tracking/<cell_id>
        accelerator.init_trackers(cell.cell_id, config=_tracker_config(cell))
    try:
        teacher, t_metrics = get_teacher(cell, data, accelerator, teacher_cache)
        row["teacher_top1"] = t_metrics["top1"]
        method = build_method(cell.method, cell.method_config)
        result = train(data, cell.student, method, cell.recipe, cell.seed, accelerator,
                       teacher=teacher, checkpoint=cell_dir / "checkpoint.pt",
                       desc=f"{cell.method} s{cell.seed}", on_epoch=on_epoch)
        row.update(top1=result.top1, top5=result.top5, top1_best=result.top1_best,
                   wall_s=result.wall_s, images_per_s=result.images_per_s, status="ok", error="")
    except DivergedError as exc:
        row.update(status="diverged", error=_one_line(exc))
    except torch.cuda.OutOfMemoryError as exc:
        row.update(status="oom", error=_one_line(exc))
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception as exc:  # noqa: BLE001 - a failed cell is recorded and the grid goes on
        row.update(status="failed", error=_one_line(exc))
    finally:
        # finish this cell's trackers (end_training would also end a distributed run)
        for tracker in accelerator.trackers:
            tracker.finish()
        accelerator.trackers.clear()
    if main:
        _log_line(cell_dir, f"end status={row['status']} {row.get('error', '')}".rstrip())
    return row


def read_rows(out: Path) -> pd.DataFrame:
    """All result rows under ``out/cells`` as a DataFrame with the result columns first."""
    rows = [json.loads(p.read_text()) for p in sorted((out / "cells").glob("*/result.json"))]
    df = pd.DataFrame(rows)
    for col in RESULT_COLUMNS:
        if col not in df:
            df[col] = pd.NA
    extra = [c for c in df.columns if c not in RESULT_COLUMNS]
    return df[RESULT_COLUMNS + extra]


def write_results_csv(out: Path) -> pd.DataFrame:
    """Rebuild ``out/results.csv`` atomically from the cells' rows; return the rows.

    Rebuilds are serialised by a lock, so the last one always sees every finished row.
    """
    with FileLock(out / ".results.lock"):
        df = read_rows(out)
        atomic.write_text(out / "results.csv", df.to_csv(index=False))
    return df


def finished_row(out: Path, cell: Cell) -> dict[str, Any] | None:
    """The cell's row if it finished (status ok or diverged), else None."""
    path = out / "cells" / cell.cell_id / "result.json"
    if path.exists():
        row = json.loads(path.read_text())
        if row.get("status") in DONE_STATUSES:
            return row
    return None


def run_cells(cells: list[Cell], out: Path, accelerator: Accelerator, teacher_cache: Path,
              data_root: str | None = None,
              on_row: Callable[[int, dict[str, Any]], None] | None = None,
              poll_s: float = 2.0) -> list[dict[str, Any]]:
    """Run every cell not finished yet; return the rows of ``cells`` (old and new) in order.

    A cell whose row exists with status ok or diverged is skipped; a failed cell is run again.
    Each cell is locked while it runs: a cell another runner holds is left for later and
    waited for, so runners sharing ``out`` run every cell once.
    """
    datasets: dict[str, DataBundle] = {}
    rows: dict[int, dict[str, Any]] = {}
    pending = list(enumerate(cells))
    while pending:
        deferred = []
        for i, cell in pending:
            lock = FileLock(out / "cells" / cell.cell_id / "lock")
            if finished_row(out, cell) is None and not lock.acquire(blocking=False):
                deferred.append((i, cell))
                continue
            try:
                row = finished_row(out, cell) or _run_one(cell, out, accelerator,
                                                          teacher_cache, data_root, datasets)
            finally:
                lock.release()
            rows[i] = row
            if on_row:
                on_row(i, row)
        if len(deferred) == len(pending):
            time.sleep(poll_s)  # every remaining cell is running elsewhere
        pending = deferred
    return [rows[i] for i in range(len(cells))]


def _run_one(cell: Cell, out: Path, accelerator: Accelerator, teacher_cache: Path,
             data_root: str | None, datasets: dict[str, DataBundle]) -> dict[str, Any]:
    key = json.dumps(cell.dataset.to_dict(), sort_keys=True)
    try:
        if key not in datasets:
            datasets[key] = load_dataset(cell.dataset, data_root)
    except KtBenchError as exc:
        row = {**base_row(cell, accelerator.num_processes), "status": "failed",
               "error": _one_line(exc)}
    else:
        row = run_cell(cell, out, accelerator, teacher_cache, datasets[key])
    if accelerator.is_main_process:
        atomic.write_json(out / "cells" / cell.cell_id / "result.json", row)
        write_results_csv(out)
    return row
