"""The run of a grid, start to end, as ``kt-bench run`` and ``kt_bench.run`` both do it: the
grid loaded and its cells planned with the user's replacements, then trained here or
submitted as jobs (or, for a dry run, listed and checked), and the comparison table printed
and the report written.

Imported only to run a grid: it loads the engine (torch, Accelerate)."""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
from tabulate import tabulate
from tqdm.auto import tqdm

from kt_bench.api.method import METHODS, split_method_name
from kt_bench.api.plugins import load_plugins
from kt_bench.commands.common import check_could_write, check_writable
from kt_bench.commands.main import os_error_line
from kt_bench.core import atomic
from kt_bench.core.clock import CLOCK, StartupClock
from kt_bench.core.errors import ConfigError, KtBenchError
from kt_bench.core.options import Spec
from kt_bench.core.precision import resolve_precision
from kt_bench.reporting import writer
from kt_bench.reporting.corrections import check_correction
from kt_bench.reporting.downstream import with_downstream
from kt_bench.reporting.report import comparison_table
from kt_bench.sweep import launch, probe
from kt_bench.sweep.cells import Cell, check_published_teachers, expand, select
from kt_bench.sweep.config import (
    Grid,
    Pair,
    _grid_name,
    _list_of,
    check_option_tables,
    grid_from_table,
    load_grid,
)
from kt_bench.sweep.cost import ASSUMED_FLOPS, cell_flops, grid_gpu_hours
from kt_bench.sweep.manifest import write_manifest
from kt_bench.sweep.rows import forget_warnings, unreadable_row, write_results_csv
from kt_bench.sweep.runner import run_cells
from kt_bench.training.device import check_device_and_precision, make_accelerator
from kt_bench.training.hooks import say
from kt_bench.training.recipe import Recipe
from kt_bench.training.tracking import check_trackers, tracker_names
from kt_bench.workflow.downstream import (
    grid_units,
    print_units_plan,
    record_grid,
    run_after_cells,
    units_plan,
)
from kt_bench.workflow.settings import RunSettings

#: What a grid is given as: a built-in grid's name, a grid file's path, a :class:`Grid`, or a
#: table shaped like a grid file (a dict).
GridSource = str | os.PathLike | Grid | Mapping[str, Any]

#: The source that errors in a grid given from Python name, as they name a grid file.
PYTHON_SOURCE = "<python>"


@dataclass
class RunOutcome:
    """What a run did: ``code`` as ``kt-bench run`` exits (0 done; 1 a cell did not finish
    ok, a job failed or the report was not written, each said on stderr; 2 a dry run found
    problems), the output folder, the cells of the run, and for a dry run the plan (one line
    per cell with its GPU-hours) and the problems it found."""

    code: int
    out: Path
    cells: list[Cell]
    plan: pd.DataFrame | None = None
    problems: list[str] = field(default_factory=list)
    #: For a dry run, the downstream units (one line each, with its GPU-hours).
    units: pd.DataFrame | None = None


@dataclass
class _Plan:
    """What a run is asked to do, and where: the grid, its selected cells, the output folder
    and teacher cache (each with the words naming it in an error)."""

    grid: Grid
    cells: list[Cell]
    out: Path
    out_flag: str
    teacher_cache: Path
    cache_flag: str


def run_grid(grid: GridSource, settings: RunSettings) -> RunOutcome:
    """Run (or with ``dry_run``, list and check) the cells of ``grid`` with ``settings``,
    printing a line per cell and the comparison table; bad input is a one-line
    :class:`KtBenchError`."""
    forget_warnings()
    load_plugins(settings.plugins)
    CLOCK.mark("imports")
    check_correction(settings.correct, settings.flag("correct"))
    precision = resolve_precision(settings.precision, settings.device)
    check_device_and_precision(settings.device, precision)
    if settings.launcher is not None and settings.launcher not in launch.LAUNCHERS:
        raise KtBenchError(f"unknown launcher '{settings.launcher}'; accepted: "
                           f"{', '.join(launch.LAUNCHERS)}")
    plan = _plan(as_grid(grid), settings, precision)
    if settings.dry_run:
        return _dry_run(plan)
    check_writable(plan.out, plan.out_flag)
    check_writable(plan.teacher_cache, plan.cache_flag)
    trackers = tracker_names(settings.log_with, settings.flag("log_with"))
    check_trackers(trackers, settings.flag("log_with"))  # a missing library: before training
    if settings.launcher:
        code = _run_as_jobs(settings, plan, precision, trackers)
    else:
        code = _run_here(settings, plan, precision, trackers)
    return RunOutcome(code, plan.out, plan.cells)


