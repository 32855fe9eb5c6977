"""``kt-bench run``: a grid's cells trained here or submitted as jobs (``--launcher``), or
listed and checked (``--dry-run``), and the comparison table printed: the flags, read into
the settings of :func:`kt_bench.workflow.run.run_grid`, which ``kt_bench.run`` calls too.

Imported only for this command: it loads the engine (torch, Accelerate)."""

from __future__ import annotations

import argparse
import sys

from kt_bench.commands.common import add_plugins_arg
from kt_bench.reporting.corrections import CORRECTIONS
from kt_bench.sweep import launch
from kt_bench.workflow.run import run_grid
from kt_bench.workflow.settings import SETTING_NAMES, RunSettings


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
    """The grid and what replaces parts of it: --grid, --out, --methods, --epochs,
    --teacher-epochs, --seeds."""
    p.add_argument("--grid", required=True, help="a built-in grid name or a .toml file")
    p.add_argument("--out", help="output folder (default: results/<grid>)")
    p.add_argument("--methods", help="comma-separated methods replacing the grid's "
                                     "('all': every registered method)")
    p.add_argument("--epochs", type=int, help="student epochs replacing the recipe's")
    p.add_argument("--teacher-epochs", type=int, metavar="N",
                   help="epochs of a teacher trained for the grid, replacing its "
                        "teacher_recipe's (a new teacher: cached apart from the others)")
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
    p.add_argument("--no-fuse", action="store_true",
                   help="train a cohort's students one by one (default: as one fused network "
                        "where a measurement says it pays; rows then match the unfused ones "
                        "to float rounding, not bit for bit)")
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
                   help="tensorboard, wandb (offline) and/or mlflow (a local file store), "
                        "comma-separated: a run per cell under <out>/tracking")
    p.add_argument("--no-report", action="store_true",
                   help="skip writing report.md, tables and plots at the end")
    p.add_argument("--no-downstream", action="store_true",
                   help="skip the grid's [[downstream]] evaluations (run them later with "
                        "kt-bench downstream OUT)")
    p.add_argument("--correct", choices=CORRECTIONS, default=CORRECTIONS[0],
                   help="how the table's changes against student are corrected for the many "
                        "comparisons: holm (default), bh or none")


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


def run(args: argparse.Namespace) -> int:
    """Run (or with --dry-run, list and check) the cells of a grid and print the comparison
    table."""
    outcome = run_grid(args.grid, settings_from_args(args))
    for line in outcome.problems:
        print(f"kt-bench: error: {line}", file=sys.stderr)
    return outcome.code


def settings_from_args(args: argparse.Namespace) -> RunSettings:
    """The run's settings as the command line gives them (``--no-X`` flags as ``X``)."""
    negated = {"cohort": "no_cohort", "fuse": "no_fuse", "report": "no_report",
               "wait": "no_wait", "downstream": "no_downstream"}
    values = {name: (not getattr(args, negated[name]) if name in negated
                     else getattr(args, name)) for name in SETTING_NAMES}
    return RunSettings(**values, cli=True)
