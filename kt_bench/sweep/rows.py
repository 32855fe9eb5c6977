"""Result rows on disk: one ``result.json`` per cell, gathered into ``results.csv``.

Reading rows needs neither torch nor the engine, so ``kt-bench report`` and ``status`` start
quickly. A row read back is checked field by field: one that is not what a runner writes is
never used (a run moves it aside and runs its cell again; a report leaves it out).
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import Any

import pandas as pd

from kt_bench.core import atomic
from kt_bench.core.errors import KtBenchError, UnreadableFileError, UnwritableFileError
from kt_bench.core.locks import FileLock

RESULT_COLUMNS = [
    "grid", "dataset", "teacher", "student", "method", "seed", "epochs", "top1", "top5",
    "top1_best", "teacher_top1", "wall_s", "images_per_s", "world_size", "precision", "status",
    "error", "cell_id", "config_id", "setting_id",
]
#: Where a run folder gathers its downstream units' rows, one line per metric, in these
#: columns: the unit, its metric, then its cell's identity (``trained_on``: the cell's dataset).
DOWNSTREAM_CSV = "downstream.csv"
DOWNSTREAM_COLUMNS = ["cell_id", "unit", "kind", "dataset", "metric", "value", "status", "error",
                      "wall_s", "grid", "trained_on", "teacher", "student", "method", "seed",
                      "config_id", "setting_id"]
#: What a downstream evaluation's (and a metric's) name may be: a folder name without spaces.
UNIT_NAME = r"[A-Za-z0-9_][A-Za-z0-9._-]*"
#: Statuses of cells that are finished and never run again (failed and oom cells are retried;
#: ``n/a``: the method does not apply to the pair).
DONE_STATUSES = ("ok", "diverged", "n/a")
#: Every status a runner writes.
STATUSES = (*DONE_STATUSES, "failed", "oom")

#: The fields naming a cell, as :meth:`kt_bench.sweep.cells.Cell.identity` and the runner write them
#: (its swept values aside): text, JSON objects as text, and whole numbers with their least
#: value.
IDENTITY_TEXT = ("grid", "dataset", "teacher", "student", "method", "precision", "cell_id",
                 "config_id", "setting_id")
IDENTITY_JSON = ("options", "config")
IDENTITY_COUNTS = {"seed": 0, "epochs": 1, "world_size": 1}
IDENTITY_FIELDS = (*IDENTITY_TEXT, *IDENTITY_JSON, *IDENTITY_COUNTS)
#: Accuracies in percent: numbers in [0, 100] (or null) wherever present, required in an ok row.
PERCENT_FIELDS = ("top1", "top5", "top1_best", "teacher_top1")
#: Costs: numbers >= 0 (or null) wherever present, required in an ok row.
COST_FIELDS = ("wall_s", "images_per_s")
#: Costs that rows of older versions lack: numbers >= 0 (or null) wherever present.
OPTIONAL_COST_FIELDS = ("step_s", "cohort_step_s")
#: What a method transferred (:mod:`kt_bench.sweep.diagnostics`), absent where it was not
#: measured: percents in [0, 100] and numbers >= 0 (or null) wherever present.
TRANSFER_PERCENT_FIELDS = ("agreement", "ece")
TRANSFER_AMOUNT_FIELDS = ("kl_teacher", "diagnostics_s")


class DamagedRowError(KtBenchError):
    """A ``result.json`` that holds no usable row; the message says what is wrong with it."""


class StrayRowError(DamagedRowError):
    """A ``result.json`` without a cell's identity: no row of any cell."""


def result_path(out: Path, cell_id: str) -> Path:
    """Where the row of cell ``cell_id`` of run folder ``out`` lives."""
    return out / "cells" / cell_id / "result.json"


