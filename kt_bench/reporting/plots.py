"""Plots of a grid's results (matplotlib, PNG and PDF): accuracy per method, training curves,
accuracy against cost, and sensitivity to swept parameters."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display needed
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from kt_bench.core.errors import first_line  # noqa: E402
from kt_bench.reporting.report import BASELINE, param_columns  # noqa: E402
from kt_bench.sweep.rows import warn_once  # noqa: E402


def _save(fig, folder: Path, name: str) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"{name}.png", folder / f"{name}.pdf"]
    fig.savefig(paths[0], dpi=130, bbox_inches="tight")
    fig.savefig(paths[1], bbox_inches="tight")
    plt.close(fig)
    return paths


def _groups(summary: pd.DataFrame):
    col = summary["dataset"] + ": " + summary["teacher"] + " → " + summary["student"]
    return list(summary.assign(_g=col).groupby("_g", sort=False))


def _grid(n: int, ncols: int, size=(6.0, 3.6)):
    nrows = math.ceil(n / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(size[0] * ncols, size[1] * nrows),
                             squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return fig, axes.flat


def accuracy_plot(summary: pd.DataFrame, folder: Path) -> list[Path]:
    """Top-1 per method (mean with std error bars over seeds), one panel per dataset/pair;
    the teacher as a dashed line, the baseline as a dotted one, published figures as x."""
    params = param_columns(summary)
    groups = _groups(summary)
    fig, axes = _grid(len(groups), min(2, len(groups)))
    for ax, (name, g) in zip(axes, groups, strict=False):
        labels = [m + "".join(f"\n{p}={r[p]}" for p in params if not pd.isna(r[p]))
                  for m, (_, r) in zip(g["method"], g.iterrows(), strict=True)]
        x = range(len(g))
        ax.errorbar(x, g["top1"], yerr=g["top1_std"].fillna(0), fmt="o", capsize=4,
                    color="tab:blue", label="measured (mean ± std over seeds)")
        published = g["published_top1"].astype(float)
        if published.notna().any():
            ax.plot(x, published, "x", color="black", markersize=8, label="published")
        teacher = g["teacher_top1"].mean()
        if not math.isnan(teacher):
            ax.axhline(teacher, ls="--", color="tab:red", label=f"teacher ({teacher:.2f})")
        base = g.loc[g["method"] == BASELINE, "top1"]
        if not base.empty:
            ax.axhline(base.iloc[0], ls=":", color="gray", label="student baseline")
        ax.set_xticks(list(x), labels, rotation=45, ha="right", fontsize=8)
        ax.set_ylabel("test top-1 accuracy (%)")
        ax.set_title(name, fontsize=9)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    fig.suptitle("Accuracy per method (last epoch)")
    return _save(fig, folder, "accuracy")


#: The figures of an epoch in ``metrics.jsonl`` that the curves plot.
CURVE_FIELDS = ("epoch", "top1", "loss")


def _epochs(path: Path) -> list[dict] | None:
    """The epochs recorded in ``path`` (a cell's ``metrics.jsonl``), each with a number for
    every one of :data:`CURVE_FIELDS`; None when the file cannot be read or holds anything
    else (its curve is left out, with a warning)."""
    try:
        lines = [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines()
                 if x.strip()]
    except (OSError, ValueError) as exc:  # ValueError covers bad JSON and bad UTF-8
        warn_once(f"{path} cannot be read ({first_line(exc)}); its curve is left out")
        return None
    for line in lines:
        if not isinstance(line, dict) or not all(_is_number(line.get(k)) for k in CURVE_FIELDS):
            warn_once(f"{path} is damaged (a line without a number for each of "
                      f"{', '.join(CURVE_FIELDS)}); its curve is left out")
            return None
    return [{k: line[k] for k in CURVE_FIELDS} for line in lines]


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _history(out: Path, cell_ids) -> pd.DataFrame:
    """The epochs of the cells ``cell_ids`` that have a readable ``metrics.jsonl``."""
    frames = []
    for cid in cell_ids:
        path = out / "cells" / cid / "metrics.jsonl"
        epochs = _epochs(path) if os.path.lexists(path) else None
        if epochs:
            frames.append(pd.DataFrame(epochs).assign(cell_id=cid))
    if not frames:
        return pd.DataFrame(columns=[*CURVE_FIELDS, "cell_id"])
    return pd.concat(frames, ignore_index=True)


def curves_plot(rows: pd.DataFrame, out: Path, folder: Path) -> list[Path]:
    """Test top-1 and training loss per epoch, one line per method (mean over seeds), one
    row of panels per dataset/pair."""
    ok = rows[rows["status"] == "ok"].copy()
    ok["_g"] = ok["dataset"] + ": " + ok["teacher"] + " → " + ok["student"]
    params = param_columns(ok)
    groups = list(ok.groupby("_g", sort=False))
    fig, axes = plt.subplots(max(1, len(groups)), 2, figsize=(12, 3.6 * max(1, len(groups))),
                             squeeze=False)
    for (name, g), (ax_acc, ax_loss) in zip(groups, axes, strict=False):
        hist = _history(out, g["cell_id"]).merge(
            g[["cell_id", "method", *params]], on="cell_id")
        label_cols = ["method", *params]
        for key, h in hist.groupby(label_cols, sort=False, dropna=False):
            key = key if isinstance(key, tuple) else (key,)
            label = key[0] + "".join(f" {p}={v}" for p, v in zip(params, key[1:], strict=True)
                                     if not pd.isna(v))
            mean = h.groupby("epoch")[["top1", "loss"]].mean()
            ax_acc.plot(mean.index, mean["top1"], marker=".", label=label)
            ax_loss.plot(mean.index, mean["loss"], marker=".", label=label)
        ax_acc.set(title=f"{name}: test top-1", xlabel="epoch", ylabel="accuracy (%)")
        ax_loss.set(title=f"{name}: training loss (weighted total)", xlabel="epoch",
                    ylabel="loss")
        ax_loss.set_yscale("log")
        for ax in (ax_acc, ax_loss):
            ax.grid(alpha=0.3)
            ax.title.set_fontsize(9)
        ax_acc.legend(fontsize=7, ncol=2)
    fig.suptitle("Training curves (mean over seeds)")
    return _save(fig, folder, "curves")


def cost_plot(summary: pd.DataFrame, folder: Path) -> list[Path]:
    """Top-1 against training wall time per cell, one marker per method and dataset/pair."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    markers = "osD^v<>p*h"
    for i, (name, g) in enumerate(_groups(summary)):
        ax.scatter(g["wall_s"], g["top1"], marker=markers[i % len(markers)], label=name)
        for _, r in g.iterrows():
            ax.annotate(r["method"], (r["wall_s"], r["top1"]), fontsize=7,
                        textcoords="offset points", xytext=(4, 3))
    ax.set(xlabel="training wall time per cell (s, mean over seeds)",
           ylabel="test top-1 accuracy (%)", title="Accuracy against training cost")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, folder, "cost")


