"""``kt-bench status DIR``: where each cell of a run folder stands, and the teachers being
trained for it, read from the files the runners write (no scheduler is asked, so it works for
plain, local and Slurm runs alike)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from kt_bench.core import atomic
from kt_bench.core.durations import format_duration
from kt_bench.core.errors import KtBenchError, UnreadableFileError
from kt_bench.core.locks import holder
from kt_bench.sweep.manifest import MANIFEST, read_manifest
from kt_bench.sweep.progress import (
    CELL_PROGRESS,
    epochs_done,
    eta_now,
    read_progress,
    teacher_markers,
)
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


def _holder(lock: Path) -> str | None:
    """Who holds ``lock``; None also when it cannot be looked at (not ours to open)."""
    try:
        return holder(lock)
    except (OSError, UnreadableFileError):
        return None


def _since(who: str) -> float:
    """When the holder ``who`` ("host pid time") took its lock; 0 where it does not say."""
    try:
        return float(who.rsplit(" ", 1)[1])
    except (IndexError, ValueError):
        return 0.0


def _progress_words(record: dict[str, Any]) -> str:
    """``epoch 3/12, ETA 2m10s`` from a progress file; ``starting`` before its first epoch."""
    if record.get("epoch") is None:
        return f"starting ({record['epochs']} epochs)"
    eta = eta_now(record)
    return (f"epoch {record['epoch']}/{record['epochs']}"
            + (f", ETA {format_duration(eta)}" if eta is not None else ""))


def teacher_states(out: Path) -> list[dict[str, Any]]:
    """The teachers announced as training for run folder ``out``: each one's names, its
    progress file, and its state: ``training`` while a runner holds its lock, else
    ``stopped`` (its runner was killed: the next run resumes it from its checkpoint)."""
    states = []
    for record in teacher_markers(out):
        lock = record.get("lock")
        try:
            held = isinstance(lock, str) and holder(lock) is not None
        except UnreadableFileError:  # another user's runner: take its word
            held = True
        except OSError:
            held = False
        states.append({**record, "state": "training" if held else "stopped"})
    return states


def _running_note(cell_dir: Path, who: str, info: dict[str, Any],
                  teachers: Sequence[dict[str, Any]]) -> str:
    """What a running cell is doing: its epoch and time left (from its progress file, when
    this run wrote it), else waiting for a teacher that trains for it, else starting."""
    record = read_progress(cell_dir / CELL_PROGRESS)
    if record is not None and record["updated"] >= _since(who) - 1:
        return _progress_words(record)
    for t in teachers:
        if t["state"] == "training" and (t.get("dataset"), t.get("teacher")) == (
                info.get("dataset"), info.get("teacher")):
            return "waiting for its teacher"
    return "starting"


def _row_state(path: Path) -> tuple[dict[str, Any] | None, str]:
    """The row in ``path`` and, where there is none to show, why: "" (no file), "damaged"
    or "unreadable"."""
    try:
        return load_row(path), ""
    except DamagedRowError:
        return None, "damaged"
    except UnreadableFileError:
        return None, UNREADABLE


def cell_states(out: Path, teachers: Sequence[dict[str, Any]] | None = None) -> pd.DataFrame:
    """One row per cell of ``out``: its identity, state (a row's status, or running,
    interrupted, pending), epochs done and, while running, who runs it and how far it is
    (``progress``: its epoch and time left, waiting for its teacher, or starting).
    ``teachers``: :func:`teacher_states` of ``out``, if read already."""
    then = "shown from the cells' config.json files"
    known = read_manifest(out, then, then) or {}
    for cfg_path in sorted((out / "cells").glob("*/config.json")):
        if cfg_path.parent.name not in known:
            known[cfg_path.parent.name] = _identity_from_config(cfg_path.parent)
    if not known:
        raise KtBenchError(f"{out} holds no cells (no {MANIFEST}, no cells/*/config.json); "
                           "give a run's --out folder")
    teachers = teacher_states(out) if teachers is None else teachers
    rows = []
    for cell_id, info in known.items():
        cell_dir = out / "cells" / cell_id
        row = dict(info)
        row["done"] = epochs_done(cell_dir)
        who = _holder(cell_dir / "lock")
        result, trouble = _row_state(cell_dir / "result.json")
        checkpoint = cell_dir / "checkpoint.pt"
        if who is not None:
            row.update(state=RUNNING, where=who.rsplit(" ", 1)[0],
                       progress=_running_note(cell_dir, who, info, teachers))
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


def format_teacher(state: dict[str, Any]) -> str:
    """A line of a teacher of :func:`teacher_states`: ``teacher resnet20 on digits, seed 0:
    training on host 1234, epoch 12/30, ETA 2m``."""
    name = (f"teacher {state.get('teacher', '?')} on {state.get('dataset', '?')}, "
            f"seed {state.get('seed', '?')}")
    if state["state"] == "training":
        return f"{name}: training on {state.get('where', '?')}, {_progress_words(state)}"
    done = state.get("epoch") or 0
    return (f"{name}: stopped at epoch {done}/{state['epochs']} (its runner is gone; a run "
            "resumes it from its checkpoint)")


def format_status(states: pd.DataFrame, teachers: Sequence[dict[str, Any]] = ()) -> str:
    """The table of :func:`cell_states`, a count per state, and a line per teacher of
    :func:`teacher_states` (``teachers``)."""
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
            notes.append(f"on {r['where']}, {r['progress']}")
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
    lines = [tabulate(table.values.tolist(), headers=list(table.columns), tablefmt="simple",
                      disable_numparse=True), f"{len(states)} cells: {summary}"]
    return "\n".join(lines + [format_teacher(t) for t in teachers])
