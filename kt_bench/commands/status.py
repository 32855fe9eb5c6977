"""``kt-bench status DIR``: where each cell of a run folder stands. Light to import (no
torch): it reads only the files the runners write."""

from __future__ import annotations

import argparse
from pathlib import Path

from kt_bench.reporting.status import cell_states, format_status, teacher_states
from kt_bench.sweep.rows import forget_warnings


def add_parser(subparsers: argparse._SubParsersAction, help: str) -> argparse.ArgumentParser:
    """Add the ``status`` command, described by ``help``, to ``subparsers``."""
    parser = subparsers.add_parser("status", help=help)
    parser.add_argument("dir", help="a run's output folder")
    return parser


def run(args: argparse.Namespace) -> int:
    """Show done, running (with each one's epoch and time left), interrupted, pending and
    failed cells of a run folder, and the teachers being trained for it."""
    forget_warnings()
    out = Path(args.dir)
    teachers = teacher_states(out)
    print(format_status(cell_states(out, teachers), teachers))
    return 0