def sensitivity_plots(summary: pd.DataFrame, folder: Path) -> list[Path]:
    """For each swept parameter with numbers for values: top-1 (mean ± std) against its
    value, one line per method."""
    paths = []
    for param in param_columns(summary):
        swept = summary[summary[param].notna()]
        if pd.to_numeric(swept[param], errors="coerce").isna().any():
            continue  # names or lists: no axis to plot them on
        groups = _groups(swept)
        fig, axes = _grid(len(groups), min(2, len(groups)))
        for ax, (name, g) in zip(axes, groups, strict=False):
            for method, h in g.groupby("method", sort=False):
                h = h.sort_values(param)
                ax.errorbar(h[param].astype(float), h["top1"], yerr=h["top1_std"].fillna(0),
                            marker="o", capsize=4, label=method)
            base = summary[(summary["method"] == BASELINE)
                           & (summary["dataset"] == g["dataset"].iloc[0])]
            if not base.empty:
                ax.axhline(base["top1"].iloc[0], ls=":", color="gray", label="student baseline")
            ax.set(xlabel=param, ylabel="test top-1 accuracy (%)")
            ax.set_title(name, fontsize=9)
            if h[param].astype(float).min() > 0 and \
                    h[param].astype(float).max() / h[param].astype(float).min() >= 10:
                ax.set_xscale("log")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        fig.suptitle(f"Sensitivity to {param}")
        paths += _save(fig, folder, f"sensitivity_{param.replace('.', '_')}")
    return paths
