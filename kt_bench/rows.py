"""Result rows on disk: one ``result.json`` per cell, gathered into ``results.csv``.

Reading rows needs neither torch nor the engine, so ``kt-bench report`` and ``status`` start
quickly.
"""

from __future__ import annotations

import sys
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
#: Statuses of cells that are finished and never run again (failed and oom cells are retried;
#: ``n/a``: the method does not apply to the pair).
DONE_STATUSES = ("ok", "diverged", "n/a")


def result_path(out: Path, cell_id: str) -> Path:
    """Where the row of cell ``cell_id`` of run folder ``out`` lives."""
    return out / "cells" / cell_id / "result.json"


def read_row(path: Path) -> dict[str, Any] | None:
    """The row in ``path``; None when it is missing or damaged (not a JSON object with a
    status)."""
    row = atomic.read_json(path)
    return row if isinstance(row, dict) and isinstance(row.get("status"), str) else None


def read_rows(out: Path) -> pd.DataFrame:
    """All result rows under ``out/cells`` as a DataFrame with the result columns first; a
    damaged row is left out, with a warning on stderr naming its file."""
    rows = []
    for path in sorted((out / "cells").glob("*/result.json")):
        row = read_row(path)
        if row is None:
            print(f"kt-bench: warning: {path} is damaged (not a result row); left out; "
                  "a new run of the grid runs its cell again", file=sys.stderr)
        else:
            rows.append(row)
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
    """The row of cell ``cell_id`` if it finished (status ok or diverged), else None. A
    damaged row counts as none: it is moved aside (named in a warning), and the cell runs
    again."""
    path = result_path(out, cell_id)
    if not path.exists():
        return None
    row = read_row(path)
    if row is None:
        aside = atomic.move_aside(path)
        if aside is not None:
            print(f"kt-bench: warning: {path} is damaged (not a result row); kept as "
                  f"{aside.name}; the cell runs again", file=sys.stderr)
        return None
    return row if row["status"] in DONE_STATUSES else None
