"""``kt-bench list KIND``: the registered methods, models or datasets, or the built-in grids,
as a table."""

from __future__ import annotations

import argparse

from tabulate import tabulate

from kt_bench.commands.common import add_plugins_arg
from kt_bench.core.errors import KtBenchError

LIST_KINDS = ("methods", "models", "datasets", "grids")

Table = tuple[list[tuple[str, ...]], list[str]]


def add_parser(subparsers: argparse._SubParsersAction, help: str) -> argparse.ArgumentParser:
    """Add the ``list`` command, described by ``help``, to ``subparsers``."""
    parser = subparsers.add_parser("list", help=help)
    parser.add_argument("kind", choices=LIST_KINDS)
    parser.add_argument("pattern", nargs="?", default=None,
                        help="models: the names of a family matching a shell-style pattern, "
                             "e.g. 'timm:vit_*'")
    add_plugins_arg(parser)
    return parser


def run(args: argparse.Namespace) -> int:
    """Print the registered methods, models, datasets or grids."""
    if args.kind != "grids":  # a plugin may add to any of them; grids are read as text
        # here: plugins are Python that imports torch, which listing grids never needs
        from kt_bench.api.plugins import load_plugins

        load_plugins(args.plugins)
    if args.pattern is not None and args.kind != "models":
        raise KtBenchError(f"list {args.kind} takes no pattern; accepted: list models "
                           "'PREFIX:PATTERN' (e.g. 'timm:vit_*')")
    if args.pattern is not None:
        rows, headers = _family_names(args.pattern)
    else:
        tables = {"methods": _methods, "models": _models, "datasets": _datasets,
                  "grids": _grids}
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
    """Each model: its parameter count for 10 and 1000 classes and what it is; then each
    family of models (timm's) in one row: how many, and how to see their names."""
    # here and below: each kind's modules (the networks, the datasets) load for it alone
    from kt_bench.models import MODELS, build_model, count_parameters

    rows = [(n, *(f"{count_parameters(build_model(n, k)) / 1e6:.3f}M" for k in (10, 1000)),
             _summary(b)) for n, b in MODELS.items()]
    for family in MODELS.families():
        count = len(family.names("*"))
        rows.append((f"{family.prefix}:<name>", f"{count} models" if count else "-", "",
                     family.about))
    return rows, ["model", "params, 10 classes", "1000 classes", "what"]


def _family_names(pattern: str) -> Table:
    """The names of the family ``pattern`` names (``PREFIX:PATTERN``) that match it."""
    from kt_bench.models import MODELS

    prefix, colon, rest = pattern.partition(":")
    families = {f.prefix: f for f in MODELS.families()}
    if not colon or prefix not in families:
        raise KtBenchError(f"pattern '{pattern}' names no family of models; accepted: "
                           f"{', '.join(f'{p}:PATTERN' for p in families) or '(none)'}")
    if not families[prefix].names("*"):
        raise KtBenchError(f"no {prefix} models are available here: {families[prefix].about}")
    names = families[prefix].names(rest or "*")
    if not names:
        raise KtBenchError(f"no {prefix} model matches '{rest}' ({families[prefix].about})")
    return [(f"{prefix}:{n}",) for n in names], ["model"]


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