def as_grid(grid: GridSource) -> Grid:
    """``grid`` as a validated :class:`Grid`: a built-in grid by name, a grid file by path, a
    dict read as a grid file's table would be (its errors naming ``<python>`` where a file's
    name its path), or a :class:`Grid` whose datasets and models may be given as names or
    tables (as in a grid file) rather than :class:`Spec` objects."""
    if isinstance(grid, Grid):
        return _checked(grid)
    if isinstance(grid, Mapping):
        return grid_from_table(dict(grid), PYTHON_SOURCE)
    if isinstance(grid, (str, os.PathLike)):
        return load_grid(os.fspath(grid))
    raise ConfigError(f"a grid must be a built-in grid's name, a .toml file's path, a "
                      f"kt_bench.Grid or a dict shaped like a grid file; got "
                      f"{type(grid).__name__}")


def _checked(grid: Grid) -> Grid:
    """A :class:`Grid` made in Python, its specs parsed and every part checked as a grid
    file's is (the same helpers, so that errors read alike)."""
    source = PYTHON_SOURCE if grid.source == Grid.source else grid.source
    _grid_name({"name": grid.name}, source)
    if grid.parts:
        return dataclasses.replace(grid, source=source, parts=[_checked(p) for p in grid.parts])
    table = {"datasets": grid.datasets, "pairs": grid.pairs, "methods": grid.methods,
             "seeds": grid.seeds}
    datasets = [Spec.parse(d, f"{source}: datasets")
                for d in _list_of(table, "datasets", source, object)]
    pairs = [_pair(p, f"{source}: pairs[{i}]")
             for i, p in enumerate(_list_of(table, "pairs", source, object))]
    methods = _list_of(table, "methods", source, str)
    _list_of(table, "seeds", source, int)
    check_option_tables(grid.method_options, methods, f"{source}: method_options")
    for i, pair in enumerate(pairs):
        check_option_tables(pair.method_options, methods, f"{source}: pairs[{i}].method_options")
    for key in ("recipe", "teacher_recipe"):
        recipe = getattr(grid, key)
        if not isinstance(recipe, Recipe):
            raise ConfigError(f"{source}: {key} must be a kt_bench.Recipe, got "
                              f"{type(recipe).__name__}; or give the grid as a dict")
        recipe.validate(f"{source}: {key}")
    return dataclasses.replace(grid, source=source, datasets=datasets, pairs=pairs).validate()


def _pair(pair: Any, where: str) -> Pair:
    """A :class:`Pair` of a Python grid, its teacher and student parsed as specs."""
    if not isinstance(pair, Pair):
        raise ConfigError(f"{where} must be a kt_bench.Pair, got {type(pair).__name__}")
    if pair.recipe is not None:
        if not isinstance(pair.recipe, Recipe):
            raise ConfigError(f"{where}.recipe must be a kt_bench.Recipe or None, got "
                              f"{type(pair.recipe).__name__}")
        pair.recipe.validate(f"{where}.recipe")
    return dataclasses.replace(pair, teacher=Spec.parse(pair.teacher, f"{where}.teacher"),
                               student=Spec.parse(pair.student, f"{where}.student"))


def _plan(grid: Grid, settings: RunSettings, precision: str) -> _Plan:
    """The grid with the settings' replacements, its cells selected by ``only`` (less those
    whose row may not be read here), and the folders they write to."""
    grid = apply_overrides(grid, settings)
    if settings.teacher_checkpoint and settings.teachers_dir:
        raise KtBenchError(f"give {settings.flag('teacher_checkpoint')} or "
                           f"{settings.flag('teachers_dir')}, not both")
    cells = select(expand(grid, precision, settings.teacher_checkpoint, settings.teachers_dir),
                   settings.only)
    if settings.teachers_dir:
        check_published_teachers(cells, settings.teachers_dir)
    out = Path(settings.out) if settings.out else Path("results") / grid.name
    teacher_cache = (Path(settings.teacher_cache) if settings.teacher_cache
                     else out / "teachers")
    return _Plan(grid, _without_unreadable_rows(cells, out), out,
                 f"{settings.flag('out')} folder" if settings.out else "output folder",
                 teacher_cache,
                 f"{settings.flag('teacher_cache')} folder" if settings.teacher_cache
                 else "teacher cache folder")


