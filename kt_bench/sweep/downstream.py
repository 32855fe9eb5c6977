"""Downstream units: one (finished cell, ``[[downstream]]`` evaluation) each, run like a cell.

A unit lives in ``<out>/cells/<cell_id>/downstream/<name>-<hash>/`` (the hash of its
evaluation's config, so a changed recipe is another unit): its ``config.json``, ``log.txt``,
whatever the kind keeps to resume (cached features, checkpoints), a ``lock`` held while it
runs, and its row, ``result.json``, written atomically. A unit whose row is ok is never run
again; a failed one is run again. Every unit row of a folder is gathered into
``<out>/downstream.csv``, one line per metric. The cell's own files are only read.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from kt_bench.core import atomic
from kt_bench.core.errors import (
    KtBenchError,
    UnreadableFileError,
    UnwritableFileError,
    first_line,
)
from kt_bench.core.interrupts import is_stop
from kt_bench.core.locks import FileLock
from kt_bench.sweep.cells import config_hash
from kt_bench.sweep.downstream_config import Downstream, downstream_from_tables, matches
from kt_bench.sweep.rows import DOWNSTREAM_COLUMNS, DOWNSTREAM_CSV, read_rows, warn_once

#: The evaluations recorded for a run folder.
DOWNSTREAM_RECORD = "downstream.json"
#: The fields of a cell's row that identify it in its units' rows.
CELL_FIELDS = ("grid", "teacher", "student", "method", "seed", "config_id", "setting_id")


@dataclass(frozen=True)
class Unit:
    """The evaluation ``downstream`` of the cell whose row identity is ``cell`` (its
    ``cell_id``, ``dataset``, ``teacher``, ``student``, ``method``, ``seed``, ...)."""

    cell: dict[str, Any]
    downstream: Downstream

    @property
    def unit_id(self) -> str:
        """The unit's folder name: its evaluation's name and config hash."""
        return f"{self.downstream.name}-{config_hash(self.downstream.identity(), 8)}"

    def folder(self, out: Path) -> Path:
        """Where the unit keeps its files in run folder ``out``."""
        return out / "cells" / self.cell["cell_id"] / "downstream" / self.unit_id

    def identity(self) -> dict[str, Any]:
        """The identifying fields of the unit's row (and of each line of downstream.csv)."""
        return {"cell_id": self.cell["cell_id"], "unit": self.downstream.name,
                "unit_id": self.unit_id, "kind": self.downstream.kind,
                "dataset": self.downstream.dataset.label,
                "trained_on": self.cell.get("dataset"),
                **{k: self.cell.get(k) for k in CELL_FIELDS}}


def units_for(cells: list[dict[str, Any]], evaluations: list[Downstream]) -> list[Unit]:
    """Each evaluation for each of ``cells`` (row identities) that its ``only`` filters
    select, evaluation by evaluation."""
    return [Unit(cell, ev) for ev in evaluations for cell in cells if matches(cell, ev.only)]


def record_evaluations(out: Path, evaluations: list[Downstream]) -> None:
    """Keep ``evaluations`` in ``<out>/downstream.json`` (added to those recorded before), so
    that ``kt-bench downstream OUT`` runs them later without the grid file."""
    with FileLock(out / ".downstream.lock"):
        known = {(t["name"], tuple(t.get("only", []))): t for t in _recorded_tables(out)}
        known.update({(ev.name, ev.only): ev.to_table() for ev in evaluations})
        atomic.write_json(out / DOWNSTREAM_RECORD, list(known.values()))


def _recorded_tables(out: Path) -> list[dict[str, Any]]:
    path = out / DOWNSTREAM_RECORD
    if not path.is_file():
        return []
    tables = atomic.read_json(path)
    if not isinstance(tables, list):
        raise KtBenchError(f"{path} is damaged (not a list of evaluations); give --grid")
    return tables


def recorded_evaluations(out: Path) -> list[Downstream]:
    """The evaluations recorded in ``<out>/downstream.json`` (none where there is no file)."""
    return downstream_from_tables(_recorded_tables(out), str(out / DOWNSTREAM_RECORD),
                                  by_selection=True)


def finished_unit(out: Path, unit: Unit) -> dict[str, Any] | None:
    """The unit's row if it finished ok, else None."""
    path = unit.folder(out) / "result.json"
    try:
        row = atomic.read_json(path) if path.is_file() else None
    except (KtBenchError, ValueError):
        return None
    return row if isinstance(row, dict) and row.get("status") == "ok" else None


def _log(folder: Path, text: str) -> None:
    """Append ``text`` to the unit's ``log.txt`` if it can be (the row says what matters)."""
    with contextlib.suppress(OSError):
        atomic.append_line(folder / "log.txt", text)


