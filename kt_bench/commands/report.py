"""``kt-bench report DIR``: a run folder's tables, plots and ``report.md``, and its comparison
table printed. Light to import (no torch): it reads only the rows the runners write."""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

from kt_bench.commands.common import check_writable
from kt_bench.core.errors import KtBenchError
from kt_bench.reporting import writer
from kt_bench.reporting.corrections import CORRECTIONS
from kt_bench.reporting.downstream import with_downstream
from kt_bench.reporting.report import comparison_table
from kt_bench.sweep.rows import forget_warnings, read_rows, write_results_csv

#: The settings ``--versus`` may compare.
VERSUS_FIELDS = ("precision", "fused")


def add_parser(subparsers: argparse._SubParsersAction, help: str) -> argparse.ArgumentParser:
    """Add the ``report`` command, described by ``help``, to ``subparsers``."""
    parser = subparsers.add_parser("report", help=help)
    parser.add_argument("dir", help="a run's output folder")
    parser.add_argument("--versus", metavar="FIELD=REFERENCE",
                        help="also the paired top-1 change of every method between settings "
                             "that differ only in FIELD, against FIELD=REFERENCE (e.g. "
                             "precision=no: bf16 against fp32; fused=False: a fused cohort "
                             "against the same grid run with --no-fuse, given by --with-run)")
    parser.add_argument("--with-run", metavar="DIR",
                        help="another run folder whose rows --versus compares with this "
                             "folder's (its files are only read)")
    parser.add_argument("--correct", choices=CORRECTIONS, default=CORRECTIONS[0],
                        help="how the changes against student in one table are corrected for "
                             "being many: holm (family-wise error, the default), bh "
                             "(Benjamini-Hochberg false discovery rate) or none")
    return parser


def run(args: argparse.Namespace) -> int:
    """Write the tables and plots of a run folder and print its comparison table."""
    forget_warnings()
    out = Path(args.dir)
    if not list((out / "cells").glob("*/result.json")):
        raise KtBenchError(f"{out} holds no results (no cells/*/result.json); give a run's "
                           "--out folder")
    check_writable(out, "run folder")
    check_writable(out / "report", "report folder")
    rows = write_results_csv(out)  # rebuilt from the cells' rows, never left stale
    if args.with_run:
        if not args.versus:
            raise KtBenchError("--with-run DIR adds another run's rows to --versus; give "
                               "--versus FIELD=REFERENCE too")
        other = Path(args.with_run)
        if not list((other / "cells").glob("*/result.json")):
            raise KtBenchError(f"--with-run {other}: it holds no results "
                               "(no cells/*/result.json)")
        compared = pd.concat([rows, read_rows(other)], ignore_index=True)
    else:
        compared = rows
    versus = versus_arg(args.versus, compared) if args.versus else None
    print(comparison_table(with_downstream(rows, out), correct=args.correct))
    print(f"\nreport: {writer.write_report(out, rows, args.correct)}")
    if versus:
        factor, reference = versus
        text, path = writer.write_versus(out, compared, factor, reference)
        print(f"\nthe paired change of each method's top-1 with {factor} against "
              f"{factor}={reference}:\n{text}\n\n{path}")
    return 0


def versus_arg(text: str, rows: pd.DataFrame) -> tuple[str, str]:
    """``--versus FIELD=REFERENCE`` as (field, reference), checked against the rows."""
    factor, sep, reference = text.partition("=")
    if not sep or factor not in VERSUS_FIELDS or not reference:
        raise KtBenchError(f"--versus takes FIELD=REFERENCE with FIELD one of "
                           f"{', '.join(VERSUS_FIELDS)} (e.g. precision=no), got '{text}'")
    present = (sorted(map(str, rows[factor].dropna().unique())) if factor in rows else [])
    if reference not in present:
        raise KtBenchError(f"--versus {text}: no row ran with {factor}={reference}; the rows "
                           f"have {factor} {', '.join(present) or 'none'}")
    return factor, reference
