"""Result rows on disk: one ``result.json`` per cell, gathered into ``results.csv``.

Reading rows needs neither torch nor the engine, so ``kt-bench report`` and ``status`` start
quickly.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd

from kt_bench import atomic
from kt_bench.locks import FileLock

RESULT_COLUMNS = [
    "grid", "dataset", "teacher", "student", "method", "seed", "epochs", "top1", "top5",
    "top1_best", "teacher_top1", "wall_s", "images_per_s", "world_size", "precision", "status",
    "error", "cell_id", "config_id", "setting_id",
]
#: Statuses of cells that are finished and never run again (failed and oom cells are retried).
DONE_STATUSES = ("ok", "diverged")


def result_path(out: Path, cell_id: str) -> Path:
    """Where the row of cell ``cell_id`` of run folder ``out`` lives."""
    return out / "cells" / cell_id / "result.json"


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


def finished_row(out: Path, cell_id: str) -> dict[str, Any] | None:
    """The row of cell ``cell_id`` if it finished (status ok or diverged), else None."""
    path = result_path(out, cell_id)
    if path.exists():
        row = json.loads(path.read_text())
        if row.get("status") in DONE_STATUSES:
            return row
    return None