def _int_list(text: str, flag: str) -> list[int]:
    """``text`` (``flag``'s value) as the integers it lists, separated by commas."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise KtBenchError(f"{flag} takes integers separated by commas, got '{text}'") from None
    if not values:
        raise KtBenchError(f"{flag} needs at least one value")
    return values


def _methods(value: str | list[str], flag: str) -> list[str]:
    """The methods ``value`` names (comma-separated text or a list), ``all`` expanded to
    every registered method, each checked to be known."""
    names = value.split(",") if isinstance(value, str) else value
    methods = [m.strip() for m in names if m.strip()]
    if not methods:
        raise KtBenchError(f"{flag} needs at least one method name")
    if "all" in methods and "all" not in METHODS:  # every registered method, once
        at = methods.index("all")
        methods = list(dict.fromkeys([*methods[:at], *METHODS.names(), *methods[at + 1:]]))
    for m in methods:
        split_method_name(m)  # an unknown name is the flag's error, not the grid file's
    return methods


def _seeds(value: str | list[int], flag: str) -> list[int]:
    """The seeds ``value`` lists (comma-separated text or a list of integers), each >= 0."""
    seeds = _int_list(value, flag) if isinstance(value, str) else list(value)
    if not seeds:
        raise KtBenchError(f"{flag} needs at least one value")
    if min(seeds) < 0:
        shown = value if isinstance(value, str) else ",".join(map(str, seeds))
        raise KtBenchError(f"{flag} takes integers >= 0, got '{shown}'")
    return seeds


def apply_overrides(grid: Grid, settings: RunSettings) -> Grid:
    """``grid`` with the settings' methods, epochs (the students' and the teacher's) and seeds
    applied to every part of it."""
    methods = None
    if settings.methods is not None:  # given, even if empty: "" is no list of methods
        methods = _methods(settings.methods, settings.flag("methods"))
    for key in ("epochs", "teacher_epochs"):
        value = getattr(settings, key)
        if value is not None and value < 1:
            raise KtBenchError(f"{settings.flag(key)} must be >= 1, got {value}")
    seeds = (_seeds(settings.seeds, settings.flag("seeds")) if settings.seeds is not None
             else None)
    return grid.overridden(methods, settings.epochs, seeds, settings.teacher_epochs)


def _without_unreadable_rows(cells: list[Cell], out: Path) -> list[Cell]:
    """``cells`` less those whose row in ``out`` this user may not read (another user's):
    each is named in a line on stderr and left to the file's owner, neither run nor moved."""
    kept = []
    for cell in cells:
        error = unreadable_row(out, cell.cell_id)
        if error is None:
            kept.append(cell)
        else:
            print(f"kt-bench: warning: {error}; its cell is left to the file's owner",
                  file=sys.stderr)
    if cells and not kept:
        raise KtBenchError(f"every selected cell has a row in {out} that cannot be read "
                           "(named above); nothing to run")
    return kept


def _dry_run(plan: _Plan) -> RunOutcome:
    """List the cells with a GPU-hour estimate, then load every teacher checkpoint and build
    and set up every method and model on a probe batch; code 2 with the problems if any
    fails."""
    check_could_write(plan.out, plan.out_flag)
    check_could_write(plan.teacher_cache, plan.cache_flag)
    with probe.one_thread():
        problems = probe.check_teacher_checkpoints(plan.cells) + probe.probe_cells(plan.cells)
        table = plan_table(plan.cells, estimate=not problems)
        _print_plan(table, plan.cells, plan.out, estimate=not problems)
        units = units_plan(grid_units(plan.grid, plan.cells), plan.cells)
        print_units_plan(units)
    return RunOutcome(2 if problems else 0, plan.out, plan.cells, table, problems, units)


def plan_table(cells: list[Cell], estimate: bool) -> pd.DataFrame:
    """One line per cell: its id, dataset, teacher, student, method, seed, epochs and
    estimated GPU-hours (NaN without an ``estimate``, as the networks of some cells cannot
    be built)."""
    return pd.DataFrame(
        [(c.cell_id, c.dataset.label, c.teacher.label, c.student.label, c.method, c.seed,
          c.recipe.epochs, cell_flops(c) / ASSUMED_FLOPS / 3600 if estimate else float("nan"))
         for c in cells],
        columns=["cell", "dataset", "teacher", "student", "method", "seed", "epochs",
                 "gpu_hours"])


def _print_plan(table: pd.DataFrame, cells: list[Cell], out: Path, estimate: bool) -> None:
    """The plan (:func:`plan_table` of ``cells``) with each cell's GPU-hours and the total
    (``estimate`` False: without them)."""
    rows = [(*line[:-1], f"{line[-1]:.2f}" if estimate else "-")
            for line in table.itertuples(index=False)]
    print(tabulate(rows, headers=["cell", "dataset", "teacher", "student", "method", "seed",
                                  "epochs", "GPU-h"], tablefmt="simple", disable_numparse=True))
    print(f"{len(cells)} cells; results would go to {out}")
    if not estimate:
        print("estimate: none until the problems below are fixed")
        return
    students, teachers = grid_gpu_hours(cells)
    print(f"estimate: {students + teachers:.1f} GPU-hours ({students:.1f} students, "
          f"{teachers:.1f} teachers) at an assumed {ASSUMED_FLOPS / 1e12:.0f} TFLOP/s "
          "sustained per GPU (a rough guide, not a measurement)")


def _run_here(settings: RunSettings, plan: _Plan, precision: str,
              trackers: tuple[str, ...]) -> int:
    """Train the cells in this process (or in each process of a distributed launch), each
    cell with a run in each of ``trackers``, and, on the main process, print the table and
    write the report."""
    accelerator = make_accelerator(settings.device, precision)
    main = accelerator.is_main_process
    CLOCK.mark("plan")
    if main:
        if settings.cli:  # a process's start-up is a command's; a notebook's is long past
            CLOCK.on_done = lambda clock: _report_startup(clock, plan.out)
        write_manifest(plan.out, plan.cells)
        record_grid(plan.grid, plan.out)
        n = accelerator.num_processes
        print(f"grid '{plan.grid.name}': {len(plan.cells)} cells on {accelerator.device} "
              f"(precision {precision}, {n} process{'es' if n > 1 else ''}) -> {plan.out}",
              flush=True)
    rows = run_cells(plan.cells, plan.out, accelerator, plan.teacher_cache, settings.data_root,
                     _row_printer(len(plan.cells)) if main else None,
                     cohort=settings.cohort, compile=settings.compile, trackers=trackers,
                     fuse=settings.fuse)
    if not main:
        return 0
    write_results_csv(plan.out)  # also when every cell was done before: never a stale file
    table = pd.DataFrame(rows)
    units = (run_after_cells(plan.grid, plan.cells, table, plan.out, accelerator.device,
                             precision, settings.data_root) if settings.downstream else [])
    code = _print_results(table, plan.out, not settings.report, settings.correct)
    return max(code, _units_code(units))


def _units_code(units: list[dict]) -> int:
    """1 (said on stderr) where a downstream unit did not finish ok, else 0."""
    bad = [u for u in units if u["status"] != "ok"]
    if bad:
        names = ", ".join(f"{u['unit']} of {u['method']} seed {u['seed']}" for u in bad)
        print(f"kt-bench: {len(bad)} downstream unit(s) did not finish ok: {names} (errors "
              "in downstream.csv)", file=sys.stderr)
    return 1 if bad else 0


def _row_printer(total: int) -> Callable[[int, dict], None]:
    """A line per finished cell of ``total``: its top-1, or its status and error (on stdout
    at once, as the progress lines)."""
    def on_row(i: int, row: dict) -> None:
        if row["status"] == "ok":
            say(f"[{i + 1}/{total}] {row['method']:<14} seed {row['seed']}: "
                f"top1 {row['top1']:.2f}  (teacher {row['teacher_top1']:.2f}, "
                f"{row['wall_s']:.1f} s)")
        else:
            say(f"[{i + 1}/{total}] {row['method']:<14} seed {row['seed']}: "
                f"{row['status']}: {row['error']}")
    return on_row


def _report_startup(clock: StartupClock, out: Path) -> None:
    """Print where the run's time went before its first step and keep it in
    ``<out>/startup.json`` (seconds of each phase; a file that cannot be written is a line
    on stderr, and the run goes on)."""
    tqdm.write(clock.summary())
    try:
        atomic.write_json(out / "startup.json", {
            "phases": [{"phase": p, "seconds": t} for p, t in clock.phases().items()],
            "first_step_s": clock.elapsed})
    except (KtBenchError, OSError) as exc:  # the timing alone is lost, not the cells training
        line = str(exc) if isinstance(exc, KtBenchError) else os_error_line(exc)
        tqdm.write(f"kt-bench: startup.json not written: {line}", file=sys.stderr)


def _run_as_jobs(settings: RunSettings, plan: _Plan, precision: str,
                 trackers: tuple[str, ...]) -> int:
    """Submit the unfinished cells as jobs (one per cohort, each cell with a run in each of
    ``trackers``) and, unless told not to wait, wait for them and print the table."""
    cfg = launch.launcher_config(plan.grid.launcher,
                                 {k: getattr(settings, k) for k in launch.LAUNCHER_KEYS})
    settings_of_jobs = launch.JobSettings(
        str(plan.out.resolve()), str(plan.teacher_cache.resolve()),
        str(Path(settings.data_root).resolve()) if settings.data_root else None,
        settings.device, precision, settings.compile,
        [str(Path(p).resolve()) for p in settings.plugins], trackers, settings.fuse)
    record_grid(plan.grid, plan.out)
    submitted = launch.submit_cells(plan.cells, settings.launcher, cfg, settings_of_jobs,
                                    cohort=settings.cohort)
    print(f"grid '{plan.grid.name}': {len(plan.cells)} cells, {submitted.done_before} already "
          f"done; submitted {len(submitted.jobs)} {settings.launcher} job(s) (job files in "
          f"{plan.out / 'jobs'}); progress: kt-bench status {plan.out}", flush=True)
    if not settings.wait:
        return 0
    problems = launch.wait(submitted.jobs)
    for line in problems:
        print(f"kt-bench: {line}", file=sys.stderr)
    rows, missing = launch.rows_of(plan.cells, plan.out)
    if settings.downstream:
        _say_units_left(plan)
    if missing:
        print(f"kt-bench: {missing} cell(s) have no row; see kt-bench status {plan.out}",
              file=sys.stderr)
    code = (_print_results(rows, plan.out, not settings.report, settings.correct)
            if not rows.empty else 1)
    return 1 if missing or problems else code


def _say_units_left(plan: _Plan) -> None:
    """Where cluster jobs trained the cells, their downstream units are not run by the
    waiting process (a login node): say how to run them."""
    units = grid_units(plan.grid, plan.cells)
    if units:
        print(f"kt-bench: {len(units)} downstream unit(s) are not run by cluster jobs; run "
              f"kt-bench downstream {plan.out} where the accelerator is", file=sys.stderr)


def _print_results(df: pd.DataFrame, out: Path, no_report: bool, correct: str) -> int:
    """Print the comparison table, write the report (unless ``no_report``), both with their
    changes against the student corrected by ``correct``; 1 if a cell did not finish ok or
    the report could not be written (one line on stderr; the table and the rows stand)."""
    print()
    print(comparison_table(with_downstream(df, out), correct=correct))
    report, unwritten = None, None
    if not no_report:
        try:
            report = writer.write_report(out, correct=correct)
        except (KtBenchError, OSError) as exc:  # the table and the rows stand without it
            unwritten = str(exc) if isinstance(exc, KtBenchError) else os_error_line(exc)
    print(f"\nrows: {out / 'results.csv'}" + (f"; report: {report}" if report else ""))
    if unwritten:
        print(f"kt-bench: the report was not written: {unwritten}", file=sys.stderr)
    bad = df[~df["status"].isin(["ok", "n/a"])]  # n/a: the method does not apply, as published
    if not bad.empty:
        names = ", ".join(f"{r.method} seed {r.seed} ({r.status})" for r in bad.itertuples())
        print(f"kt-bench: {len(bad)} cell(s) did not finish ok: {names}", file=sys.stderr)
        return 1
    return 1 if unwritten else 0
