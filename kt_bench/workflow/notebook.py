"""The Python API, for notebooks and scripts: :func:`run` a grid and get its result rows as a
DataFrame, :func:`report` a run folder and get its comparison table. Both do what the
commands of the same names do, and raise a one-line :class:`KtBenchError` for bad input.

Light to import (no torch): :func:`run` loads the engine when called."""

from __future__ import annotations

import contextlib
import io
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from kt_bench.core.errors import KtBenchError
from kt_bench.reporting.corrections import CORRECTIONS, check_correction
from kt_bench.sweep.rows import read_rows
from kt_bench.workflow.settings import settings_from_keywords

if TYPE_CHECKING:
    from kt_bench.sweep.cells import Cell
    from kt_bench.workflow.run import GridSource


@contextlib.contextmanager
def _quiet(quiet: bool) -> Iterator[None]:
    """Within the block, with ``quiet``, nothing is printed on stdout (stderr is left)."""
    if not quiet:
        yield
        return
    with contextlib.redirect_stdout(io.StringIO()):
        yield


def _check_quiet(quiet: Any, who: str) -> bool:
    """``quiet`` checked to be a bool (None: False)."""
    if quiet is None:
        return False
    if not isinstance(quiet, bool):
        raise KtBenchError(f"{who}: quiet = {quiet!r} is invalid; accepted: True or False")
    return quiet


def run(grid: GridSource, **settings: Any) -> pd.DataFrame:
    """Run the cells of ``grid`` as ``kt-bench run`` does (resuming: finished cells are not
    trained again) and return their result rows, with the columns of ``results.csv``.

    ``grid``: a built-in grid's name, a ``.toml`` file's path, a :class:`kt_bench.Grid`, or a
    dict shaped like a grid file's table (checked as a file is, errors naming ``<python>``).

    ``settings``: the flags of ``kt-bench run`` by their names in snake_case, with the same
    defaults (``--no-cohort`` is ``cohort=False``, ``--no-fuse`` ``fuse=False``,
    ``--no-report`` ``report=False``,
    ``--no-wait`` ``wait=False``): ``out``, ``methods`` (a list or comma-separated text),
    ``epochs``, ``teacher_epochs``, ``seeds`` (a list, an integer or text), ``device``,
    ``precision``, ``cohort``, ``fuse``, ``compile``, ``teacher_cache``, ``data_root``, ``only``
    (``"key=value"``, a list of them or a dict), ``teacher_checkpoint``, ``teachers_dir``,
    ``dry_run``, ``log_with``, ``report``, ``correct``, ``launcher``, ``wait``, the
    ``[launcher]`` keys (``partition``, ``gpus_per_job``, ...) and ``plugins``; and
    ``quiet=True`` to print nothing on stdout. None leaves a setting's default.

    With ``dry_run=True`` nothing trains: the cells are checked and returned, one line each
    with its estimated GPU-hours; problems raise a :class:`KtBenchError`.
    """
    who = "kt_bench.run"
    quiet = _check_quiet(settings.get("quiet", False), who)
    chosen = settings_from_keywords(settings, who, extra=("quiet",))
    from kt_bench.workflow.run import run_grid  # here: it loads the engine (torch)

    with _quiet(quiet):
        outcome = run_grid(grid, chosen)
    if outcome.problems:
        more = (f" (and {len(outcome.problems) - 1} more)" if len(outcome.problems) > 1
                else "")
        raise KtBenchError(f"the dry run found a problem: {outcome.problems[0]}{more}")
    if outcome.plan is not None:
        return outcome.plan
    return grid_rows(outcome.out, outcome.cells)


def grid_rows(out: Path, cells: list[Cell]) -> pd.DataFrame:
    """The rows of ``cells`` in run folder ``out``, in the order of ``cells``, with the
    columns of ``results.csv`` (a cell without a row has no line)."""
    rows = read_rows(out)
    order = {cell.cell_id: i for i, cell in enumerate(cells)}
    rows = rows[rows["cell_id"].isin(order)]
    return rows.sort_values("cell_id", key=lambda ids: ids.map(order)).reset_index(drop=True)


def report(folder: str | os.PathLike, *, versus: str | None = None,
           with_run: str | os.PathLike | None = None, correct: str = CORRECTIONS[0],
           quiet: bool = False) -> pd.DataFrame:
    """Write the tables, plots and ``report.md`` of run folder ``folder`` as
    ``kt-bench report`` does (``versus``: its ``--versus FIELD=REFERENCE``; ``with_run``: its
    ``--with-run DIR``, another run folder's rows to compare with; ``correct``: its
    ``--correct``, ``"holm"``, ``"bh"`` or ``"none"``) and return the comparison table: one
    line per configuration (dataset, teacher, student, method and options) with its seeds,
    mean top-1 and its std, the paired change against ``student`` (``delta`` with its
    interval ``delta_lo``..``delta_hi`` at level ``ci_level``, the paired t-test's ``p`` and
    the corrected ``p_adj``), teacher top-1, cost and the published figures, as
    ``report/summary.csv`` holds it."""
    who = "kt_bench.report"
    if not isinstance(folder, (str, os.PathLike)):
        raise KtBenchError(f"{who}: folder = {folder!r} is invalid; accepted: a path (str or "
                           "os.PathLike)")
    if versus is not None and not isinstance(versus, str):
        raise KtBenchError(f"{who}: versus = {versus!r} is invalid; accepted: "
                           "'FIELD=REFERENCE', e.g. 'precision=no'")
    if with_run is not None and not isinstance(with_run, (str, os.PathLike)):
        raise KtBenchError(f"{who}: with_run = {with_run!r} is invalid; accepted: a path (str "
                           "or os.PathLike)")
    check_correction(correct, f"{who}: correct =")
    from kt_bench.commands import report as command  # the command itself, not a copy of it
    from kt_bench.commands.main import build_parser
    from kt_bench.reporting import writer  # here: it loads matplotlib

    argv = ["report", *([f"--versus={versus}"] if versus is not None else []),
            *([f"--with-run={os.fspath(with_run)}"] if with_run is not None else []),
            f"--correct={correct}", "--", os.fspath(folder)]
    with _quiet(_check_quiet(quiet, who)):
        command.run(build_parser(["report"]).parse_args(argv))
    return writer.report_summary(Path(folder), read_rows(Path(folder)), correct)