def run_unit(unit: Unit, out: Path, device: torch.device, precision: str,
             data_root: str | None, say: Callable[[str], None]) -> dict[str, Any]:
    """Run one unit (resuming from its folder) and write its row; return the row. Its
    failure is its row's status and error; an interrupt is raised again."""
    from kt_bench.downstream import DOWNSTREAM_KINDS, UnitContext
    from kt_bench.downstream.student import trained_student

    folder = unit.folder(out)
    folder.mkdir(parents=True, exist_ok=True)
    ev = unit.downstream
    atomic.write_json(folder / "config.json", {**ev.config(), "cell_id": unit.cell["cell_id"]})
    _log(folder, f"start {ev.kind} on {ev.dataset.label}")
    start = time.perf_counter()
    try:
        student = trained_student(out / "cells" / unit.cell["cell_id"])
        ctx = UnitContext(folder, student, ev.options, ev.dataset, data_root, device,
                          precision, int(unit.cell.get("seed", 0)),
                          lambda line: (say(f"{ev.name} {unit.cell.get('method')} seed "
                                            f"{unit.cell.get('seed')}: {line}"),
                                        _log(folder, line)))
        metrics = DOWNSTREAM_KINDS.get(ev.kind).run(ctx)
        row = {**unit.identity(), "status": "ok", "error": "", "metrics": metrics}
    except BaseException as exc:  # noqa: BLE001 - an interrupt is raised again
        if is_stop(exc):
            _log(folder, "stopped; a new run resumes")
            raise
        row = {**unit.identity(), "status": "failed", "error": first_line(exc), "metrics": {}}
    row["wall_s"] = time.perf_counter() - start
    atomic.write_json(folder / "result.json", row)
    _log(folder, f"end status={row['status']} {row['error']}".rstrip())
    return row


def run_units(units: list[Unit], out: Path, device: torch.device, precision: str,
              data_root: str | None, say: Callable[[str], None]) -> list[dict[str, Any]]:
    """Run every unit not finished yet (each locked while it runs: one held by another runner
    is left to it) and rewrite ``downstream.csv``; return the rows of the units (old and
    new; none for a unit left to another runner)."""
    rows = []
    for i, unit in enumerate(units):
        done = finished_unit(out, unit)
        if done is not None:
            rows.append(done)
            continue
        lock = FileLock(unit.folder(out) / "lock")
        unit.folder(out).mkdir(parents=True, exist_ok=True)
        if not lock.acquire(blocking=False):
            say(f"{unit.downstream.name} of cell {unit.cell['cell_id']} runs elsewhere")
            continue
        try:
            row = finished_unit(out, unit) or run_unit(unit, out, device, precision,
                                                        data_root, say)
        finally:
            lock.release()
            write_downstream_csv(out)
        rows.append(row)
        say(f"[downstream {i + 1}/{len(units)}] {_summary(row)}")
    write_downstream_csv(out)  # also when every unit was done before: never a stale file
    return rows


def _summary(row: dict[str, Any]) -> str:
    what = f"{row['unit']} {row['method']} seed {row['seed']}"
    if row["status"] != "ok":
        return f"{what}: {row['status']}: {row['error']}"
    return what + ": " + ", ".join(f"{k} {v:.2f}" for k, v in row["metrics"].items())


def _newest_rows(out: Path) -> list[Path]:
    """The ``result.json`` of each (cell, evaluation name) of ``out``: the newest where a
    changed recipe left the unit of the old one beside it."""
    newest: dict[tuple[str, str], Path] = {}
    for path in sorted((out / "cells").glob("*/downstream/*/result.json")):
        key = (path.parents[2].name, path.parent.name.rsplit("-", 1)[0])
        try:
            if key not in newest or path.stat().st_mtime > newest[key].stat().st_mtime:
                newest[key] = path
        except OSError:
            newest.setdefault(key, path)  # reading it names the problem
    return sorted(newest.values())


def read_unit_rows(out: Path) -> pd.DataFrame:
    """Every unit row of run folder ``out``, one line per metric (a failed unit: one line
    without a metric), in :data:`DOWNSTREAM_COLUMNS`; unreadable or damaged rows are named
    in a warning and left out."""
    lines = []
    for path in _newest_rows(out):
        try:
            row = atomic.read_json(path)
        except (UnreadableFileError, ValueError, KtBenchError) as exc:
            warn_once(f"{path}: {first_line(exc)}; left out of {DOWNSTREAM_CSV}")
            continue
        if not isinstance(row, dict) or "unit" not in row:
            warn_once(f"{path} is damaged (no unit row); left out of {DOWNSTREAM_CSV}")
            continue
        metrics = row.get("metrics") or {"": math.nan}
        for metric, value in metrics.items():
            lines.append({**{k: row.get(k) for k in DOWNSTREAM_COLUMNS}, "metric": metric,
                          "value": value})
    return pd.DataFrame(lines, columns=DOWNSTREAM_COLUMNS)


def write_downstream_csv(out: Path) -> pd.DataFrame:
    """Rebuild ``<out>/downstream.csv`` atomically from the unit rows; return them."""
    with FileLock(out / ".downstream-csv.lock"):
        df = read_unit_rows(out)
        try:
            atomic.write_text(out / DOWNSTREAM_CSV, df.to_csv(index=False))
        except UnwritableFileError as exc:
            warn_once(f"{exc}; the rows are in the units' result.json")
    return df


def finished_cells(out: Path) -> list[dict[str, Any]]:
    """The row identities of the cells of ``out`` that trained to the end (status ok)."""
    rows = read_rows(out)
    if rows.empty:
        return []
    ok = rows[rows["status"] == "ok"]
    return json.loads(ok.to_json(orient="records"))


def unit_flops(unit: Unit, cell_config: dict[str, Any]) -> float:
    """A rough FLOP count of ``unit`` (its kind's estimate) for a dry run."""
    from kt_bench.downstream import DOWNSTREAM_KINDS
    from kt_bench.downstream.student import build_student, student_architecture, student_input

    student = build_student(cell_config)
    shape = student_input(student_architecture(cell_config)[1])
    ev = unit.downstream
    return DOWNSTREAM_KINDS.get(ev.kind).flops(student, shape, ev.dataset, ev.options)
