"""Downstream evaluations of trained cells (``<out>/downstream.csv``) as columns of the result rows.

``downstream.csv`` holds one line per (cell, unit, metric): :data:`DOWNSTREAM_COLUMNS`. The
ok lines become columns of the results rows, joined by ``cell_id``, named by one rule:

* ``"<unit> <metric>"`` (one space), e.g. ``probe-stl10 top1``: the metric's value for each
  cell, NaN where the cell has no ok line for it (none asked, not run yet, or failed);
* ``"<unit> dataset"``: the label of the dataset the unit evaluated that cell on (how
  published figures are matched), so ``dataset`` is never a metric's name.

Unit and metric names are names as grids spell them (letters, digits, ``.``, ``_``, ``-``),
without spaces, so the space tells these columns apart from every other column of a row:
result fields and swept ``member.option`` values never hold one.
"""

from __future__ import annotations

import io
import math
import os
import re
from pathlib import Path

import pandas as pd

from kt_bench.core import atomic
from kt_bench.core.errors import first_line
from kt_bench.sweep.rows import DOWNSTREAM_COLUMNS, DOWNSTREAM_CSV, UNIT_NAME, warn_once

#: The second word of a unit's dataset column (``"<unit> dataset"``).
DATASET_WORD = "dataset"
_NAME = UNIT_NAME
_COLUMN = re.compile(rf"({_NAME}) ({_NAME})")
_NUMBERS = ("value", "wall_s")


def metric_column(unit: str, metric: str) -> str:
    """The row column holding ``metric`` of downstream unit ``unit`` (``probe-stl10 top1``)."""
    return f"{unit} {metric}"


def dataset_column(unit: str) -> str:
    """The row column holding the label of the dataset unit ``unit`` evaluated a cell on."""
    return f"{unit} {DATASET_WORD}"


def split_column(column: str) -> tuple[str, str] | None:
    """(unit, metric) of a downstream metric column; None for any other column."""
    match = _COLUMN.fullmatch(str(column))
    if match is None or match.group(2) == DATASET_WORD:
        return None
    return match.group(1), match.group(2)


def metric_columns(columns) -> list[str]:
    """The downstream metric columns among ``columns``, in their order."""
    return [c for c in columns if split_column(c) is not None]


def empty_downstream() -> pd.DataFrame:
    """A downstream frame without lines."""
    return pd.DataFrame(columns=DOWNSTREAM_COLUMNS)


def _problem(frame: pd.DataFrame) -> str | None:
    """What makes ``frame`` no downstream file a run writes; None if nothing."""
    missing = [c for c in DOWNSTREAM_COLUMNS if c not in frame]
    if missing:
        return f"no column {', '.join(missing)}"
    ok = frame[frame["status"] == "ok"]
    for key in ("cell_id", "unit", "metric"):
        names = ok[key].dropna().astype(str)
        if len(names) < len(ok) or not names.map(lambda s: bool(re.fullmatch(_NAME, s))).all():
            return f"an ok line whose {key} is not a name"
    values = pd.to_numeric(ok["value"], errors="coerce")
    if not values.map(math.isfinite).all():
        return "an ok line whose value is not a finite number"
    if ok.duplicated(["cell_id", "unit", "metric"]).any():
        return "two ok lines for the same cell, unit and metric"
    return None


def read_downstream(out: Path) -> pd.DataFrame:
    """The downstream lines of run folder ``out`` (:data:`DOWNSTREAM_COLUMNS` first; ``value``
    and ``wall_s`` numbers, the rest text); no lines where there is no ``downstream.csv``. A
    file that is damaged or that this user may not read is left out whole, with a one-line
    warning on stderr naming it."""
    path = Path(out) / DOWNSTREAM_CSV
    if not os.path.lexists(path):
        return empty_downstream()
    try:
        text = path.read_text(encoding="utf-8")
    except PermissionError:
        warn_once(f"{atomic.unreadable(path)}; its downstream results are left out")
        return empty_downstream()
    except (OSError, ValueError) as exc:  # ValueError: bad UTF-8
        return _damaged(path, first_line(exc))
    try:
        frame = pd.read_csv(io.StringIO(text), dtype=str)
    except ValueError as exc:  # pandas' parser and empty-file errors are ValueErrors
        return _damaged(path, first_line(exc))
    problem = _problem(frame)
    if problem:
        return _damaged(path, problem)
    for key in _NUMBERS:
        frame[key] = pd.to_numeric(frame[key], errors="coerce")
    extra = [c for c in frame.columns if c not in DOWNSTREAM_COLUMNS]
    return frame[DOWNSTREAM_COLUMNS + extra]


def _damaged(path: Path, why: str) -> pd.DataFrame:
    warn_once(f"{path} is damaged ({why}); its downstream results are left out")
    return empty_downstream()


def _by_cell(lines: pd.DataFrame, column: str) -> pd.Series:
    """``lines``' ``column`` by ``cell_id`` (a cell's last line where it has several)."""
    return lines.drop_duplicates("cell_id", keep="last").set_index("cell_id")[column]


def downstream_columns(rows: pd.DataFrame, downstream: pd.DataFrame) -> pd.DataFrame:
    """``rows`` (results rows with ``cell_id``) with one column per (unit, metric) of the ok
    lines of ``downstream`` (:func:`metric_column`: the cell's value, NaN where it has none)
    and one per unit after its metrics (:func:`dataset_column`: the dataset's label), joined
    by ``cell_id``, in the order the lines first name them. Failed lines are left out.
    Columns of these names that ``rows`` already has are replaced, so joining twice is
    joining once."""
    ok = downstream[downstream["status"] == "ok"]
    if ok.empty or "cell_id" not in rows:
        return rows.copy()
    ok = ok.astype({"cell_id": str, "unit": str, "metric": str})
    columns: dict[str, pd.Series] = {}
    for unit, lines in ok.groupby("unit", sort=False):
        for metric, metric_lines in lines.groupby("metric", sort=False):
            values = pd.to_numeric(_by_cell(metric_lines, "value"), errors="coerce")
            columns[metric_column(unit, metric)] = values.astype(float)
        columns[dataset_column(unit)] = _by_cell(lines, "dataset")
    joined = rows.drop(columns=[c for c in columns if c in rows])
    keyed = joined["cell_id"].astype(str)
    for name, by_cell in columns.items():
        joined[name] = keyed.map(by_cell).to_numpy()
    return joined


def with_downstream(rows: pd.DataFrame, out: Path) -> pd.DataFrame:
    """``rows`` of run folder ``out`` with its downstream columns (:func:`downstream_columns`
    of :func:`read_downstream`); ``rows`` as they are where ``out`` has none."""
    return downstream_columns(rows, read_downstream(out))
