"""Downstream evaluations as a run uses them: the units of a grid's cells, their dry-run plan
with GPU-hour estimates, their run after the cells (``kt-bench run``) and their run for a
folder trained earlier (``kt-bench downstream DIR``).

Imported only to run evaluations: it loads torch."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import pandas as pd
from tabulate import tabulate

from kt_bench.core.errors import KtBenchError
from kt_bench.core.precision import resolve_precision
from kt_bench.sweep.cells import Cell
from kt_bench.sweep.config import Grid
from kt_bench.sweep.cost import ASSUMED_FLOPS
from kt_bench.sweep.downstream import (
    Unit,
    finished_cells,
    record_evaluations,
    recorded_evaluations,
    run_units,
    unit_flops,
    units_for,
)
from kt_bench.sweep.downstream_config import Downstream, matches
from kt_bench.training.device import make_accelerator
from kt_bench.training.hooks import say


def _leaf_filters(leaf: Grid) -> tuple[str, ...]:
    """``only`` filters selecting the cells of ``leaf`` by name: its datasets, teachers,
    students and methods (so that an included grid's evaluations apply to its own cells)."""
    names = {"dataset": [d.name for d in leaf.datasets],
             "teacher": [p.teacher.name for p in leaf.pairs],
             "student": [p.student.name for p in leaf.pairs], "method": leaf.methods}
    return tuple(f"{key}={','.join(dict.fromkeys(values))}" for key, values in names.items())


def evaluations_of(grid: Grid) -> list[Downstream]:
    """Every evaluation of ``grid``; in a grid made of parts (``include``), each part's with
    filters selecting that part's cells added to its ``only``."""
    if not grid.parts:
        return list(grid.downstream)
    return [dataclasses.replace(ev, only=ev.only + _leaf_filters(leaf))
            for leaf in grid.leaves() for ev in leaf.downstream]


def grid_units(grid: Grid, cells: list[Cell]) -> list[Unit]:
    """The units of ``grid``'s evaluations for ``cells``."""
    return units_for([c.identity() for c in cells], evaluations_of(grid))


def units_plan(units: list[Unit], cells: list[Cell]) -> pd.DataFrame:
    """One line per unit: its cell, method, seed, evaluation, kind, dataset and estimated
    GPU-hours (NaN where its networks cannot be built)."""
    configs = {c.cell_id: c.config() for c in cells}
    lines = []
    for unit in units:
        try:
            hours = unit_flops(unit, configs[unit.cell["cell_id"]]) / ASSUMED_FLOPS / 3600
        except KtBenchError:
            hours = math.nan
        ev = unit.downstream
        lines.append((unit.cell["cell_id"], unit.cell["method"], unit.cell["seed"], ev.name,
                      ev.kind, ev.dataset.label, hours))
    return pd.DataFrame(lines, columns=["cell", "method", "seed", "unit", "kind", "dataset",
                                        "gpu_hours"])


def print_units_plan(table: pd.DataFrame) -> None:
    """The units plan (:func:`units_plan`) with each unit's GPU-hours and their total."""
    if table.empty:
        return
    rows = [(*line[:-1], "-" if math.isnan(line[-1]) else f"{line[-1]:.2g}")
            for line in table.itertuples(index=False)]
    print()
    print(tabulate(rows, headers=["cell", "method", "seed", "downstream", "kind", "dataset",
                                  "GPU-h"], tablefmt="simple", disable_numparse=True))
    print(f"{len(table)} downstream units; estimate: {table['gpu_hours'].sum():.1f} GPU-hours "
          f"at an assumed {ASSUMED_FLOPS / 1e12:.0f} TFLOP/s (a rough guide)")


def run_after_cells(grid: Grid, cells: list[Cell], rows: pd.DataFrame, out: Path,
                    device: Any, precision: str, data_root: str | None) -> list[dict]:
    """Run the units of ``cells`` whose ``rows`` say they finished ok; their rows."""
    evaluations = evaluations_of(grid)
    if not evaluations:
        return []
    ok = set(rows.loc[rows["status"] == "ok", "cell_id"]) if not rows.empty else set()
    units = units_for([c.identity() for c in cells if c.cell_id in ok], evaluations)
    if not units:
        return []
    say(f"downstream: {len(units)} unit(s) of {len(evaluations)} evaluation(s)")
    return run_units(units, out, device, precision, data_root, say)


def record_grid(grid: Grid, out: Path) -> None:
    """Record ``grid``'s evaluations in run folder ``out`` (before its cells run), so that
    ``kt-bench downstream OUT`` runs them later: after ``--no-downstream``, cluster jobs or an
    interrupted run."""
    evaluations = evaluations_of(grid)
    if evaluations:
        record_evaluations(out, evaluations)


def run_for_folder(out: Path, evaluations: list[Downstream] | None, only: list[str],
                   device: str = "auto", precision: str = "auto",
                   data_root: str | None = None) -> list[dict]:
    """Run ``evaluations`` (default: those recorded in the folder) for every cell of run
    folder ``out`` that finished ok and passes the ``only`` filters; their rows."""
    if not (out / "cells").is_dir():
        raise KtBenchError(f"{out} holds no cells (no cells/ folder); give a run folder")
    if evaluations is None:
        evaluations = recorded_evaluations(out)
        if not evaluations:
            raise KtBenchError(f"{out} records no downstream evaluations "
                               "(no downstream.json); give --grid with [[downstream]] tables")
    filters = tuple(only)
    cells = [c for c in finished_cells(out) if matches(c, filters)]
    if not cells:
        raise KtBenchError(f"{out} has no finished (ok) cell"
                           f"{' matching ' + ' '.join(only) if only else ''}")
    precision = resolve_precision(precision, device)
    accelerator = make_accelerator(device, precision)  # checks the device and precision
    record_evaluations(out, evaluations)
    units = units_for(cells, evaluations)
    say(f"downstream: {len(units)} unit(s) for {len(cells)} cell(s) of {out} on "
        f"{accelerator.device} (precision {precision})")
    return run_units(units, out, accelerator.device, precision, data_root, say)
