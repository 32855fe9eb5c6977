"""The ``kt-bench`` command line: list, run, report."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import pandas as pd

from kt_bench.errors import KtBenchError

LIST_KINDS = ("methods", "models", "datasets", "grids")


def _summary(obj: object) -> str:
    """The first line of ``obj``'s docstring."""
    doc = (getattr(obj, "__doc__", None) or "").strip()
    return doc.splitlines()[0] if doc else ""


def _int_list(text: str, flag: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise KtBenchError(f"{flag} takes integers separated by commas, got '{text}'") from None
    if not values:
        raise KtBenchError(f"{flag} needs at least one value")
    return values


def cmd_list(args: argparse.Namespace) -> int:
    """Print the registered methods, models, datasets or grids."""
    from tabulate import tabulate

    from kt_bench.plugins import load_plugins

    load_plugins(args.plugins)
    if args.kind == "methods":
        from kt_bench.method import METHODS

        def taps(cls) -> str:
            try:
                return ", ".join(cls().taps) or "-"
            except Exception:  # noqa: BLE001 - a plugin whose options have no defaults
                return "(set by its options)"

        rows = [(n, c.default_weight, taps(c), _summary(c)) for n, c in METHODS.items()]
        headers = ["method", "default weight", "taps", "what"]
    elif args.kind == "models":
        from kt_bench.models import MODELS, build_model, count_parameters

        rows = [(n, *(f"{count_parameters(build_model(n, k)) / 1e6:.3f}M" for k in (10, 1000)),
                 _summary(b)) for n, b in MODELS.items()]
        headers = ["model", "params, 10 classes", "1000 classes", "what"]
    elif args.kind == "datasets":
        from kt_bench.data import DATASETS

        rows = [(n, _summary(b)) for n, b in DATASETS.items()]
        headers = ["dataset", "what"]
    else:
        from kt_bench.cells import expand
        from kt_bench.config import builtin_grids, load_grid

        rows = [(name, len(expand(grid)), grid.description)
                for name, grid in ((n, load_grid(str(p))) for n, p in builtin_grids().items())]
        headers = ["grid", "cells", "what"]
    print(tabulate(rows, headers=headers, tablefmt="simple", disable_numparse=True))
    return 0


def _apply_overrides(grid, args: argparse.Namespace):
    """``grid`` with --methods, --epochs and --seeds applied to every part of it."""
    methods = None
    if args.methods is not None:  # given, even if empty: "" is no list of methods
        from kt_bench.method import METHODS, split_method_name

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


def cmd_run(args: argparse.Namespace) -> int:
    """Run (or with --dry-run, list and check) the cells of a grid and print the comparison
    table."""
    from tqdm.auto import tqdm

    from kt_bench.cells import check_published_teachers, expand, select
    from kt_bench.config import load_grid
    from kt_bench.engine import check_device_and_precision, make_accelerator
    from kt_bench.plugins import load_plugins
    from kt_bench.precision import resolve_precision
    from kt_bench.probe import check_writable
    from kt_bench.rows import forget_warnings, write_results_csv
    from kt_bench.runner import run_cells
    from kt_bench.startup import CLOCK
    from kt_bench.status import write_manifest

    forget_warnings()
    load_plugins(args.plugins)
    CLOCK.mark("imports")
    precision = resolve_precision(args.precision, args.device)
    check_device_and_precision(args.device, precision)
    grid = _apply_overrides(load_grid(args.grid), args)
    if args.teacher_checkpoint and args.teachers_dir:
        raise KtBenchError("give --teacher-checkpoint or --teachers-dir, not both")
    cells = select(expand(grid, precision, args.teacher_checkpoint, args.teachers_dir),
                   args.only)
    if args.teachers_dir:
        check_published_teachers(cells, args.teachers_dir)
    out = Path(args.out) if args.out else Path("results") / grid.name
    out_flag = "--out folder" if args.out else "output folder"
    teacher_cache = Path(args.teacher_cache) if args.teacher_cache else out / "teachers"
    cache_flag = "--teacher-cache folder" if args.teacher_cache else "teacher cache folder"
    cells = _without_unreadable_rows(cells, out)
    if args.dry_run:
        return _dry_run(cells, out, out_flag, teacher_cache, cache_flag)
    check_writable(out, out_flag)
    check_writable(teacher_cache, cache_flag)
    log_with = None if args.log_with in (None, "none") else args.log_with
    if args.launcher:
        return _run_as_jobs(args, grid, cells, out, teacher_cache, precision, log_with)
    accelerator = make_accelerator(args.device, precision, log_with,
                                   str(out / "tracking") if log_with else None)
    main = accelerator.is_main_process
    CLOCK.mark("plan")
    if main:
        CLOCK.on_done = lambda clock: _report_startup(clock, out)
        write_manifest(out, cells)
        print(f"grid '{grid.name}': {len(cells)} cells on {accelerator.device} "
              f"(precision {precision}, {accelerator.num_processes} process"
              f"{'es' if accelerator.num_processes > 1 else ''}) -> {out}", flush=True)

    def on_row(i: int, row: dict) -> None:
        if not main:
            return
        if row["status"] == "ok":
            tqdm.write(f"[{i + 1}/{len(cells)}] {row['method']:<14} seed {row['seed']}: "
                       f"top1 {row['top1']:.2f}  (teacher {row['teacher_top1']:.2f}, "
                       f"{row['wall_s']:.1f} s)")
        else:
            tqdm.write(f"[{i + 1}/{len(cells)}] {row['method']:<14} seed {row['seed']}: "
                       f"{row['status']}: {row['error']}")

    rows = run_cells(cells, out, accelerator, teacher_cache, args.data_root, on_row,
                     cohort=not args.no_cohort, compile=args.compile)
    if not main:
        return 0
    write_results_csv(out)  # also when every cell was done before: never a stale file
    return _print_results(pd.DataFrame(rows), out, args)


def _report_startup(clock, out: Path) -> None:
    """Print where the run's time went before its first step and keep it in
    ``<out>/startup.json`` (seconds of each phase; a file that cannot be written is a line
    on stderr, and the run goes on)."""
    from tqdm.auto import tqdm

    from kt_bench import atomic

    tqdm.write(clock.summary())
    try:
        atomic.write_json(out / "startup.json", {
            "phases": [{"phase": p, "seconds": t} for p, t in clock.phases().items()],
            "first_step_s": clock.elapsed})
    except (KtBenchError, OSError) as exc:  # the timing alone is lost, not the cells training
        line = str(exc) if isinstance(exc, KtBenchError) else _os_error_line(exc)
        tqdm.write(f"kt-bench: startup.json not written: {line}", file=sys.stderr)


def _without_unreadable_rows(cells: list, out: Path) -> list:
    """``cells`` less those whose row in ``out`` this user may not read (another user's):
    each is named in a line on stderr and left to the file's owner, neither run nor moved."""
    from kt_bench.rows import unreadable_row

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


def _dry_run(cells: list, out: Path, out_flag: str, teacher_cache: Path,
             cache_flag: str) -> int:
    """List the cells with a GPU-hour estimate, then load every teacher checkpoint and build
    and set up every method and model on a probe batch; 2 (each problem a line on stderr)
    if any fails."""
    from kt_bench.probe import check_could_write, check_teacher_checkpoints, one_thread, probe_cells

    check_could_write(out, out_flag)
    check_could_write(teacher_cache, cache_flag)
    with one_thread():
        problems = check_teacher_checkpoints(cells) + probe_cells(cells)
        _print_plan(cells, out, estimate=not problems)
    for line in problems:
        print(f"kt-bench: error: {line}", file=sys.stderr)
    return 2 if problems else 0


def _print_plan(cells: list, out: Path, estimate: bool) -> None:
    """The cells as a table with each one's GPU-hours and the total (``estimate`` False:
    without them, as the networks of some cells cannot be built)."""
    from tabulate import tabulate

    from kt_bench.cost import ASSUMED_FLOPS, cell_flops, grid_gpu_hours

    def hours(cell) -> str:
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


def _launcher_config(base, args: argparse.Namespace):
    """The grid's ``[launcher]`` table with the flags given on the command line applied."""
    flags = {k: getattr(args, k) for k in ("partition", "gpus_per_job", "cpus_per_job",
                                          "mem_gb", "time_min", "array_parallelism",
                                          "max_array_size", "account", "qos")
             if getattr(args, k) is not None}
    return dataclasses.replace(base, **flags).validate("launcher options")


def _run_as_jobs(args: argparse.Namespace, grid, cells, out: Path, teacher_cache: Path,
                 precision: str, log_with: str | None) -> int:
    """Submit the unfinished cells as jobs (one per cohort) and, unless --no-wait, wait for
    them and print the table."""
    from kt_bench.launch import JobSettings, submit, wait
    from kt_bench.rows import finished_row, write_results_csv
    from kt_bench.runner import cohorts
    from kt_bench.status import write_manifest

    if log_with:
        raise KtBenchError("--log-with is not available with --launcher; track a plain run")
    cfg = _launcher_config(grid.launcher, args)
    write_manifest(out, cells)
    todo = [c for c in cells if finished_row(out, c.cell_id) is None]
    groups = cohorts(todo, not args.no_cohort)
    settings = JobSettings(str(out.resolve()), str(teacher_cache.resolve()),
                           str(Path(args.data_root).resolve()) if args.data_root else None,
                           args.device, precision, args.compile,
                           [str(Path(p).resolve()) for p in args.plugins])
    jobs = submit(groups, args.launcher, cfg, settings) if groups else []
    print(f"grid '{grid.name}': {len(cells)} cells, {len(cells) - len(todo)} already done; "
          f"submitted {len(jobs)} {args.launcher} job(s) (job files in {out / 'jobs'}); "
          f"progress: kt-bench status {out}", flush=True)
    if args.no_wait:
        return 0
    problems = wait(jobs)
    for line in problems:
        print(f"kt-bench: {line}", file=sys.stderr)
    ids = {c.cell_id for c in cells}
    rows = write_results_csv(out) if (out / "cells").exists() else pd.DataFrame()
    rows = rows[rows["cell_id"].isin(ids)] if not rows.empty else rows
    missing = len(ids) - len(rows)
    if missing:
        print(f"kt-bench: {missing} cell(s) have no row; see kt-bench status {out}",
              file=sys.stderr)
    code = _print_results(rows, out, args) if not rows.empty else 1
    return 1 if missing or problems else code


def _print_results(df: pd.DataFrame, out: Path, args: argparse.Namespace) -> int:
    """Print the comparison table, write the report; 1 if a cell did not finish ok or the
    report could not be written (one line on stderr; the table and the rows stand)."""
    from kt_bench.report import comparison_table
    from kt_bench.report_writer import write_report

    print()
    print(comparison_table(df))
    report, unwritten = None, None
    if not args.no_report:
        try:
            report = write_report(out)
        except (KtBenchError, OSError) as exc:  # the table and the rows stand without it
            unwritten = str(exc) if isinstance(exc, KtBenchError) else _os_error_line(exc)
    print(f"\nrows: {out / 'results.csv'}" + (f"; report: {report}" if report else ""))
    if unwritten:
        print(f"kt-bench: the report was not written: {unwritten}", file=sys.stderr)
    bad = df[~df["status"].isin(["ok", "n/a"])]  # n/a: the method does not apply, as published
    if not bad.empty:
        names = ", ".join(f"{r.method} seed {r.seed} ({r.status})" for r in bad.itertuples())
        print(f"kt-bench: {len(bad)} cell(s) did not finish ok: {names}", file=sys.stderr)
        return 1
    return 1 if unwritten else 0


def cmd_status(args: argparse.Namespace) -> int:
    """Show done, running, interrupted, pending and failed cells of a run folder."""
    from kt_bench.rows import forget_warnings
    from kt_bench.status import cell_states, format_status

    forget_warnings()
    print(format_status(cell_states(Path(args.dir))))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    """Write the tables and plots of a run folder and print its comparison table."""
    from kt_bench.probe import check_writable
    from kt_bench.report import comparison_table
    from kt_bench.report_writer import write_report
    from kt_bench.rows import forget_warnings, write_results_csv

    forget_warnings()
    out = Path(args.dir)
    if not list((out / "cells").glob("*/result.json")):
        raise KtBenchError(f"{out} holds no results (no cells/*/result.json); give a run's "
                           "--out folder")
    check_writable(out, "run folder")
    check_writable(out / "report", "report folder")
    rows = write_results_csv(out)  # rebuilt from the cells' rows, never left stale
    versus = _versus_arg(args.versus, rows) if args.versus else None
    print(comparison_table(rows))
    print(f"\nreport: {write_report(out, rows)}")
    if versus:
        from kt_bench import atomic
        from kt_bench.report import versus_table

        factor, reference = versus
        text = versus_table(rows, factor, reference)
        path = out / "report" / f"versus-{factor}.md"
        atomic.write_text(path, text + "\n")
        print(f"\nthe paired change of each method's top-1 with {factor} against "
              f"{factor}={reference}:\n{text}\n\n{path}")
    return 0


def _versus_arg(text: str, rows: pd.DataFrame) -> tuple[str, str]:
    """``--versus FIELD=REFERENCE`` as (field, reference), checked against the rows."""
    factor, sep, reference = text.partition("=")
    settings = ("precision",)
    if not sep or factor not in settings or not reference:
        raise KtBenchError(f"--versus takes FIELD=REFERENCE with FIELD one of "
                           f"{', '.join(settings)} (e.g. precision=no), got '{text}'")
    present = sorted(map(str, rows[factor].dropna().unique()))
    if reference not in present:
        raise KtBenchError(f"--versus {text}: no row ran with {factor}={reference}; the rows "
                           f"have {factor} {', '.join(present) or 'none'}")
    return factor, reference


def cmd_bench(args: argparse.Namespace) -> int:
    """Measure training images/s of a plain loop, the engine solo and the cohort."""
    import json

    from kt_bench.bench import BenchConfig, expand_methods, format_result, run_bench
    from kt_bench.engine import check_device_and_precision
    from kt_bench.method import build_method
    from kt_bench.plugins import load_plugins
    from kt_bench.precision import resolve_precision

    load_plugins(args.plugins)
    methods = expand_methods([m.strip() for m in args.methods.split(",") if m.strip()])
    if not methods:
        raise KtBenchError("--methods needs at least one method name")
    for m in methods:
        build_method(m)
    for flag in ("batch_size", "steps", "repeats"):
        if getattr(args, flag) < 1:
            raise KtBenchError(f"--{flag.replace('_', '-')} must be >= 1")
    if args.warmup < 0:
        raise KtBenchError("--warmup must be >= 0")
    precisions = []
    for p in (p.strip() for p in args.precision.split(",") if p.strip()):
        resolved = resolve_precision(p, args.device)
        check_device_and_precision(args.device, resolved)
        if resolved not in precisions:
            precisions.append(resolved)
    if not precisions:
        raise KtBenchError("--precision needs at least one of auto, no, bf16, fp16")
    cfg = BenchConfig(args.teacher, args.student, methods, args.dataset, args.batch_size,
                      args.steps, args.warmup, args.repeats, args.device, tuple(precisions),
                      args.workers, not args.no_nst, args.compile, not args.no_startup)
    result = run_bench(cfg)
    print(json.dumps(result, indent=2) if args.json else format_result(result))
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``kt-bench``."""
    parser = argparse.ArgumentParser(
        prog="kt-bench", description="Benchmark knowledge-transfer methods for image classifiers.")
    sub = parser.add_subparsers(dest="command", required=True)

    def plugins_arg(p: argparse.ArgumentParser) -> None:
        p.add_argument("--plugins", action="append", default=[], metavar="DIR",
                       help="folder of method plugin files (repeatable; also KT_BENCH_PLUGINS)")

    p_list = sub.add_parser("list", help="list methods, models, datasets or grids")
    p_list.add_argument("kind", choices=LIST_KINDS)
    plugins_arg(p_list)
    p_list.set_defaults(func=cmd_list)

    p_run = sub.add_parser("run", help="run a grid of cells and print the comparison table")
    p_run.add_argument("--grid", required=True, help="a built-in grid name or a .toml file")
    p_run.add_argument("--out", help="output folder (default: results/<grid>)")
    p_run.add_argument("--methods", help="comma-separated methods replacing the grid's "
                                         "('all': every registered method)")
    p_run.add_argument("--epochs", type=int, help="student epochs replacing the recipe's")
    p_run.add_argument("--seeds", help="comma-separated seeds replacing the grid's")
    p_run.add_argument("--device", default="auto", help="auto, cpu or cuda (default auto)")
    p_run.add_argument("--precision", default="auto",
                       help="auto, no, bf16 or fp16 (default auto: bf16 autocast on CUDA, "
                            "full precision on the CPU)")
    p_run.add_argument("--no-cohort", action="store_true",
                       help="train every cell alone (default: cells that differ only in "
                            "method train together, one teacher pass for all)")
    p_run.add_argument("--compile", action="store_true",
                       help="run students and teacher through torch.compile (pays off on "
                            "long runs on a GPU; results match closely, not bit for bit)")
    p_run.add_argument("--teacher-cache", help="teacher cache folder (default: <out>/teachers)")
    p_run.add_argument("--data-root", help="where datasets are stored or downloaded")
    p_run.add_argument("--only", action="append", default=[], metavar="KEY=VALUE",
                       help="run a slice: dataset=, teacher=, student=, method= or seed= "
                            "(comma-separated values; repeatable, all must match)")
    p_run.add_argument("--teacher-checkpoint", metavar="PATH",
                       help="load the teacher from this checkpoint instead of training it")
    p_run.add_argument("--teachers-dir", metavar="DIR",
                       help="the unpacked published teachers of RepDistiller/mdistiller "
                            "(<name>_vanilla/ckpt_epoch_240.pth): every pair's teacher is "
                            "loaded from there instead of trained")
    p_run.add_argument("--dry-run", action="store_true",
                       help="list the cells with a GPU-hour estimate and stop")
    p_run.add_argument("--log-with", metavar="TRACKER",
                       help="log per-step loss terms with an Accelerate tracker, e.g. "
                            "tensorboard (written under <out>/tracking)")
    p_run.add_argument("--no-report", action="store_true",
                       help="skip writing report.md, tables and plots at the end")
    cluster = p_run.add_argument_group(
        "cluster jobs", "with --launcher, each cohort (or cell, with --no-cohort) runs as a "
        "job through submitit; the other flags replace the grid's [launcher] keys")
    cluster.add_argument("--launcher", choices=("local", "slurm"),
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
    plugins_arg(p_run)
    p_run.set_defaults(func=cmd_run)

    from kt_bench.bench import DEMO_METHODS

    p_bench = sub.add_parser("bench", help="training images/s: plain loop vs engine vs cohort")
    p_bench.add_argument("--teacher", default="resnet56")
    p_bench.add_argument("--student", default="resnet20")
    p_bench.add_argument("--methods", default=",".join(DEMO_METHODS),
                         help="comma-separated methods, 'all' for every registered one "
                              "(default: the 8 demo methods); an initialisation stage (AB, "
                              "FT, FSP) is skipped: methods are timed in their main stage")
    p_bench.add_argument("--dataset", help="a uint8 image dataset (cifar10, cifar100) instead "
                                           "of random CIFAR-shaped data")
    p_bench.add_argument("--batch-size", type=int, default=64)
    p_bench.add_argument("--steps", type=int, default=20, help="steps per timed epoch")
    p_bench.add_argument("--warmup", type=int, default=1, help="untimed epochs first")
    p_bench.add_argument("--repeats", type=int, default=3, help="timed epochs (median)")
    p_bench.add_argument("--workers", type=int, help="the plain loop's DataLoader workers "
                                                     "(default: min(8, CPUs))")
    p_bench.add_argument("--device", default="auto")
    p_bench.add_argument("--precision", default="no,bf16",
                         help="the precisions to measure, comma-separated, each against its "
                              "own bare-model limit (default no,bf16: fp32 and bf16 autocast)")
    p_bench.add_argument("--compile", action="store_true",
                         help="torch.compile the engine's networks (solo and cohort)")
    p_bench.add_argument("--no-nst", action="store_true", help="skip the NST loss timing")
    p_bench.add_argument("--no-startup", action="store_true",
                         help="skip timing the start-up of a 1-epoch demo run")
    p_bench.add_argument("--json", action="store_true", help="print one JSON object")
    plugins_arg(p_bench)
    p_bench.set_defaults(func=cmd_bench)

    p_status = sub.add_parser("status", help="done, running and failed cells of a run folder")
    p_status.add_argument("dir", help="a run's output folder")
    p_status.set_defaults(func=cmd_status)

    p_rep = sub.add_parser("report", help="write tables and plots of a run folder")
    p_rep.add_argument("dir", help="a run's output folder")
    p_rep.add_argument("--versus", metavar="FIELD=REFERENCE",
                       help="also the paired top-1 change of every method between settings "
                            "that differ only in FIELD, against FIELD=REFERENCE (e.g. "
                            "precision=no: bf16 against fp32)")
    p_rep.set_defaults(func=cmd_report)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``kt-bench`` console script: 0 done, 1 a cell or the report did not
    finish, 2 an error (one line on stderr), 130 interrupted (Ctrl-C), 143 terminated
    (SIGTERM; in ``run``, which stops as on Ctrl-C, keeping what is done)."""
    from kt_bench.interrupts import EXIT_INTERRUPTED, EXIT_TERMINATED, Terminated

    args = build_parser().parse_args(argv)
    try:
        return _dispatch(args)
    except KtBenchError as exc:
        print(f"kt-bench: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a file kt-bench could not read or write, with the system's reason
        print(f"kt-bench: error: {_os_error_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        how = "terminated" if isinstance(exc, Terminated) else "interrupted"
        rerun = ": rerun the same command to resume" if args.command == "run" else ""
        print(f"kt-bench: {how}{rerun}", file=sys.stderr)
        return EXIT_TERMINATED if isinstance(exc, Terminated) else EXIT_INTERRUPTED


def _dispatch(args: argparse.Namespace) -> int:
    """Run the chosen command; ``run`` takes SIGTERM as an interrupt while it runs."""
    from kt_bench.interrupts import sigterm_as_interrupt

    if args.command != "run":
        return args.func(args)
    with sigterm_as_interrupt():
        return args.func(args)


def _os_error_line(exc: OSError) -> str:
    """``exc`` as one line naming its file(s) and the system's reason."""
    from kt_bench.errors import first_line

    if exc.filename is None:
        return first_line(exc)
    files = f"{exc.filename} -> {exc.filename2}" if exc.filename2 else str(exc.filename)
    return f"{files}: {exc.strerror or first_line(exc)}"


if __name__ == "__main__":
    sys.exit(main())
