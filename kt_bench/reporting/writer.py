"""``kt-bench report``: a run folder's rows -> tables, plots and a ``report.md`` linking them."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from kt_bench.core import atomic
from kt_bench.core.precision import describe_precision
from kt_bench.reporting.cd_diagram import cd_diagram
from kt_bench.reporting.curves import curves_plot, history, loss_plots
from kt_bench.reporting.downstream import downstream_columns, read_downstream
from kt_bench.reporting.own_time import STEP_COLUMN, own_seconds
from kt_bench.reporting.plots import accuracy_plot, cost_plot, sensitivity_plots
from kt_bench.reporting.ranking import Ranking, p_text, problem_scores, rank_methods
from kt_bench.reporting.report import (
    DEFAULT_CORRECTION,
    PIVOT_CAPTION,
    correction_note,
    display_table,
    latex_pivot,
    load_downstream_reference,
    load_reference,
    markdown_pivot,
    summarise,
    versus_table,
)
from kt_bench.reporting.stage_maps import read_stages, stage_heatmap, stage_means, stage_table
from kt_bench.sweep.rows import read_rows

#: What the tables of a report without usable rows say.
NO_RESULTS = "(no results)"


def precision_text(rows: pd.DataFrame) -> str:
    """The precisions the rows trained in, with their cell counts (``bf16 autocast (24
    cells)``)."""
    counts = rows["precision"].dropna().astype(str).value_counts()
    if counts.empty:
        return "not recorded"
    return ", ".join(f"{describe_precision(p)} ({n} cell{'s' if n > 1 else ''})"
                     for p, n in counts.items())


def _figure(path: Path) -> str:
    return f"![{path.stem}](report/{path.name}) ([PDF](report/{path.stem}.pdf))\n"


def _pngs(paths: list[Path]) -> list[Path]:
    return [p for p in paths if p.suffix == ".png"]


def ranking_section(ranking: Ranking | None, figure: list[str]) -> list[str]:
    """The report's lines on the ranking across problems, ``figure`` its Markdown (none where
    there is no ranking)."""
    if ranking is None:
        return []
    table = pd.DataFrame({"method": ranking.ranks.index,
                          "mean rank": [f"{r:.2f}" for r in ranking.ranks]})
    lines = [
        "## Ranking across pairs",
        "",
        f"On each of the {ranking.problems} dataset/pair problems the methods are ranked by "
        "mean top-1 (1 = best; ties share the mean of their ranks) and the ranks averaged "
        f"(Demšar 2006). Friedman test (Iman–Davenport F = {ranking.friedman_f:.3g}): "
        f"{p_text(ranking.friedman_p)}. Two methods whose mean ranks differ by less than the "
        f"Nemenyi critical difference CD = {ranking.cd:.2f} (q = {ranking.q:.3f}, α = 0.05, "
        f"{len(ranking.ranks)} methods) are not significantly different; the diagram's bars "
        "join such methods.",
        "",
    ]
    if ranking.left_out:
        lines += [f"Left out (no result on every problem): {', '.join(ranking.left_out)}.", ""]
    lines += [table.to_markdown(index=False), "", *figure]
    return lines


def _cost_note(rows: pd.DataFrame, drawn: bool) -> str:
    """What the cost figure shows, and which lines it leaves out and why."""
    ok = rows[rows["status"] == "ok"]
    untimed = ok["own_s"].isna().sum() if "own_s" in ok else len(ok)
    if not untimed:
        return ("Cost: each student's own training time, mean over seeds (for students "
                "trained together, their cohort's wall time shared out by their measured step "
                "times).")
    reason = (f"trained in a cohort without a measured per-student step time (`{STEP_COLUMN}`), "
              "so only the cohort's shared wall time is known, the same for every member")
    if not drawn:
        return (f"No cost figure: every cell {reason}. Run with `--no-cohort` for each "
                "method's own training time.")
    return (f"Cost: each student's own training time, mean over seeds; {untimed} cell(s) "
            f"{reason}, are left out of it.")


def report_summary(out: Path, rows: pd.DataFrame, correct: str = DEFAULT_CORRECTION,
                   downstream: pd.DataFrame | None = None) -> pd.DataFrame:
    """The comparison table of run folder ``out``'s ``rows`` as ``report/summary.csv`` holds
    it: :func:`~kt_bench.reporting.report.summarise` with the published figures, the changes
    against ``student`` corrected by ``correct``, ``own_s``, each student's own training
    time (:func:`~kt_bench.reporting.own_time.own_seconds`), and the downstream columns of
    ``downstream`` (by default ``out/downstream.csv``)."""
    if "own_s" not in rows:
        rows = rows.assign(own_s=own_seconds(out, rows))
    rows = downstream_columns(rows, read_downstream(out) if downstream is None else downstream)
    return summarise(rows, load_reference(), correct, load_downstream_reference())


def downstream_section(downstream: pd.DataFrame) -> list[str]:
    """The report's lines on the downstream evaluations of ``downstream`` (its lines as
    :func:`~kt_bench.reporting.downstream.read_downstream` reads them): each unit and metric
    with its kind, dataset and the cells it has a result for, then the failed units with
    their errors; none where there are no lines."""
    if downstream.empty:
        return []
    ok = downstream["status"] == "ok"
    units = (downstream.assign(_ok=downstream["cell_id"].where(ok),
                               _failed=downstream["cell_id"].where(~ok))
             .groupby(["unit", "metric"], sort=False)
             .agg(kind=("kind", "first"), dataset=("dataset", "first"),
                  cells=("_ok", "nunique"), failed=("_failed", "nunique"))
             .reset_index())
    lines = [
        "## Downstream evaluations",
        "",
        "Each trained cell's student evaluated on other data (`downstream.csv`); the tables "
        "above show each metric's mean over seeds and its change against `student`, paired "
        "by seed, with a 95% t-interval that is not adjusted for multiple comparisons (the "
        "correction covers top-1's changes only). `paper` is the published figure where "
        "`results/reference/downstream_*.csv` holds one; the other units have none readable.",
        "",
        units[["unit", "kind", "dataset", "metric", "cells", "failed"]]
        .rename(columns={"cells": "cells with a result", "failed": "cells failed"})
        .to_markdown(index=False),
        "",
    ]
    return lines + _failures(downstream[~ok])


def _failures(failed: pd.DataFrame) -> list[str]:
    """One line per failed unit and error, with how many cells failed so."""
    if failed.empty:
        return []
    errors = failed.assign(error=failed["error"].fillna("(no error recorded)"))
    lines = ["Failed:", ""]
    for (unit, error), group in errors.groupby(["unit", "error"], sort=False):
        n = group["cell_id"].nunique()
        lines.append(f"- `{unit}`, {n} cell{'s' if n > 1 else ''}: {error}")
    return [*lines, ""]


def write_report(out: Path, rows: pd.DataFrame | None = None,
                 correct: str = DEFAULT_CORRECTION) -> Path:
    """Write ``out/report.md`` and, under ``out/report/``, the tables (``table.md``,
    ``table.tex``, ``summary.csv``, ``stages.md`` with diagnostics) and figures (PNG and PDF);
    the changes against ``student`` are corrected by ``correct`` (``holm``, ``bh`` or
    ``none``). The downstream evaluations of ``out/downstream.csv`` add their columns to the
    tables and a section of their own. Return the report's path."""
    rows = read_rows(out) if rows is None else rows
    downstream = read_downstream(out)
    rows = downstream_columns(rows, downstream)
    rows = rows.assign(own_s=own_seconds(out, rows))
    summary = report_summary(out, rows, correct, downstream)
    folder = out / "report"
    folder.mkdir(parents=True, exist_ok=True)
    if summary.empty:  # every row left out (named in warnings) or none finished
        long_md = pivot_md = latex = NO_RESULTS
        note = ""
    else:
        long_md = display_table(summary).to_markdown(index=False)
        pivot_md = markdown_pivot(summary)
        latex = latex_pivot(summary)
        note = correction_note(summary)
    atomic.write_text(folder / "table.md", f"{pivot_md}\n\n{long_md}\n\n{note}\n")
    atomic.write_text(folder / "table.tex", latex + "\n")
    atomic.write_text(folder / "summary.csv", summary.to_csv(index=False))
    text = _header(rows) + [
        "## Comparison",
        "",
        f"{PIVOT_CAPTION} † marks a change that is not significant. `paper` is the published "
        "figure where one exists (`n/a`: a published row without a figure, because it could "
        "not be read where this harness was built or the paper prints N/A; `(best epoch)`: "
        "only a best-epoch figure was published, as mdistiller reports).",
        "",
        pivot_md,
        "",
        note,
        "",
        "## All figures",
        "",
        long_md,
        "",
        "Files: [table.md](report/table.md), [table.tex](report/table.tex), "
        "[summary.csv](report/summary.csv), [results.csv](results.csv).",
        "",
        *downstream_section(downstream),
    ]
    written: list[Path] = []
    if not summary.empty:
        text += _figures(out, rows, summary, folder, written)
    _remove_stale(folder, written)
    path = out / "report.md"
    atomic.write_text(path, "\n".join(text))
    return path


