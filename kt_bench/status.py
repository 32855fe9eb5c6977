"""``kt-bench status DIR``: where each cell of a run folder stands, read from the files the
runners write (no scheduler is asked, so it works for plain, local and Slurm runs alike)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd

from kt_bench import atomic
from kt_bench.cells import Cell
from kt_bench.errors import KtBenchError
from kt_bench.locks import FileLock, holder

MANIFEST = "manifest.json"
#: A cell's state when it has no row yet.
RUNNING, INTERRUPTED, PENDING = "running", "interrupted", "pending"


def write_manifest(out: Path, cells: list[Cell]) -> None:
    """Add ``cells`` to ``out/manifest.json`` (the cells asked for in this folder), so that
    cells not started yet show as pending."""
    with FileLock(out / ".manifest.lock"):
        path = out / MANIFEST
        known = json.loads(path.read_text()) if path.exists() else {}
        known.update({c.cell_id: c.identity() for c in cells})
        atomic.write_json(path, known)


def _epochs_done(cell_dir: Path) -> int:
    metrics = cell_dir / "metrics.jsonl"
    return len(metrics.read_text().splitlines()) if metrics.exists() else 0


def cell_states(out: Path) -> pd.DataFrame:
    """One row per cell of ``out``: its identity, state (a row's status, or running,
    interrupted, pending), epochs done and, while running, who runs it."""
    path = out / MANIFEST
    known: dict[str, dict[str, Any]] = json.loads(path.read_text()) if path.exists() else {}
    for cfg_path in sorted((out / "cells").glob("*/config.json")):
        cell_id = cfg_path.parent.name
        if cell_id not in known:
            cfg = json.loads(cfg_path.read_text())
            known[cell_id] = {"cell_id": cell_id, "method": cfg["method"], "seed": cfg["seed"],
                              "epochs": cfg["recipe"]["epochs"]}
    if not known:
        raise KtBenchError(f"{out} holds no cells (no {MANIFEST}, no cells/*/config.json); "
                           "give a run's --out folder")
    rows = []
    for cell_id, info in known.items():
        cell_dir = out / "cells" / cell_id
        row = dict(info)
        row["done"] = _epochs_done(cell_dir)
        who = holder(cell_dir / "lock")
        result = cell_dir / "result.json"
        if who is not None:
            row.update(state=RUNNING, where=who.rsplit(" ", 1)[0])
        elif result.exists():
            r = json.loads(result.read_text())
            row.update(state=r["status"], error=r.get("error", ""), top1=r.get("top1"))
        elif (cell_dir / "checkpoint.pt").exists():
            row["state"] = INTERRUPTED
        else:
            row["state"] = PENDING
        rows.append(row)
    return pd.DataFrame(rows)


def format_status(states: pd.DataFrame) -> str:
    """The table of :func:`cell_states` and a count per state."""
    from tabulate import tabulate

    cols = [c for c in ("cell_id", "dataset", "teacher", "student", "method", "seed", "state")
            if c in states]
    table = states[cols].copy()
    table["epochs"] = [f"{d}/{e}" for d, e in zip(states["done"], states["epochs"], strict=True)]
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
    table = table.fillna("")
    counts = states["state"].value_counts()
    order = ["ok", "diverged", "failed", "oom", RUNNING, INTERRUPTED, PENDING]
    order += sorted(set(counts.index) - set(order))
    summary = ", ".join(f"{counts[s]} {s}" for s in order if s in counts)
    return (tabulate(table.values.tolist(), headers=list(table.columns), tablefmt="simple",
                     disable_numparse=True) + f"\n{len(states)} cells: {summary}")
