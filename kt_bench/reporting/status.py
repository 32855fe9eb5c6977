"""``kt-bench status DIR``: where each cell of a run folder stands, read from the files the
runners write (no scheduler is asked, so it works for plain, local and Slurm runs alike)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from kt_bench.core import atomic
from kt_bench.core.errors import KtBenchError, UnreadableFileError
from kt_bench.core.locks import holder
from kt_bench.sweep.manifest import MANIFEST, read_manifest
from kt_bench.sweep.rows import DamagedRowError, load_row

#: A cell's state when it has no row yet.
RUNNING, INTERRUPTED, PENDING = "running", "interrupted", "pending"
#: A cell whose row this process may not read (another user's): left to its owner.
UNREADABLE = "unreadable"


def _identity_from_config(cell_dir: Path) -> dict[str, Any]:
    """What a cell's ``config.json`` says of it; its id alone when that file is damaged."""
    try:
        cfg = atomic.read_json(cell_dir / "config.json")
    except UnreadableFileError:  # the cell is shown by its id
        cfg = None
    info: dict[str, Any] = {"cell_id": cell_dir.name}
    if isinstance(cfg, dict):
        recipe = cfg.get("recipe")
        info.update(method=cfg.get("method"), seed=cfg.get("seed"),
                    epochs=recipe.get("epochs") if isinstance(recipe, dict) else None)
    return info


def _epochs_done(cell_dir: Path) -> int:
    """The lines of the cell's ``metrics.jsonl`` (one per epoch); 0 when it cannot be read."""
    try:
        return len((cell_dir / "metrics.jsonl").read_bytes().splitlines())
    except OSError:  # missing, a folder, or not ours to read
        return 0


def _holder(lock: Path) -> str | None:
    """Who holds ``lock``; None also when it cannot be looked at (not ours to open)."""
    try:
        return holder(lock)
    except OSError:
        return None


def _row_state(path: Path) -> tuple[dict[str, Any] | None, str]:
    """The row in ``path`` and, where there is none to show, why: "" (no file), "damaged"
    or "unreadable"."""
    try:
        return load_row(path), ""
    except DamagedRowError:
        return None, "damaged"
    except UnreadableFileError:
        return None, UNREADABLE


def cell_states(out: Path) -> pd.DataFrame:
    """One row per cell of ``out``: its identity, state (a row's status, or running,
    interrupted, pending), epochs done and, while running, who runs it."""
    then = "shown from the cells' config.json files"
    known = read_manifest(out, then, then) or {}
    for cfg_path in sorted((out / "cells").glob("*/config.json")):
        if cfg_path.parent.name not in known:
            known[cfg_path.parent.name] = _identity_from_config(cfg_path.parent)
    if not known:
        raise KtBenchError(f"{out} holds no cells (no {MANIFEST}, no cells/*/config.json); "
                           "give a run's --out folder")
    rows = []
    for cell_id, info in known.items():
        cell_dir = out / "cells" / cell_id
        row = dict(info)
        row["done"] = _epochs_done(cell_dir)
        who = _holder(cell_dir / "lock")
        result, trouble = _row_state(cell_dir / "result.json")
        checkpoint = cell_dir / "checkpoint.pt"
        if who is not None:
            row.update(state=RUNNING, where=who.rsplit(" ", 1)[0])
        elif trouble == UNREADABLE:
            row.update(state=UNREADABLE, error="result.json cannot be read; left to its owner")
        elif result is not None:
            row.update(state=result["status"], error=result.get("error", ""),
                       top1=result.get("top1"))
        elif checkpoint.exists() or atomic.previous_path(checkpoint).exists():
            row["state"] = INTERRUPTED
        else:
            row["state"] = PENDING
        if trouble == "damaged":
            row["error"] = "result.json is damaged; a run redoes the cell"
        rows.append(row)
    return pd.DataFrame(rows)


def _shown(value: Any) -> str:
    """``value`` in the status table: blank when missing (a cell known only by its id), whole
    numbers without a decimal point (a column with a blank turns to floats)."""
    if pd.api.types.is_scalar(value) and pd.isna(value):
        return ""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def format_status(states: pd.DataFrame) -> str:
    """The table of :func:`cell_states` and a count per state."""
    from tabulate import tabulate

    cols = [c for c in ("cell_id", "dataset", "teacher", "student", "method", "seed", "state")
            if c in states]
    table = states[cols].astype(object).map(_shown)
    epochs = states["epochs"] if "epochs" in states else [None] * len(states)
    table["epochs"] = [f"{d}/{_shown(e) or '?'}" for d, e in zip(states["done"], epochs,
                                                                  strict=True)]
    notes = []
    for r in states.to_dict("records"):
        if r["state"] == RUNNING:
            notes.append(f"on {r['where']}")
        elif isinstance(r.get("error"), str) and r["error"]:
            notes.append(r["error"][:60])
        elif r["state"] == INTERRUPTED:
            notes.append("resumes from its checkpoint")
        else:
            notes.append("")
    table["note"] = notes
    counts = states["state"].value_counts()
    order = ["ok", "diverged", "failed", "oom", RUNNING, INTERRUPTED, PENDING, UNREADABLE]
    order += sorted(set(counts.index) - set(order))
    summary = ", ".join(f"{counts[s]} {s}" for s in order if s in counts)
    return (tabulate(table.values.tolist(), headers=list(table.columns), tablefmt="simple",
                     disable_numparse=True) + f"\n{len(states)} cells: {summary}")
