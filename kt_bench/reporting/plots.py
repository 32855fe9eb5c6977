"""Plots of a grid's summary (matplotlib, PNG and PDF): accuracy per method, accuracy
against each student's own training time, and sensitivity to swept parameters. Every method
keeps its style (:func:`~kt_bench.reporting.style.method_style`); legends sit beside the
panels."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
from matplotlib.lines import Line2D

from kt_bench.reporting.report import BASELINE, param_columns, problem_label, row_label
from kt_bench.reporting.style import legend_beside, method_style, plt, save_figure, wrapped


def _groups(summary: pd.DataFrame) -> list[tuple[str, pd.DataFrame]]:
    """The summary's lines by dataset and pair, in table order."""
    return list(summary.assign(_g=problem_label(summary)).groupby("_g", sort=False))


def _grid(n: int, ncols: int, size=(6.0, 3.6)):
    nrows = math.ceil(n / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(size[0] * ncols, size[1] * nrows),
                             squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return fig, axes.flat


def _labels(g: pd.DataFrame) -> list[str]:
    params = param_columns(g)
    return [row_label(r, params) for _, r in g.iterrows()]


def _method_handle(method: str, line: bool = False) -> Line2D:
    style = method_style(method)
    return Line2D([], [], color=style.colour, marker=style.marker,
                  linestyle=style.line if line else "none")


def _y_range(g: pd.DataFrame) -> tuple[float, float]:
    """The span of what an accuracy panel plots (means ± std, published figures)."""
    std = g["top1_std"].fillna(0)
    values = pd.concat([g["top1"] - std, g["top1"] + std,
                        g["published_top1"].astype(float)]).dropna()
    if values.empty:
        return 0.0, 100.0
    low, high = float(values.min()), float(values.max())
    pad = max((high - low) * 0.08, 0.5)
    return low - pad, high + pad


def accuracy_plot(summary: pd.DataFrame, folder: Path) -> list[Path]:
    """Top-1 per method (mean with std error bars over seeds, in each method's colour), one
    panel per dataset/pair; the baseline as a dotted line, published figures as x. The y axis
    spans the methods' results: the teacher is a dashed line where it falls in that span and
    is named in the panel's title otherwise."""
    groups = _groups(summary)
    fig, axes = _grid(len(groups), min(2, len(groups)))
    drawn: set[str] = set()
    for ax, (name, g) in zip(axes, groups, strict=False):
        x = list(range(len(g)))
        for xi, (_, line) in zip(x, g.iterrows(), strict=True):
            style = method_style(line["method"])
            ax.errorbar([xi], [line["top1"]], yerr=[0 if pd.isna(line["top1_std"])
                                                    else line["top1_std"]],
                        fmt=style.marker, color=style.colour, capsize=4, markersize=6,
                        zorder=3)  # over the teacher's and the baseline's lines
        published = g["published_top1"].astype(float)
        if published.notna().any():
            ax.plot(x, published, "x", color="black", markersize=8)
            drawn.add("published")
        low, high = _y_range(g)
        base = g.loc[g["method"] == BASELINE, "top1"]
        if not base.empty:
            ax.axhline(base.iloc[0], ls=":", color="gray")
            drawn.add("student baseline")
        title = wrapped(name)
        teacher = g["teacher_top1"].mean()
        if not math.isnan(teacher):
            if low <= teacher <= high + (high - low) * 0.25:
                ax.axhline(teacher, ls="--", color="tab:red")
                drawn.add("teacher")
                high = max(high, teacher + 0.5)
            else:
                title += f"\n(teacher {teacher:.2f}%, outside this axis)"
        ax.set_ylim(low, high)
        ax.set_xticks(x, _labels(g), rotation=45, ha="right", fontsize=8)
        ax.set_ylabel("test top-1 accuracy (%)")
        ax.set_title(title, fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    keys = [
        (Line2D([], [], color="gray", marker="o", linestyle="none"),
         "mean ± std over seeds (method's colour)"),
        (Line2D([], [], color="black", marker="x", linestyle="none"), "published"),
        (Line2D([], [], color="tab:red", linestyle="--"), "teacher"),
        (Line2D([], [], color="gray", linestyle=":"), "student baseline"),
    ]
    keys = [keys[0], *(k for k in keys[1:] if k[1] in drawn)]
    legend_beside(fig, [h for h, _ in keys], [label for _, label in keys])
    fig.suptitle("Accuracy per method (last epoch)")
    fig.tight_layout()
    return save_figure(fig, folder, "accuracy")


def cost_plot(summary: pd.DataFrame, folder: Path) -> list[Path]:
    """Top-1 against each student's own training time (``own_s``, mean over seeds), one
    panel per dataset/pair; lines without an own time (cohort members whose share of the
    cohort's time was not measured) are left out. No figure (an empty list) where no line
    has one."""
    if "own_s" not in summary:
        return []
    timed = summary[summary["own_s"].notna() & summary["top1"].notna()]
    if timed.empty:
        return []
    groups = _groups(timed)
    fig, axes = _grid(len(groups), min(2, len(groups)), size=(6.0, 4.2))
    methods: dict[str, None] = {}
    for ax, (name, g) in zip(axes, groups, strict=False):
        for (_, line), label in zip(g.iterrows(), _labels(g), strict=True):
            style = method_style(line["method"])
            ax.scatter(line["own_s"], line["top1"], color=style.colour, marker=style.marker,
                       s=40, zorder=3)
            if label != line["method"]:  # a method's colour names it; a setting needs words
                ax.annotate(label, (line["own_s"], line["top1"]), fontsize=7,
                            textcoords="offset points", xytext=(4, 3))
            methods[line["method"]] = None
        ax.margins(x=0.12, y=0.08)  # room for the settings' names beside the points
        ax.set(xlabel="training time of the student (s, mean over seeds)",
               ylabel="test top-1 accuracy (%)")
        ax.set_title(wrapped(name), fontsize=9)
        ax.grid(alpha=0.3)
    legend_beside(fig, [_method_handle(m) for m in methods], list(methods), title="method")
    fig.suptitle("Accuracy against training cost")
    fig.tight_layout()
    return save_figure(fig, folder, "cost")


def sensitivity_plots(summary: pd.DataFrame, folder: Path) -> list[Path]:
    """For each swept parameter with numbers for values: top-1 (mean ± std) against its
    value, one line per method in its style."""
    paths = []
    for param in param_columns(summary):
        swept = summary[summary[param].notna()]
        if pd.to_numeric(swept[param], errors="coerce").isna().any():
            continue  # names or lists: no axis to plot them on
        groups = _groups(swept)
        fig, axes = _grid(len(groups), min(2, len(groups)))
        methods: dict[str, None] = {}
        for ax, (name, g) in zip(axes, groups, strict=False):
            for method, h in g.groupby("method", sort=False):
                h = h.sort_values(param)
                style = method_style(method)
                ax.errorbar(h[param].astype(float), h["top1"], yerr=h["top1_std"].fillna(0),
                            marker=style.marker, color=style.colour, linestyle=style.line,
                            capsize=4)
                methods[method] = None
            base = summary[(summary["method"] == BASELINE)
                           & (problem_label(summary) == name)]
            if not base.empty:
                ax.axhline(base["top1"].iloc[0], ls=":", color="gray")
            values = g[param].astype(float)
            ax.set(xlabel=param, ylabel="test top-1 accuracy (%)")
            ax.set_title(wrapped(name), fontsize=9)
            if values.min() > 0 and values.max() / values.min() >= 10:
                ax.set_xscale("log")
            ax.grid(alpha=0.3)
        handles = [_method_handle(m, line=True) for m in methods]
        labels = list(methods)
        handles.append(Line2D([], [], color="gray", linestyle=":"))
        labels.append("student baseline")
        legend_beside(fig, handles, labels)
        fig.suptitle(f"Sensitivity to {param}")
        fig.tight_layout()
        paths += save_figure(fig, folder, f"sensitivity_{param.replace('.', '_')}")
    return paths
