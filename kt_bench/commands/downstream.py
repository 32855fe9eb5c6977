"""``kt-bench downstream DIR``: the downstream evaluations (linear probes, detection
fine-tuning) of a run folder's finished students, for a folder trained earlier. Each unit
resumes where it stopped; those already done are left alone.

Imported only for this command: it loads torch."""

from __future__ import annotations

import argparse
from pathlib import Path

from kt_bench.api.plugins import load_plugins
from kt_bench.commands.common import add_plugins_arg
from kt_bench.core.errors import KtBenchError
from kt_bench.sweep.config import load_grid
from kt_bench.sweep.downstream import DOWNSTREAM_CSV
from kt_bench.workflow.downstream import evaluations_of, run_for_folder


def add_parser(subparsers: argparse._SubParsersAction, help: str) -> argparse.ArgumentParser:
    """Add the ``downstream`` command, described by ``help``, to ``subparsers``."""
    parser = subparsers.add_parser("downstream", help=help)
    parser.add_argument("dir", help="a run's output folder")
    parser.add_argument("--grid", help="take the evaluations from this grid's [[downstream]] "
                                       "tables (a built-in grid or a .toml file; default: "
                                       "those recorded in DIR/downstream.json by a run)")
    parser.add_argument("--only", action="append", default=[], metavar="KEY=VALUE",
                        help="evaluate a slice: dataset=, teacher=, student=, method= or "
                             "seed= (repeatable, all must match)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda (default auto)")
    parser.add_argument("--precision", default="auto", help="auto, no, bf16 or fp16")
    parser.add_argument("--data-root", help="where the evaluations' datasets live")
    add_plugins_arg(parser)
    return parser


def run(args: argparse.Namespace) -> int:
    """Run the evaluations for every finished cell of the folder; 1 if a unit failed."""
    load_plugins(args.plugins)  # a plugin's kind, model or dataset
    evaluations = None
    if args.grid:
        evaluations = evaluations_of(load_grid(args.grid))
        if not evaluations:
            raise KtBenchError(f"grid '{args.grid}' has no [[downstream]] tables")
    out = Path(args.dir)
    rows = run_for_folder(out, evaluations, args.only, args.device, args.precision,
                          args.data_root)
    failed = [r for r in rows if r["status"] != "ok"]
    print(f"rows: {out / DOWNSTREAM_CSV}; {len(rows) - len(failed)} ok, {len(failed)} failed")
    return 1 if failed else 0
