"""``kt-bench report``: a run folder's rows -> tables, plots and a ``report.md`` linking them."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from kt_bench.core import atomic
from kt_bench.core.precision import describe_precision
from kt_bench.reporting.plots import accuracy_plot, cost_plot, curves_plot, sensitivity_plots
from kt_bench.reporting.report import (
    CONFIDENCE,
    display_table,
    latex_pivot,
    load_reference,
    markdown_pivot,
    summarise,
    versus_table,
)
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


def write_report(out: Path, rows: pd.DataFrame | None = None) -> Path:
    """Write ``out/report.md`` and, under ``out/report/``, the tables (``table.md``,
    ``table.tex``, ``summary.csv``) and plots (PNG and PDF); return the report's path."""
    rows = read_rows(out) if rows is None else rows
    summary = summarise(rows, load_reference())
    folder = out / "report"
    folder.mkdir(parents=True, exist_ok=True)
    if summary.empty:  # every row left out (named in warnings) or none finished
        long_md = pivot_md = latex = NO_RESULTS
    else:
        long_md = display_table(summary).to_markdown(index=False)
        pivot_md = markdown_pivot(summary)
        latex = latex_pivot(summary)
    atomic.write_text(folder / "table.md", pivot_md + "\n\n" + long_md + "\n")
    atomic.write_text(folder / "table.tex", latex + "\n")
    atomic.write_text(folder / "summary.csv", summary.to_csv(index=False))
    plots = [] if summary.empty else [
        *accuracy_plot(summary, folder), *curves_plot(rows, out, folder),
        *cost_plot(summary, folder), *sensitivity_plots(summary, folder)]
    pngs = [p for p in plots if p.suffix == ".png"]
    counts = rows["status"].value_counts().to_dict()
    grids = ", ".join(sorted(map(str, rows["grid"].dropna().unique())))
    text = [
        f"# Report: {grids}",
        "",
        f"{len(rows)} cells: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) + ".",
        "",
        f"Arithmetic: {precision_text(rows)}.",
        "",
        "## Comparison",
        "",
        "Top-1 accuracy (%) at the last epoch, mean ± std over seeds; in brackets the change "
        f"against the `student` baseline, paired by seed ({CONFIDENCE:.0%} t-interval in the "
        "long table; † where that interval spans zero, i.e. not significant). The best mean "
        "of each column is in bold. `paper` is the published figure where one exists "
        "(`n/a`: a published row without a figure, because it could not be read where this "
        "harness was built or the paper prints N/A; `(best epoch)`: only a best-epoch figure "
        "was published, as mdistiller reports).",
        "",
        pivot_md,
        "",
        "## All figures",
        "",
        long_md,
        "",
        "Files: [table.md](report/table.md), [table.tex](report/table.tex), "
        "[summary.csv](report/summary.csv), [results.csv](results.csv).",
        "",
        "## Plots",
        "",
        *[f"![{p.stem}](report/{p.name}) ([PDF](report/{p.stem}.pdf))\n" for p in pngs],
    ]
    path = out / "report.md"
    atomic.write_text(path, "\n".join(text))
    return path


def write_versus(out: Path, rows: pd.DataFrame, factor: str, reference: str) -> tuple[str, Path]:
    """Write ``out/report/versus-<factor>.md``: the paired top-1 change of every method
    between settings that differ only in ``factor``, against ``factor`` = ``reference``;
    return the table's text and the file's path."""
    text = versus_table(rows, factor, reference)
    path = out / "report" / f"versus-{factor}.md"
    atomic.write_text(path, text + "\n")
    return text, path
