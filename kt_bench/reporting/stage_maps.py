"""What the students took from the teacher, stage by stage: the per-stage CKA and MMD² of
each cell's ``diagnostics.json`` averaged over seeds, as a method × stage heat map and a
Markdown table per dataset and pair. Cells without the file are left out; a report without
any has neither."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pandas as pd
from tabulate import tabulate

from kt_bench.core.errors import first_line
from kt_bench.reporting.report import (
    KEYS,
    config_labels,
    in_method_order,
    param_columns,
    problem_label,
    row_label,
)
from kt_bench.reporting.style import plt, save_figure, wrapped
from kt_bench.sweep.rows import warn_once

#: A cell's measurements, beside its ``result.json`` (as kt_bench.sweep.diagnostics writes
#: them; not imported from there, which would load torch).
DIAGNOSTICS_FILE = "diagnostics.json"
#: The per-stage measures drawn, with their names in figures and tables.
MEASURES = {"cka": "CKA", "mmd2_poly": "MMD²"}
#: The columns of :func:`read_stages`.
STAGE_COLUMNS = ["problem", "label", "cell_id", "stage", "depth", *MEASURES]


def _number(value) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    return float(value) if ok and math.isfinite(value) else math.nan


def _stages_of(path: Path) -> list[dict] | None:
    """The ``stages`` list of one ``diagnostics.json``; None (with a warning) where the file
    cannot be read or holds something else."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        warn_once(f"{path} cannot be read ({first_line(exc)}); its stages are left out")
        return None
    stages = data.get("stages") if isinstance(data, dict) else None
    if not isinstance(stages, list) or not all(isinstance(s, dict) and isinstance(
            s.get("stage"), str) for s in stages):
        warn_once(f"{path} is damaged (no list of stages, each named); its stages are left "
                  "out")
        return None
    return stages


def read_stages(out: Path, rows: pd.DataFrame) -> pd.DataFrame:
    """One line per ok cell and stage of run folder ``out`` that has a ``diagnostics.json``:
    its problem (dataset: pair), ``label`` (as tables name its method), ``stage``, ``depth``
    (the stage's place, shallow first) and each of :data:`MEASURES` (NaN where undefined)."""
    ok = rows[rows["status"] == "ok"]
    lines = []
    if not ok.empty:
        params = param_columns(ok)
        configs = config_labels(rows, params)
        ok = ok.assign(config=ok["config_id"].map(lambda c: configs.get(c, "")))
        for (_, row), problem in zip(ok.iterrows(), problem_label(ok), strict=True):
            path = out / "cells" / str(row["cell_id"]) / DIAGNOSTICS_FILE
            stages = _stages_of(path) if os.path.lexists(path) else None
            for depth, stage in enumerate(stages or []):
                lines.append({"problem": problem, "label": row_label(row, params),
                              "cell_id": row["cell_id"], "stage": stage["stage"],
                              "depth": depth,
                              **{k: row[k] for k in KEYS},
                              **{m: _number(stage.get(m)) for m in MEASURES}})
    frame = pd.DataFrame(lines, columns=[*STAGE_COLUMNS, *KEYS])
    return in_method_order(frame, ["label"])[STAGE_COLUMNS].reset_index(drop=True)


def stage_means(stages: pd.DataFrame) -> pd.DataFrame:
    """Each measure's mean over seeds per problem, method label and stage (stages in their
    depth order, methods in table order)."""
    if stages.empty:
        return pd.DataFrame(columns=["problem", "label", "stage", "depth", *MEASURES])
    return (stages.groupby(["problem", "label", "stage"], sort=False)
            .agg(depth=("depth", "min"), **{m: (m, "mean") for m in MEASURES})
            .reset_index())


def _grid(means: pd.DataFrame, measure: str) -> pd.DataFrame:
    """Methods × stages of one problem's ``measure``."""
    stages = means.sort_values("depth", kind="stable")["stage"].drop_duplicates()
    table = means.pivot(index="label", columns="stage", values=measure)
    return table.reindex(index=list(dict.fromkeys(means["label"])), columns=list(stages))


def stage_table(means: pd.DataFrame) -> str:
    """The stage measures as Markdown: a table per dataset and pair, one line per method and
    a column per stage and measure (``stage1 CKA``)."""
    parts = []
    for problem, own in means.groupby("problem", sort=False):
        columns = {}
        for stage in own.sort_values("depth", kind="stable")["stage"].drop_duplicates():
            for measure, name in MEASURES.items():
                columns[f"{stage} {name}"] = _grid(own, measure)[stage]
        table = pd.DataFrame(columns).map(lambda v: "-" if pd.isna(v) else f"{v:.3f}")
        table.index.name = "method"
        parts.append(f"**{problem}**\n\n" + tabulate(table, headers="keys", tablefmt="github",
                                                       disable_numparse=True))
    return "\n\n".join(parts)


def stage_heatmap(means: pd.DataFrame, folder: Path, name: str = "stages") -> list[Path]:
    """Method × stage heat maps, CKA (0 to 1) beside MMD² (one scale for all pairs), one row
    of panels per dataset and pair, each value written in its square; no figure where
    ``means`` is empty."""
    if means.empty:
        return []
    problems = list(dict.fromkeys(means["problem"]))
    grids = [{m: _grid(means[means["problem"] == p], m) for m in MEASURES} for p in problems]
    n_methods = max(len(g["cka"]) for g in grids)
    n_stages = max(len(g["cka"].columns) for g in grids)
    mmd = means["mmd2_poly"].dropna()
    scales = {"cka": (0.0, 1.0, "viridis"),
              "mmd2_poly": (0.0, float(mmd.max()) if len(mmd) and mmd.max() > 0 else 1.0,
                            "magma_r")}
    fig, axes = plt.subplots(len(problems), 2, squeeze=False, layout="constrained", figsize=(
        2 * (2.2 + 0.8 * n_stages) + 1.2, len(problems) * (1.0 + 0.3 * n_methods) + 0.5))
    images = {}
    for row, (problem, grid) in enumerate(zip(problems, grids, strict=True)):
        for ax, (measure, title) in zip(axes[row], MEASURES.items(), strict=True):
            table = grid[measure]
            low, high, cmap = scales[measure]
            images[measure] = ax.imshow(table.to_numpy(dtype=float), aspect="auto", cmap=cmap,
                                        vmin=low, vmax=high)
            ax.set_xticks(range(len(table.columns)), table.columns, fontsize=8)
            ax.set_yticks(range(len(table.index)), table.index, fontsize=8)
            ax.set_title(wrapped(f"{problem}: {title}", 48), fontsize=9)
            for (i, j), value in pd.DataFrame(table.to_numpy(dtype=float)).stack().dropna(
                    ).items():
                dark = (value - low) / (high - low) < 0.5  # viridis is dark at the bottom
                if measure != "cka":
                    dark = not dark  # magma_r: dark at the top
                ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=7,
                        color="white" if dark else "black")
    for col, (measure, title) in enumerate(MEASURES.items()):
        fig.colorbar(images[measure], ax=axes[:, col], label=title, shrink=0.9,
                     aspect=max(20, 12 * len(problems)))
    fig.suptitle("Teacher–student similarity per stage (mean over seeds; CKA higher, MMD² "
                 "lower = closer)", fontsize=10)
    return save_figure(fig, folder, name)
