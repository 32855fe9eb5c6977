"""Training curves from the cells' ``metrics.jsonl``: test top-1 per epoch, and each
method's unweighted loss terms per epoch (the weighted total is not comparable across
methods, so it is never plotted), one line per method in its style, mean over seeds."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pandas as pd
from matplotlib.lines import Line2D
from matplotlib.ticker import FormatStrFormatter, NullFormatter

from kt_bench.core.errors import first_line
from kt_bench.reporting.report import (
    KEYS,
    config_labels,
    in_method_order,
    param_columns,
    problem_label,
    row_label,
)
from kt_bench.reporting.style import (
    integer_ticks,
    legend_beside,
    method_style,
    plt,
    save_figure,
    wrapped,
)
from kt_bench.sweep.rows import warn_once

#: The figures every epoch in ``metrics.jsonl`` must have a number for.
CURVE_FIELDS = ("epoch", "top1")
#: Fields of an epoch that are no loss term: the weighted total ``loss`` among them.
NOT_TERMS = frozenset({"epoch", "lr", "top1", "top5", "loss", "stage"})
#: Panels per row of a loss-term figure.
TERM_COLUMNS = 3


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def read_epochs(path: Path) -> list[dict] | None:
    """The epochs recorded in ``path`` (a cell's ``metrics.jsonl``): each line's epoch, test
    top-1 and unweighted loss terms (numbers). None when the file cannot be read or a line
    lacks a number for :data:`CURVE_FIELDS` (its curves are left out, with a warning)."""
    try:
        lines = [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines()
                 if x.strip()]
    except (OSError, ValueError) as exc:  # ValueError covers bad JSON and bad UTF-8
        warn_once(f"{path} cannot be read ({first_line(exc)}); its curves are left out")
        return None
    for line in lines:
        if not isinstance(line, dict) or not all(_is_number(line.get(k)) for k in CURVE_FIELDS):
            warn_once(f"{path} is damaged (a line without a number for each of "
                      f"{', '.join(CURVE_FIELDS)}); its curves are left out")
            return None
    return [{k: v for k, v in line.items()
             if k in CURVE_FIELDS or (k not in NOT_TERMS and _is_number(v))} for line in lines]


def history(out: Path, rows: pd.DataFrame) -> pd.DataFrame:
    """The epochs of the ok ``rows`` that have a readable ``metrics.jsonl``, one line per cell
    and epoch, with the row's problem (dataset: pair), ``label`` (as tables name its method)
    and its dataset, teacher, student and method, in the tables' order."""
    ok = rows[rows["status"] == "ok"]
    if ok.empty:
        return pd.DataFrame(columns=["problem", "label", "cell_id", *KEYS, *CURVE_FIELDS])
    params = param_columns(ok)
    configs = config_labels(rows, params)
    ok = ok.assign(config=ok["config_id"].map(lambda c: configs.get(c, "")))
    frames = []
    for (_, line), problem in zip(ok.iterrows(), problem_label(ok), strict=True):
        path = out / "cells" / str(line["cell_id"]) / "metrics.jsonl"
        epochs = read_epochs(path) if os.path.lexists(path) else None
        if epochs:
            frames.append(pd.DataFrame(epochs).assign(
                problem=problem, label=row_label(line, params), cell_id=line["cell_id"],
                **{k: line[k] for k in KEYS}))
    if not frames:
        return pd.DataFrame(columns=["problem", "label", "cell_id", *KEYS, *CURVE_FIELDS])
    return in_method_order(pd.concat(frames, ignore_index=True), ["label"]).reset_index(
        drop=True)


def loss_terms(hist: pd.DataFrame) -> list[str]:
    """The unweighted loss terms ``hist`` has, ``ce`` first, then by name."""
    terms = [c for c in hist.columns if c not in NOT_TERMS
             and c not in {"problem", "label", "cell_id", *KEYS} and hist[c].notna().any()]
    return sorted(terms, key=lambda t: (t != "ce", t))


def _line(ax, h: pd.DataFrame, column: str, method: str, variant: int):
    """One method's mean over seeds of ``column`` per epoch; a method's further
    configurations keep its colour and change the dash."""
    style = method_style(method)
    mean = h.groupby("epoch")[column].mean().dropna()
    dashes = ["-", "--", ":", "-."]
    line = style.line if variant == 0 else dashes[variant % len(dashes)]
    ax.plot(mean.index, mean.values, color=style.colour, marker=style.marker, markersize=3,
            linestyle=line, markevery=max(1, len(mean) // 12))
    return Line2D([], [], color=style.colour, marker=style.marker, linestyle=line)


def _variants(hist: pd.DataFrame) -> dict[str, int]:
    """Each label's place among the labels of its method (0 for the first)."""
    seen: dict[str, list[str]] = {}
    for label, method in hist[["label", "method"]].drop_duplicates().itertuples(index=False):
        seen.setdefault(method, []).append(label)
    return {label: labels.index(label) for labels in seen.values() for label in labels}


def curves_plot(hist: pd.DataFrame, folder: Path) -> list[Path]:
    """Test top-1 per epoch, one panel per dataset/pair, one line per method (mean over
    seeds); whole-number epoch ticks; no figure where ``hist`` is empty."""
    if hist.empty:
        return []
    problems = list(dict.fromkeys(hist["problem"]))
    ncols = min(2, len(problems))
    nrows = math.ceil(len(problems) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(6.0 * ncols, 3.8 * nrows), squeeze=False)
    for ax in axes.flat[len(problems):]:
        ax.set_visible(False)
    variants = _variants(hist)
    legend: dict[str, Line2D] = {}
    for ax, problem in zip(axes.flat, problems, strict=False):
        for (label, method), h in hist[hist["problem"] == problem].groupby(
                ["label", "method"], sort=False):
            legend[label] = _line(ax, h, "top1", method, variants[label])
        ax.set(xlabel="epoch", ylabel="test top-1 accuracy (%)")
        ax.set_title(wrapped(problem), fontsize=9)
        integer_ticks(ax)
        ax.grid(alpha=0.3)
    legend_beside(fig, list(legend.values()), list(legend), title="method")
    fig.suptitle("Test accuracy per epoch (mean over seeds)")
    fig.tight_layout()
    return save_figure(fig, folder, "curves")


def loss_plots(hist: pd.DataFrame, folder: Path) -> list[tuple[str, list[Path]]]:
    """For each dataset/pair, a figure of its unweighted loss terms per epoch (one panel per
    term, a line per method that has it, mean over seeds; a log axis where a term spans a
    factor of 20 or more and stays positive): ``losses`` where there is one pair,
    ``losses-1``, ``losses-2``, ... in table order otherwise. Returns (pair, files) each."""
    if hist.empty:
        return []
    problems = list(dict.fromkeys(hist["problem"]))
    variants = _variants(hist)
    out = []
    for number, problem in enumerate(problems, start=1):
        own = hist[hist["problem"] == problem]
        terms = loss_terms(own)
        if not terms:
            continue
        ncols = min(TERM_COLUMNS, len(terms))
        nrows = math.ceil(len(terms) / ncols)
        fig, axes = plt.subplots(nrows, ncols, figsize=(4.6 * ncols, 3.0 * nrows),
                                 squeeze=False, sharex=True)
        for ax in axes.flat[len(terms):]:
            ax.set_visible(False)
        legend: dict[str, Line2D] = {}
        for ax, term in zip(axes.flat, terms, strict=False):
            for (label, method), h in own.groupby(["label", "method"], sort=False):
                if h[term].notna().any():
                    legend[label] = _line(ax, h, term, method, variants[label])
            values = own[term].dropna()
            if (values > 0).all() and values.max() / values.min() >= 20:
                ax.set_yscale("log")
                ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
                ax.yaxis.set_minor_formatter(NullFormatter())  # mathtext labels: slow, busy
            ax.set_title(term, fontsize=9)
            integer_ticks(ax)
            ax.grid(alpha=0.3)
        for ax in axes[:, 0]:
            ax.set_ylabel("unweighted loss")
        for col in range(ncols):  # epochs under the lowest panel of each column
            last = max(r for r in range(nrows) if r * ncols + col < len(terms))
            axes[last, col].tick_params(labelbottom=True)
            axes[last, col].set_xlabel("epoch")
        legend_beside(fig, list(legend.values()), list(legend), title="method")
        fig.suptitle(wrapped(f"{problem}: loss terms per epoch, unweighted (mean over seeds)",
                             40 * ncols), fontsize=10)
        fig.tight_layout()
        name = "losses" if len(problems) == 1 else f"losses-{number}"
        out.append((problem, save_figure(fig, folder, name)))
    return out