def _header(rows: pd.DataFrame) -> list[str]:
    counts = rows["status"].value_counts().to_dict()
    grids = ", ".join(sorted(map(str, rows["grid"].dropna().unique())))
    return [
        f"# Report: {grids}",
        "",
        f"{len(rows)} cells: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) + ".",
        "",
        f"Arithmetic: {precision_text(rows)}.",
        "",
    ]


#: Files of an earlier report that this one may not write again (a ranking, heat map or cost
#: figure that no longer applies, loss figures numbered for another count of pairs).
OPTIONAL_FILES = ("ranking.png", "ranking.pdf", "stages.png", "stages.pdf", "stages.md",
                  "cost.png", "cost.pdf", "losses.png", "losses.pdf", "losses-*.png",
                  "losses-*.pdf")


def _remove_stale(folder: Path, written: list[Path]) -> None:
    """Remove the :data:`OPTIONAL_FILES` of ``folder`` this report did not write, so none
    is mistaken for part of it."""
    keep = set(written)
    for pattern in OPTIONAL_FILES:
        for path in folder.glob(pattern):
            if path not in keep and path.is_file():
                path.unlink(missing_ok=True)


def _figures(out: Path, rows: pd.DataFrame, summary: pd.DataFrame, folder: Path,
             written: list[Path]) -> list[str]:
    """Draw the figures, adding their files to ``written``, and return the report's
    sections showing them."""

    def shown(paths: list[Path]) -> list[str]:
        written.extend(paths)
        return [_figure(p) for p in _pngs(paths)]

    ranking = rank_methods(problem_scores(summary))
    text = ranking_section(ranking, shown(cd_diagram(ranking, folder)) if ranking else [])
    means = stage_means(read_stages(out, rows))
    if not means.empty:
        atomic.write_text(folder / "stages.md", stage_table(means) + "\n")
        written.append(folder / "stages.md")
        text += [
            "## Teacher–student similarity per stage",
            "",
            "Linear CKA (1 = the same representation up to rotation and scale) and NST's "
            "polynomial-kernel MMD² (0 = the same distribution of channel maps) between each "
            "student stage and its teacher stage, on the test set, mean over seeds "
            "([stages.md](report/stages.md)).",
            "",
            *shown(stage_heatmap(means, folder)),
            stage_table(means),
            "",
        ]
    hist = history(out, rows)
    cost = cost_plot(summary, folder)
    text += ["## Plots", "", *shown(accuracy_plot(summary, folder)),
             *shown(curves_plot(hist, folder))]
    losses = loss_plots(hist, folder)
    if losses:
        text += ["Loss terms per epoch, each unweighted (the weighted total differs in scale "
                 "between methods and is not shown):", ""]
    for problem, paths in losses:
        text += [f"{problem}:" if len(losses) > 1 else "", *shown(paths)]
    text += [_cost_note(rows, bool(cost)), "", *shown(cost),
             *shown(sensitivity_plots(summary, folder))]
    return text


def write_versus(out: Path, rows: pd.DataFrame, factor: str, reference: str) -> tuple[str, Path]:
    """Write ``out/report/versus-<factor>.md``: the paired top-1 change of every method
    between settings that differ only in ``factor``, against ``factor`` = ``reference``;
    return the table's text and the file's path."""
    text = versus_table(rows, factor, reference)
    path = out / "report" / f"versus-{factor}.md"
    atomic.write_text(path, text + "\n")
    return text, path
