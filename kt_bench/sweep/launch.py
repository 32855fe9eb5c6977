"""Running a grid's cells as cluster jobs through submitit: on Slurm, or as local processes.

A job holds one cohort (or one cell with ``--no-cohort``) and runs the ordinary runner on it
in the shared out folder, so the per-cell locks, the skipping of finished cells and the resume
from checkpoints work as in a plain run. Before Slurm stops a job (preemption, time limit) it
sends SIGUSR2; submitit catches it, the job is requeued, and the new run resumes each cell
from the checkpoint of its last finished epoch. ``submitit`` is an optional extra
(``pip install 'kt-bench[cluster]'``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from kt_bench.core.errors import KtBenchError, first_line
from kt_bench.sweep.cells import Cell
from kt_bench.sweep.config import LauncherConfig
from kt_bench.sweep.manifest import write_manifest
from kt_bench.sweep.rows import finished_row, write_results_csv

LAUNCHERS = ("local", "slurm")
#: The ``[launcher]`` keys a command line may replace.
LAUNCHER_KEYS = ("partition", "gpus_per_job", "cpus_per_job", "mem_gb", "time_min",
                 "array_parallelism", "max_array_size", "account", "qos")


@dataclass
class JobSettings:
    """What a job needs besides its cells: where to write, how to train, and the trackers
    each cell gets a run in (``--log-with``)."""

    out: str
    teacher_cache: str
    data_root: str | None = None
    device: str = "auto"
    precision: str = "no"
    compile: bool = False
    plugins: list[str] = field(default_factory=list)
    trackers: tuple[str, ...] = ()
    fuse: bool = True


class CellJob:
    """A submitit job: train ``cells`` (one cohort) into the shared out folder.

    Callable in the job's process; ``checkpoint`` is submitit's hook on preemption: it asks to
    run the same job again, which finds the finished cells done and resumes the others from
    their checkpoints.
    """

    def __init__(self, cells: list[Cell], settings: JobSettings) -> None:
        self.cells = cells
        self.settings = settings

    def __call__(self) -> list[dict[str, Any]]:
        """Run the cells; return their rows."""
        from kt_bench.api.plugins import load_plugins
        from kt_bench.sweep.runner import run_cells
        from kt_bench.training.device import make_accelerator

        _export_distributed_env()
        load_plugins(self.settings.plugins)
        s = self.settings
        accelerator = make_accelerator(s.device, s.precision)
        return run_cells(self.cells, Path(s.out), accelerator, Path(s.teacher_cache),
                         s.data_root, compile=s.compile, trackers=tuple(s.trackers),
                         fuse=s.fuse)

    def checkpoint(self, *args: Any, **kwargs: Any):
        """Requeue this job as it is (its state is on disk, in the cells' checkpoints)."""
        import submitit

        return submitit.helpers.DelayedSubmission(self, *args, **kwargs)


def _export_distributed_env() -> None:
    """In a job of several tasks (one per GPU), set the variables torch.distributed and
    Accelerate read (RANK, WORLD_SIZE, MASTER_ADDR, ...)."""
    import submitit

    try:
        env = submitit.JobEnvironment()
    except RuntimeError:  # not inside a submitit job
        return
    if env.num_tasks > 1:
        submitit.helpers.TorchDistributedEnvironment().export()


def executor_parameters(kind: str, cfg: LauncherConfig) -> dict[str, Any]:
    """submitit's parameters for ``kind`` (local|slurm) from ``cfg``."""
    params: dict[str, Any] = {"timeout_min": cfg.time_min, "name": "kt-bench"}
    if kind == "local":
        return params | {"tasks_per_node": 1}
    tasks = max(cfg.gpus_per_job, 1)  # one process per GPU
    params |= {"nodes": 1, "tasks_per_node": tasks, "gpus_per_node": cfg.gpus_per_job,
               "cpus_per_task": max(cfg.cpus_per_job // tasks, 1),
               "slurm_array_parallelism": cfg.array_parallelism}
    if cfg.mem_gb:
        params["mem_gb"] = cfg.mem_gb
    for key in ("partition", "account", "qos"):
        if getattr(cfg, key):
            params[f"slurm_{key}"] = getattr(cfg, key)
    return params


def make_executor(kind: str, folder: Path, cfg: LauncherConfig):
    """A submitit executor writing its job files under ``folder``."""
    if kind not in LAUNCHERS:
        raise KtBenchError(f"unknown launcher '{kind}'; accepted: {', '.join(LAUNCHERS)}")
    try:
        import submitit
    except ImportError:
        raise KtBenchError(f"--launcher {kind} needs submitit: pip install "
                           "'kt-bench[cluster]' (or pip install submitit)") from None
    try:
        executor = submitit.AutoExecutor(folder=folder, cluster=kind)
    except RuntimeError as exc:  # e.g. no srun: not on a Slurm cluster
        raise KtBenchError(f"cannot submit to {kind}: {first_line(exc)}") from None
    executor.update_parameters(**executor_parameters(kind, cfg))
    return executor


def launcher_config(base: LauncherConfig, given: Mapping[str, Any]) -> LauncherConfig:
    """``base`` (a grid's ``[launcher]`` table) with the values of ``given`` that are not
    None in place of its own, validated."""
    replaced = {k: v for k, v in given.items() if v is not None}
    return dataclasses.replace(base, **replaced).validate("launcher options")


def submit(groups: list[list[Cell]], kind: str, cfg: LauncherConfig,
           settings: JobSettings) -> list[Any]:
    """Submit one job per group of cells, as Slurm arrays of at most ``max_array_size``
    jobs; return the submitit jobs."""
    executor = make_executor(kind, Path(settings.out) / "jobs", cfg)
    jobs = []
    try:
        for start in range(0, len(groups), cfg.max_array_size):
            with executor.batch():
                for cells in groups[start:start + cfg.max_array_size]:
                    jobs.append(executor.submit(CellJob(cells, settings)))
    except (OSError, RuntimeError) as exc:  # no sbatch, a rejected request, ...
        raise KtBenchError(f"cannot submit to {kind}: {first_line(exc)}") from None
    return jobs


def wait(jobs: list[Any]) -> list[str]:
    """Wait for ``jobs``; return one line per job that ended without its rows."""
    problems = []
    for job in jobs:
        try:
            job.result()
        except Exception as exc:  # noqa: BLE001 - a failed job is reported, the rest waited for
            text = str(exc).strip().splitlines()
            problems.append(f"job {job.job_id} failed ({text[-1] if text else type(exc).__name__}"
                            f"); its log: {job.paths.stderr}")
    return problems


@dataclass
class Submission:
    """The jobs submitted for a grid's cells, and how many of the cells were done before."""

    jobs: list[Any]
    done_before: int


def submit_cells(cells: list[Cell], kind: str, cfg: LauncherConfig, settings: JobSettings,
                 cohort: bool = True) -> Submission:
    """Record ``cells`` in the run folder's manifest (so that status shows them pending) and
    submit those without a finished row as jobs: one per cohort, or per cell when not
    ``cohort``."""
    from kt_bench.sweep.runner import cohorts  # here: the runner loads torch and the engine

    out = Path(settings.out)
    write_manifest(out, cells)
    todo = [c for c in cells if finished_row(out, c.cell_id) is None]
    groups = cohorts(todo, cohort)
    jobs = submit(groups, kind, cfg, settings) if groups else []
    return Submission(jobs, len(cells) - len(todo))


def rows_of(cells: list[Cell], out: Path) -> tuple[pd.DataFrame, int]:
    """Once the jobs have ended: ``out/results.csv`` rewritten, the rows of ``cells`` in it,
    and how many of the cells have none."""
    ids = {c.cell_id for c in cells}
    rows = write_results_csv(out) if (out / "cells").exists() else pd.DataFrame()
    rows = rows[rows["cell_id"].isin(ids)] if not rows.empty else rows
    return rows, len(ids) - len(rows)
