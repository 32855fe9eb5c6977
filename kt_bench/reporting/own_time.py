"""Each student's own training time, for the cost figure. A cell trained alone owns its
``wall_s``. Students trained together in a cohort share one pass over the data, and each of
their rows holds the cohort's whole wall time: such a time is shared out among the cohort's
members in proportion to each one's measured step time (the row column :data:`STEP_COLUMN`)
where every member has one, and is unknown (NaN) otherwise."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pandas as pd

#: A row's seconds spent in its own student's steps (forward, backward, update) when it
#: trained in a cohort; the share of the cohort's wall time each member is given.
STEP_COLUMN = "step_s"
#: A row's sum of the step times of every member of its cohort (a failed member's too, whose
#: steps also took part of the wall time); where absent, the ok members' sum.
COHORT_STEP_COLUMN = "cohort_step_s"
#: What the runner writes in a cell's log when it starts the cell with others.
COHORT_MARK = " in a cohort of "


def trained_in_cohort(out: Path, cell_id: str) -> bool:
    """Whether cell ``cell_id`` of run folder ``out`` last started in a cohort (its log's
    last ``start`` line says so); False where the log cannot be read."""
    path = out / "cells" / str(cell_id) / "log.txt"
    if not os.path.isfile(path):
        return False
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False
    # a log line: "<date> <time> start host=... in a cohort of 5"
    starts = [line for line in text.splitlines() if line.split(" ", 3)[2:3] == ["start"]]
    return bool(starts) and COHORT_MARK in starts[-1]


def own_seconds(out: Path, rows: pd.DataFrame) -> pd.Series:
    """Each row's own training time in seconds (index of ``rows``): ``wall_s`` for a cell
    trained alone; for a cohort member, the cohort's ``wall_s`` times its :data:`STEP_COLUMN`
    over its :data:`COHORT_STEP_COLUMN` (every member's steps, a failed one's too) or, in rows
    without it, over the sum of its ok cohort's (members: the cohort cells of one dataset,
    pair, setting and seed with the same wall time); NaN where any member lacks a step
    time."""
    result = pd.Series(math.nan, index=rows.index, dtype=float)
    ok = rows[rows["status"] == "ok"]
    if ok.empty:
        return result
    cohort = ok["cell_id"].map(lambda cid: trained_in_cohort(out, cid))
    wall = pd.to_numeric(ok["wall_s"], errors="coerce")
    result.loc[ok.index[~cohort.to_numpy()]] = wall[~cohort]
    members = ok[cohort.to_numpy()]
    if members.empty or STEP_COLUMN not in rows:
        return result
    keys = ["dataset", "teacher", "student", "setting_id", "seed", "wall_s"]
    for _, group in members.groupby(keys, sort=False, dropna=False):
        steps = pd.to_numeric(group[STEP_COLUMN], errors="coerce")
        total = (pd.to_numeric(group[COHORT_STEP_COLUMN], errors="coerce")
                 if COHORT_STEP_COLUMN in group else pd.Series(math.nan, index=group.index))
        total = total.where(total.notna() & (total > 0), steps.sum())
        if steps.notna().all() and (total > 0).all():
            result.loc[group.index] = wall[group.index] * steps / total
    return result
