"""``kt-bench list KIND``: the registered methods, models or datasets, or the built-in grids,
as a table."""

from __future__ import annotations

import argparse

from tabulate import tabulate

from kt_bench.commands.common import add_plugins_arg

LIST_KINDS = ("methods", "models", "datasets", "grids")

Table = tuple[list[tuple[str, ...]], list[str]]


def add_parser(subparsers: argparse._SubParsersAction, help: str) -> argparse.ArgumentParser:
    """Add the ``list`` command, described by ``help``, to ``subparsers``."""
    parser = subparsers.add_parser("list", help=help)
    parser.add_argument("kind", choices=LIST_KINDS)
    add_plugins_arg(parser)
    return parser


def run(args: argparse.Namespace) -> int:
    """Print the registered methods, models, datasets or grids."""
    if args.kind != "grids":  # a plugin may add to any of them; grids are read as text
        # here: plugins are Python that imports torch, which listing grids never needs
        from kt_bench.api.plugins import load_plugins

        load_plugins(args.plugins)
    tables = {"methods": _methods, "models": _models, "datasets": _datasets, "grids": _grids}
    rows, headers = tables[args.kind]()
    print(tabulate(rows, headers=headers, tablefmt="simple", disable_numparse=True))
    return 0


def _summary(obj: object) -> str:
    """The first line of ``obj``'s docstring."""
    doc = (getattr(obj, "__doc__", None) or "").strip()
    return doc.splitlines()[0] if doc else ""


def _methods() -> Table:
    """Each method: its default weight, the taps it reads and what it is."""
    from kt_bench.api.method import METHODS

    def taps(cls) -> str:
        try:
            return ", ".join(cls().taps) or "-"
        except Exception:  # noqa: BLE001 - a plugin whose options have no defaults
            return "(set by its options)"

    rows = [(n, c.default_weight, taps(c), _summary(c)) for n, c in METHODS.items()]
    return rows, ["method", "default weight", "taps", "what"]


def _models() -> Table:
    """Each model: its parameter count for 10 and 1000 classes and what it is."""
    # here and below: each kind's modules (the networks, the datasets) load for it alone
    from kt_bench.models import MODELS, build_model, count_parameters

    rows = [(n, *(f"{count_parameters(build_model(n, k)) / 1e6:.3f}M" for k in (10, 1000)),
             _summary(b)) for n, b in MODELS.items()]
    return rows, ["model", "params, 10 classes", "1000 classes", "what"]


def _datasets() -> Table:
    """Each dataset and what it is."""
    from kt_bench.data import DATASETS

    return [(n, _summary(b)) for n, b in DATASETS.items()], ["dataset", "what"]


def _grids() -> Table:
    """Each built-in grid: its number of cells and what it is (read without the registries:
    ``run --dry-run`` checks a grid's names and options)."""
    from kt_bench.sweep.cells import count_cells
    from kt_bench.sweep.config import builtin_grids, load_grid

    grids = ((n, load_grid(str(p), validate=False)) for n, p in builtin_grids().items())
    rows = [(name, count_cells(grid), grid.description) for name, grid in grids]
    return rows, ["grid", "cells", "what"]