def _shown(value: Any) -> str:
    """``value`` as an error message quotes it: its repr, cut short."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_count(value: Any, least: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= least


def _is_json_object(value: Any) -> bool:
    try:
        return isinstance(value, str) and isinstance(json.loads(value), dict)
    except ValueError:
        return False


def _number_problem(row: dict[str, Any], key: str, high: float) -> str | None:
    """What is wrong with ``row[key]`` as a finite number in [0, ``high``]; None if nothing
    (or the key is absent or null)."""
    value = row.get(key)
    if value is None:
        return None
    try:
        finite = _is_number(value) and math.isfinite(value)
    except OverflowError:  # an integer too large for a float
        finite = False
    if finite and 0 <= value <= high:
        return None
    accepted = f"a number in [0, {high:g}]" if math.isfinite(high) else "a finite number >= 0"
    return f"{key} = {_shown(value)} is not {accepted}"


def _identity_problem(row: dict[str, Any], cell_id: str) -> str | None:
    """What is wrong with the identity fields of ``row`` of cell ``cell_id``."""
    for key in IDENTITY_TEXT:
        if not isinstance(row[key], str) or not row[key]:
            return f"{key} = {_shown(row[key])} is not a name"
    for key in IDENTITY_JSON:
        if not _is_json_object(row[key]):
            return f"{key} is not a JSON object in text"
    for key, least in IDENTITY_COUNTS.items():
        if not _is_count(row[key], least):
            return f"{key} = {_shown(row[key])} is not an integer >= {least}"
    if row["cell_id"] != cell_id:
        return f"cell_id {_shown(row['cell_id'])} is not its folder's"
    return None


def _outcome_problem(row: dict[str, Any]) -> str | None:
    """What is wrong with the status, error and figures of ``row``."""
    if row.get("status") not in STATUSES:
        return f"status = {_shown(row.get('status'))} is not one of {', '.join(STATUSES)}"
    if not isinstance(row.get("error"), str):
        return f"error = {_shown(row.get('error'))} is not text"
    if row["status"] == "ok":
        missing = [k for k in (*PERCENT_FIELDS, *COST_FIELDS) if row.get(k) is None]
        if missing:
            return f"an ok row without {', '.join(missing)}"
    for key in (*PERCENT_FIELDS, *TRANSFER_PERCENT_FIELDS):
        problem = _number_problem(row, key, 100)
        if problem:
            return problem
    for key in (*COST_FIELDS, *OPTIONAL_COST_FIELDS, *TRANSFER_AMOUNT_FIELDS):
        problem = _number_problem(row, key, math.inf)
        if problem:
            return problem
    return None


def check_row(row: Any, cell_id: str) -> dict[str, Any]:
    """``row`` if it is a result row of cell ``cell_id`` as a runner writes it; else a
    :class:`StrayRowError` (no cell's identity) or :class:`DamagedRowError` saying why."""
    if not isinstance(row, dict):
        raise DamagedRowError("not a JSON object" if row is not None else "not readable JSON")
    missing = [k for k in IDENTITY_FIELDS if k not in row]
    if missing:
        more = f" and {len(missing) - 3} more identity fields" if len(missing) > 3 else ""
        raise StrayRowError(f"no {', '.join(missing[:3])}{more}")
    problem = _identity_problem(row, cell_id) or _outcome_problem(row)
    if problem:
        raise DamagedRowError(problem)
    return row


def load_row(path: Path) -> dict[str, Any] | None:
    """The row in ``path`` (a cell's ``result.json``), checked by :func:`check_row`; None when
    there is no such file. A file this user may not read raises
    :class:`~kt_bench.core.errors.UnreadableFileError`."""
    if not os.path.lexists(path):
        return None
    return check_row(atomic.read_json(path), path.parent.name)


def read_row(path: Path) -> dict[str, Any] | None:
    """The row in ``path``; None when it is missing, damaged or cannot be read."""
    try:
        return load_row(path)
    except (DamagedRowError, UnreadableFileError):
        return None


#: The warnings printed by :func:`warn_once` since :func:`forget_warnings`.
_warned: set[str] = set()


def warn_once(line: str) -> None:
    """Print ``line`` as a warning on stderr once per command (a run rebuilds
    ``results.csv`` after every cell and would repeat it)."""
    if line not in _warned:
        _warned.add(line)
        print(f"kt-bench: warning: {line}", file=sys.stderr)


def forget_warnings() -> None:
    """Let :func:`warn_once` print every warning again (at the start of a command)."""
    _warned.clear()


def _left_out(path: Path, exc: DamagedRowError | UnreadableFileError) -> str:
    """Why the file ``path`` is left out of the rows, in one line."""
    if isinstance(exc, StrayRowError):
        return f"{path} is not a cell's result row ({exc}); skipped"
    if isinstance(exc, DamagedRowError):
        return (f"{path} is damaged ({exc}); left out; a new run of the grid runs its cell "
                "again")
    return f"{exc}; its row is left out"


def _plain_params(row: dict[str, Any]) -> dict[str, Any]:
    """``row`` with swept values that are lists or tables as JSON text, so tables can group
    by them."""
    return {k: json.dumps(v, sort_keys=True) if "." in k and isinstance(v, (list, dict)) else v
            for k, v in row.items()}


def read_rows(out: Path) -> pd.DataFrame:
    """All result rows under ``out/cells`` as a DataFrame with the result columns first; a
    row that is damaged, no cell's or unreadable is left out, with a warning on stderr naming
    its file."""
    rows = []
    for path in sorted((out / "cells").glob("*/result.json")):
        try:
            row = load_row(path)
        except (DamagedRowError, UnreadableFileError) as exc:
            warn_once(_left_out(path, exc))
            continue
        if row is not None:
            rows.append(_plain_params(row))
    df = pd.DataFrame(rows)
    for col in RESULT_COLUMNS:
        if col not in df:
            df[col] = pd.NA
    extra = [c for c in df.columns if c not in RESULT_COLUMNS]
    return df[RESULT_COLUMNS + extra]


def write_results_csv(out: Path) -> pd.DataFrame:
    """Rebuild ``out/results.csv`` atomically from the cells' rows; return the rows.

    Rebuilds are serialised by a lock, so the last one always sees every finished row. A
    ``results.csv`` that cannot be written (a folder of that name, a full disk) is named in a
    warning: the rows stay in the cells' files.
    """
    with FileLock(out / ".results.lock"):
        df = read_rows(out)
        try:
            atomic.write_text(out / "results.csv", df.to_csv(index=False))
        except UnwritableFileError as exc:
            warn_once(f"{exc}; the rows are in cells/*/result.json")
    return df


def unreadable_row(out: Path, cell_id: str) -> UnreadableFileError | None:
    """The error of the row of cell ``cell_id`` if this user may not read it; None for no
    row, a row, or a damaged one (which a run sets aside)."""
    try:
        load_row(result_path(out, cell_id))
    except DamagedRowError:
        return None
    except UnreadableFileError as exc:
        return exc
    return None


def finished_row(out: Path, cell_id: str) -> dict[str, Any] | None:
    """The row of cell ``cell_id`` if it finished (status ok, diverged or n/a), else None. A
    damaged row counts as none: it is moved aside (named in a warning), and the cell runs
    again. A row this user may not read raises
    :class:`~kt_bench.core.errors.UnreadableFileError`: it is left as it is."""
    path = result_path(out, cell_id)
    try:
        row = load_row(path)
    except DamagedRowError as exc:
        aside = atomic.move_aside(path)
        if aside is not None:
            print(f"kt-bench: warning: {path} is damaged ({exc}); kept as {aside.name}; the "
                  "cell runs again", file=sys.stderr)
        return None
    return row if row is not None and row["status"] in DONE_STATUSES else None
