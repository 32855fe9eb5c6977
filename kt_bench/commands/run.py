"""``kt-bench run``: a grid's cells trained here or submitted as jobs (``--launcher``), or
listed and checked (``--dry-run``), and the comparison table printed.

Imported only for this command: it loads the engine (torch, Accelerate)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from tabulate import tabulate
from tqdm.auto import tqdm

from kt_bench.api.method import METHODS, split_method_name
from kt_bench.api.plugins import load_plugins
from kt_bench.commands.common import add_plugins_arg, check_could_write, check_writable
from kt_bench.commands.main import os_error_line
from kt_bench.core import atomic
from kt_bench.core.clock import CLOCK, StartupClock
from kt_bench.core.errors import KtBenchError
from kt_bench.core.precision import resolve_precision
from kt_bench.reporting import writer
from kt_bench.reporting.report import comparison_table
from kt_bench.sweep import launch, probe
from kt_bench.sweep.cells import Cell, check_published_teachers, expand, select
from kt_bench.sweep.config import Grid, load_grid
from kt_bench.sweep.cost import ASSUMED_FLOPS, cell_flops, grid_gpu_hours
from kt_bench.sweep.manifest import write_manifest
from kt_bench.sweep.rows import forget_warnings, unreadable_row, write_results_csv
from kt_bench.sweep.runner import run_cells
from kt_bench.training.device import check_device_and_precision, make_accelerator


def add_parser(subparsers: argparse._SubParsersAction, help: str) -> argparse.ArgumentParser:
    """Add the ``run`` command, described by ``help``, to ``subparsers``."""
    parser = subparsers.add_parser("run", help=help)
    _add_grid_options(parser)
    _add_training_options(parser)
    _add_teacher_and_output_options(parser)
    _add_cluster_options(parser)
    add_plugins_arg(parser)
    return parser


def _add_grid_options(p: argparse.ArgumentParser) -> None:
    """The grid and what replaces parts of it: --grid, --out, --methods, --epochs, --seeds."""
    p.add_argument("--grid", required=True, help="a built-in grid name or a .toml file")
    p.add_argument("--out", help="output folder (default: results/<grid>)")
    p.add_argument("--methods", help="comma-separated methods replacing the grid's "
                                     "('all': every registered method)")
    p.add_argument("--epochs", type=int, help="student epochs replacing the recipe's")
    p.add_argument("--seeds", help="comma-separated seeds replacing the grid's")


def _add_training_options(p: argparse.ArgumentParser) -> None:
    """How and where cells train: device, precision, cohorts, compilation, caches, data."""
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (default auto)")
    p.add_argument("--precision", default="auto",
                   help="auto, no, bf16 or fp16 (default auto: bf16 autocast on CUDA, "
                        "full precision on the CPU)")
    p.add_argument("--no-cohort", action="store_true",
                   help="train every cell alone (default: cells that differ only in "
                        "method train together, one teacher pass for all)")
    p.add_argument("--compile", action="store_true",
                   help="run students and teacher through torch.compile (pays off on "
                        "long runs on a GPU; results match closely, not bit for bit)")
    p.add_argument("--teacher-cache", help="teacher cache folder (default: <out>/teachers)")
    p.add_argument("--data-root", help="where datasets are stored or downloaded")


def _add_teacher_and_output_options(p: argparse.ArgumentParser) -> None:
    """A slice of the grid, where teachers come from, and what the run prints and writes."""
    p.add_argument("--only", action="append", default=[], metavar="KEY=VALUE",
                   help="run a slice: dataset=, teacher=, student=, method= or seed= "
                        "(comma-separated values; repeatable, all must match)")
    p.add_argument("--teacher-checkpoint", metavar="PATH",
                   help="load the teacher from this checkpoint instead of training it")
    p.add_argument("--teachers-dir", metavar="DIR",
                   help="the unpacked published teachers of RepDistiller/mdistiller "
                        "(<name>_vanilla/ckpt_epoch_240.pth): every pair's teacher is "
                        "loaded from there instead of trained")
    p.add_argument("--dry-run", action="store_true",
                   help="list the cells with a GPU-hour estimate and stop")
    p.add_argument("--log-with", metavar="TRACKER",
                   help="log per-step loss terms with an Accelerate tracker, e.g. "
                        "tensorboard (written under <out>/tracking)")
    p.add_argument("--no-report", action="store_true",
                   help="skip writing report.md, tables and plots at the end")


def _add_cluster_options(p: argparse.ArgumentParser) -> None:
    """--launcher and the ``[launcher]`` keys a command line may replace."""
    cluster = p.add_argument_group(
        "cluster jobs", "with --launcher, each cohort (or cell, with --no-cohort) runs as a "
        "job through submitit; the other flags replace the grid's [launcher] keys")
    cluster.add_argument("--launcher", choices=launch.LAUNCHERS,
                         help="submit jobs to Slurm, or run them as local processes")
    cluster.add_argument("--no-wait", action="store_true",
                         help="return once the jobs are submitted (see kt-bench status)")
    cluster.add_argument("--partition", help="Slurm partition")
    cluster.add_argument("--gpus-per-job", type=int, help="GPUs per job, one process each "
                                                          "(default 1)")
    cluster.add_argument("--cpus-per-job", type=int, help="CPUs per job (default 8)")
    cluster.add_argument("--mem-gb", type=int, help="memory per job in GB (default: the "
                                                    "partition's)")
    cluster.add_argument("--time-min", type=int, help="time limit per job in minutes "
                                                      "(default 1440)")
    cluster.add_argument("--array-parallelism", type=int,
                         help="jobs of the array running at once (default 64)")
    cluster.add_argument("--max-array-size", type=int,
                         help="jobs per array at most, the cluster's MaxArraySize (default "
                              "1000); more are submitted as further arrays")
    cluster.add_argument("--account", help="Slurm account")
    cluster.add_argument("--qos", help="Slurm QOS")


@dataclass
class _Plan:
    """What the command line asks to run, and where: the grid, its selected cells, the output
    folder and teacher cache (each with the words naming it in an error)."""

    grid: Grid
    cells: list[Cell]
    out: Path
    out_flag: str
    teacher_cache: Path
    cache_flag: str


def run(args: argparse.Namespace) -> int:
    """Run (or with --dry-run, list and check) the cells of a grid and print the comparison
    table."""
    forget_warnings()
    load_plugins(args.plugins)
    CLOCK.mark("imports")
    precision = resolve_precision(args.precision, args.device)
    check_device_and_precision(args.device, precision)
    plan = _plan(args, precision)
    if args.dry_run:
        return _dry_run(plan)
    check_writable(plan.out, plan.out_flag)
    check_writable(plan.teacher_cache, plan.cache_flag)
    log_with = None if args.log_with in (None, "none") else args.log_with
    if args.launcher:
        return _run_as_jobs(args, plan, precision, log_with)
    return _run_here(args, plan, precision, log_with)


def _plan(args: argparse.Namespace, precision: str) -> _Plan:
    """The grid with the command line's replacements, its cells selected by --only (less
    those whose row may not be read here), and the folders they write to."""
    grid = _apply_overrides(load_grid(args.grid), args)
    if args.teacher_checkpoint and args.teachers_dir:
        raise KtBenchError("give --teacher-checkpoint or --teachers-dir, not both")
    cells = select(expand(grid, precision, args.teacher_checkpoint, args.teachers_dir),
                   args.only)
    if args.teachers_dir:
        check_published_teachers(cells, args.teachers_dir)
    out = Path(args.out) if args.out else Path("results") / grid.name
    teacher_cache = Path(args.teacher_cache) if args.teacher_cache else out / "teachers"
    return _Plan(grid, _without_unreadable_rows(cells, out), out,
                 "--out folder" if args.out else "output folder", teacher_cache,
                 "--teacher-cache folder" if args.teacher_cache else "teacher cache folder")


def _int_list(text: str, flag: str) -> list[int]:
    """``text`` (``flag``'s value) as the integers it lists, separated by commas."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise KtBenchError(f"{flag} takes integers separated by commas, got '{text}'") from None
    if not values:
        raise KtBenchError(f"{flag} needs at least one value")
    return values


def _apply_overrides(grid: Grid, args: argparse.Namespace) -> Grid:
    """``grid`` with --methods, --epochs and --seeds applied to every part of it."""
    methods = None
    if args.methods is not None:  # given, even if empty: "" is no list of methods
        methods = [m.strip() for m in args.methods.split(",") if m.strip()]
        if not methods:
            raise KtBenchError("--methods needs at least one method name")
        if "all" in methods and "all" not in METHODS:  # every registered method, once
            at = methods.index("all")
            methods = list(dict.fromkeys([*methods[:at], *METHODS.names(), *methods[at + 1:]]))
        for m in methods:
            split_method_name(m)  # an unknown name is the flag's error, not the grid file's
    if args.epochs is not None and args.epochs < 1:
        raise KtBenchError(f"--epochs must be >= 1, got {args.epochs}")
    seeds = _int_list(args.seeds, "--seeds") if args.seeds is not None else None
    if seeds is not None and min(seeds) < 0:
        raise KtBenchError(f"--seeds takes integers >= 0, got '{args.seeds}'")
    return grid.overridden(methods, args.epochs, seeds)


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


def _dry_run(plan: _Plan) -> int:
    """List the cells with a GPU-hour estimate, then load every teacher checkpoint and build
    and set up every method and model on a probe batch; 2 (each problem a line on stderr)
    if any fails."""
    check_could_write(plan.out, plan.out_flag)
    check_could_write(plan.teacher_cache, plan.cache_flag)
    with probe.one_thread():
        problems = probe.check_teacher_checkpoints(plan.cells) + probe.probe_cells(plan.cells)
        _print_plan(plan.cells, plan.out, estimate=not problems)
    for line in problems:
        print(f"kt-bench: error: {line}", file=sys.stderr)
    return 2 if problems else 0


def _print_plan(cells: list[Cell], out: Path, estimate: bool) -> None:
    """The cells as a table with each one's GPU-hours and the total (``estimate`` False:
    without them, as the networks of some cells cannot be built)."""
    def hours(cell: Cell) -> str:
        return f"{cell_flops(cell) / ASSUMED_FLOPS / 3600:.2f}" if estimate else "-"

    rows = [(c.cell_id, c.dataset.label, c.teacher.label, c.student.label, c.method, c.seed,
             c.recipe.epochs, hours(c)) for c in cells]
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


def _run_here(args: argparse.Namespace, plan: _Plan, precision: str,
              log_with: str | None) -> int:
    """Train the cells in this process (or in each process of a distributed launch) and, on
    the main process, print the table and write the report."""
    accelerator = make_accelerator(args.device, precision, log_with,
                                   str(plan.out / "tracking") if log_with else None)
    main = accelerator.is_main_process
    CLOCK.mark("plan")
    if main:
        CLOCK.on_done = lambda clock: _report_startup(clock, plan.out)
        write_manifest(plan.out, plan.cells)
        n = accelerator.num_processes
        print(f"grid '{plan.grid.name}': {len(plan.cells)} cells on {accelerator.device} "
              f"(precision {precision}, {n} process{'es' if n > 1 else ''}) -> {plan.out}",
              flush=True)
    rows = run_cells(plan.cells, plan.out, accelerator, plan.teacher_cache, args.data_root,
                     _row_printer(len(plan.cells)) if main else None,
                     cohort=not args.no_cohort, compile=args.compile)
    if not main:
        return 0
    write_results_csv(plan.out)  # also when every cell was done before: never a stale file
    return _print_results(pd.DataFrame(rows), plan.out, args.no_report)


def _row_printer(total: int) -> Callable[[int, dict], None]:
    """A line per finished cell of ``total``: its top-1, or its status and error."""
    def on_row(i: int, row: dict) -> None:
        if row["status"] == "ok":
            tqdm.write(f"[{i + 1}/{total}] {row['method']:<14} seed {row['seed']}: "
                       f"top1 {row['top1']:.2f}  (teacher {row['teacher_top1']:.2f}, "
                       f"{row['wall_s']:.1f} s)")
        else:
            tqdm.write(f"[{i + 1}/{total}] {row['method']:<14} seed {row['seed']}: "
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


def _run_as_jobs(args: argparse.Namespace, plan: _Plan, precision: str,
                 log_with: str | None) -> int:
    """Submit the unfinished cells as jobs (one per cohort) and, unless --no-wait, wait for
    them and print the table."""
    if log_with:
        raise KtBenchError("--log-with is not available with --launcher; track a plain run")
    cfg = launch.launcher_config(plan.grid.launcher,
                                 {k: getattr(args, k) for k in launch.LAUNCHER_KEYS})
    settings = launch.JobSettings(
        str(plan.out.resolve()), str(plan.teacher_cache.resolve()),
        str(Path(args.data_root).resolve()) if args.data_root else None, args.device,
        precision, args.compile, [str(Path(p).resolve()) for p in args.plugins])
    submitted = launch.submit_cells(plan.cells, args.launcher, cfg, settings,
                                    cohort=not args.no_cohort)
    print(f"grid '{plan.grid.name}': {len(plan.cells)} cells, {submitted.done_before} already "
          f"done; submitted {len(submitted.jobs)} {args.launcher} job(s) (job files in "
          f"{plan.out / 'jobs'}); progress: kt-bench status {plan.out}", flush=True)
    if args.no_wait:
        return 0
    problems = launch.wait(submitted.jobs)
    for line in problems:
        print(f"kt-bench: {line}", file=sys.stderr)
    rows, missing = launch.rows_of(plan.cells, plan.out)
    if missing:
        print(f"kt-bench: {missing} cell(s) have no row; see kt-bench status {plan.out}",
              file=sys.stderr)
    code = _print_results(rows, plan.out, args.no_report) if not rows.empty else 1
    return 1 if missing or problems else code


def _print_results(df: pd.DataFrame, out: Path, no_report: bool) -> int:
    """Print the comparison table, write the report (unless ``no_report``); 1 if a cell did
    not finish ok or the report could not be written (one line on stderr; the table and the
    rows stand)."""
    print()
    print(comparison_table(df))
    report, unwritten = None, None
    if not no_report:
        try:
            report = writer.write_report(out)
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
