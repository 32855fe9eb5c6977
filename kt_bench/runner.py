"""Running a grid: cells -> run directories -> one tidy result row per cell."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd
from accelerate import Accelerator

from kt_bench import atomic
from kt_bench.cells import Cell
from kt_bench.data import load_dataset
from kt_bench.data.bundle import DataBundle
from kt_bench.engine import DivergedError, train
from kt_bench.errors import KtBenchError
from kt_bench.method import build_method
from kt_bench.teachers import get_teacher

RESULT_COLUMNS = [
    "grid", "dataset", "teacher", "student", "method", "seed", "epochs", "top1", "top5",
    "top1_best", "teacher_top1", "wall_s", "images_per_s", "world_size", "status", "error",
    "cell_id",
]
#: Statuses of cells that are finished and never run again.
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
            "options": json.dumps(cell.method_config, sort_keys=True)}


def run_cell(cell: Cell, out: Path, accelerator: Accelerator, teacher_cache: Path,
             data: DataBundle) -> dict[str, Any]:
    """Train one cell (its teacher first, from the cache if there) and return its row."""
    cell_dir = out / "cells" / cell.cell_id
    if accelerator.is_main_process:
        atomic.write_json(cell_dir / "config.json", cell.config())
    row = base_row(cell, accelerator.num_processes)
    try:
        teacher, t_metrics = get_teacher(cell, data, accelerator, teacher_cache)
        row["teacher_top1"] = t_metrics["top1"]
        method = build_method(cell.method, cell.method_config)
        result = train(data, cell.student, method, cell.recipe, cell.seed, accelerator,
                       teacher=teacher, checkpoint=cell_dir / "checkpoint.pt",
                       desc=f"{cell.method} s{cell.seed}")
        row.update(top1=result.top1, top5=result.top5, top1_best=result.top1_best,
                   wall_s=result.wall_s, images_per_s=result.images_per_s, status="ok", error="")
        if accelerator.is_main_process:
            lines = "".join(json.dumps(h, sort_keys=True) + "\n" for h in result.history)
            atomic.write_text(cell_dir / "metrics.jsonl", lines)
    except DivergedError as exc:
        row.update(status="diverged", error=_one_line(exc))
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception as exc:  # noqa: BLE001 - a failed cell is recorded and the grid goes on
        row.update(status="failed", error=_one_line(exc))
    return row


def read_rows(out: Path) -> pd.DataFrame:
    """All result rows under ``out/cells`` as a DataFrame with the result columns."""
    rows = [json.loads(p.read_text()) for p in sorted((out / "cells").glob("*/result.json"))]
    df = pd.DataFrame(rows)
    for col in RESULT_COLUMNS:
        if col not in df:
            df[col] = pd.NA
    extra = [c for c in df.columns if c not in RESULT_COLUMNS]
    return df[RESULT_COLUMNS + extra]


def write_results_csv(out: Path) -> pd.DataFrame:
    """Rebuild ``out/results.csv`` atomically from the cells' rows; return the rows."""
    df = read_rows(out)
    atomic.write_text(out / "results.csv", df.to_csv(index=False))
    return df


def run_cells(cells: list[Cell], out: Path, accelerator: Accelerator, teacher_cache: Path,
              data_root: str | None = None,
              on_row: Callable[[int, dict[str, Any]], None] | None = None) -> list[dict[str, Any]]:
    """Run every cell not finished yet; return the rows of ``cells`` (old and new) in order.

    A cell whose row exists with status ok or diverged is skipped; a failed cell is run again.
    """
    datasets: dict[str, DataBundle] = {}
    rows = []
    for i, cell in enumerate(cells):
        result_file = out / "cells" / cell.cell_id / "result.json"
        if result_file.exists():
            row = json.loads(result_file.read_text())
            if row.get("status") in DONE_STATUSES:
                rows.append(row)
                if on_row:
                    on_row(i, row)
                continue
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
            atomic.write_json(result_file, row)
            write_results_csv(out)
        rows.append(row)
        if on_row:
            on_row(i, row)
    return rows
