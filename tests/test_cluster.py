"""Scaling out: data-parallel cells (2 CPU processes over gloo), grids as submitit jobs
through the local executor, a preempted job's requeue and resume, and ``kt-bench status``."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from kt_bench.api.method import build_method
from kt_bench.commands.main import main
from kt_bench.core.options import Spec
from kt_bench.data import load_dataset
from kt_bench.models import build_model
from kt_bench.sweep.config import LauncherConfig
from kt_bench.sweep.launch import JobSettings, executor_parameters, submit
from kt_bench.sweep.rows import read_rows
from kt_bench.training.device import make_accelerator, training_memory_format
from kt_bench.training.engine import train
from kt_bench.training.lifecycle import in_layout

from .conftest import share_fusion_choice

pytest.importorskip("submitit")

DIGITS = Spec("digits", {"image_size": 16})  # as the demo grid holds them
#: The columns a run's numbers live in (wall time and speed differ from run to run).
NUMBERS = ["cell_id", "method", "seed", "status", "top1", "top5", "top1_best", "teacher_top1"]


@pytest.fixture(scope="module")
def teacher_ckpt(tmp_path_factory) -> Path:
    """The demo teacher (resnet20 on digits) after a short training, saved as a checkpoint
    so that the runs below load it rather than train it."""
    data = load_dataset(DIGITS)
    from kt_bench.training.recipe import Recipe

    result = train(data, Spec("resnet20"), build_method("student"),
                   Recipe(epochs=3, batch_size=64, lr=0.05), 0, make_accelerator("cpu"))
    path = tmp_path_factory.mktemp("teacher") / "resnet20.pt"
    torch.save(result.model.state_dict(), path)
    return path


def _demo_args(teacher: Path, out: Path, *extra: str) -> list[str]:
    # fp32 pinned: these runs are compared with cells expanded in fp32 and with tolerances
    # set for fp32 (auto would be bf16 on a CPU with native bf16)
    return ["run", "--grid", "demo", "--teacher-checkpoint", str(teacher), "--device", "cpu",
            "--precision", "no", "--no-report", "--out", str(out), "--seeds", "0", *extra]


def _rows(out: Path):
    return read_rows(out).sort_values("cell_id").reset_index(drop=True)


@pytest.mark.slow  # 15-50 s on 2 cores: in `pytest -m slow`, not the default run
def test_two_processes_train_a_cell_like_one_process(tmp_path, teacher_ckpt):
    """``torchrun --nproc_per_node 2 -m kt_bench run``: one row, written once, with
    world_size 2; evaluation counts each test sample once; and the numbers are those of the
    one-process run up to the one thing data parallelism on the CPU changes.

    Each process sees its half of the very images of the one-process batch (augmentation
    included), the gradients are averaged over the global batch of 64 and the learning rate
    is the recipe's; but BatchNorm normalises each half-batch of 32 with its own statistics
    (SyncBatchNorm needs CUDA), so the runs are not bit-identical. The tolerance: the
    two-process run must stay closer to the one-process run than another seed of the
    one-process run does, in the loss (the largest gap over the epochs) and in final top-1.
    """
    args = ["--only", "method=nst_poly", "--epochs", "2"]
    one, two, other = tmp_path / "one", tmp_path / "two", tmp_path / "seed1"
    assert main(_demo_args(teacher_ckpt, one, *args)) == 0
    assert main(_demo_args(teacher_ckpt, other, *args, "--seeds", "1")) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "kt_bench", *_demo_args(teacher_ckpt, two, *args)],
        capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r1, r2, rs = _rows(one).iloc[0], _rows(two).iloc[0], _rows(other).iloc[0]
    assert (r1.world_size, r2.world_size) == (1, 2)
    assert r1.cell_id == r2.cell_id and r2.status == "ok"
    cell_dir = two / "cells" / r2.cell_id
    assert (cell_dir / "log.txt").read_text().count(" start ") == 1  # only the main wrote

    # The model the two processes trained, evaluated by one process, scores the row's top-1.
    data = load_dataset(DIGITS)
    state = torch.load(cell_dir / "checkpoint.pt", weights_only=False)["trainee"]
    student = build_model(Spec("resnet8", {"width": 0.5}), data.num_classes, data.in_channels)
    student.load_state_dict({k.removeprefix("student."): v for k, v in state.items()
                             if k.startswith("student.")})
    # Each process scored its own share of the test set in one batch, in one thread, with the
    # main process's BatchNorm statistics (the checkpoint's); scored here the same way, the
    # shares add up to the row's top-1 (kernels may differ by batch size and thread count).
    acc = make_accelerator("cpu", r2.precision)
    layout = training_memory_format(student, acc.device)
    threads, hits, seen = torch.get_num_threads(), 0, 0
    torch.set_num_threads(1)
    try:
        student.eval()
        for rank in (0, 1):
            for x, y in data.test_batches(512, acc.device, rank, 2):
                with torch.no_grad(), acc.autocast():
                    hits += int((student(in_layout(x, layout)).argmax(1) == y).sum())
                seen += len(y)
    finally:
        torch.set_num_threads(threads)
    assert seen == data.n_test and 100.0 * hits / seen == pytest.approx(r2.top1)

    def losses(out: Path, row) -> list[float]:
        lines = (out / "cells" / row.cell_id / "metrics.jsonl").read_text().splitlines()
        return [json.loads(line)["loss"] for line in lines]

    l1, l2, ls = losses(one, r1), losses(two, r2), losses(other, rs)
    # the largest gap over the epochs: in one epoch another seed's loss may come close by chance
    gap = max(abs(a - b) for a, b in zip(l1, l2, strict=True))
    assert gap < max(abs(a - s) for a, s in zip(l1, ls, strict=True)), (l1, l2, ls)
    assert abs(r1.top1 - r2.top1) < max(abs(r1.top1 - rs.top1), 100 / data.n_test), \
        (r1.top1, r2.top1, rs.top1)


@pytest.mark.slow  # 15-50 s on 2 cores: in `pytest -m slow`, not the default run
def test_the_demo_grid_through_the_local_launcher_gives_the_plain_rows(tmp_path, teacher_ckpt,
                                                                         capsys):
    """Every demo method, one epoch: submitted as a local job, the rows are those of a
    plain run bit for bit; a second submission finds everything done and submits nothing."""
    plain, jobs = tmp_path / "plain", tmp_path / "jobs"
    assert main(_demo_args(teacher_ckpt, plain, "--epochs", "1")) == 0
    capsys.readouterr()
    share_fusion_choice(plain, jobs)
    assert main(_demo_args(teacher_ckpt, jobs, "--epochs", "1", "--launcher", "local")) == 0
    out = capsys.readouterr().out
    assert "submitted 1 local job(s)" in out and "nst_gauss" in out
    a, b = _rows(plain), _rows(jobs)
    assert len(a) == 8 and (b["status"] == "ok").all()
    assert a[NUMBERS].equals(b[NUMBERS])
    assert main(_demo_args(teacher_ckpt, jobs, "--epochs", "1", "--launcher", "local")) == 0
    assert "8 already done; submitted 0 local job(s)" in capsys.readouterr().out


@pytest.mark.slow  # 15-50 s on 2 cores: in `pytest -m slow`, not the default run
def test_a_preempted_local_job_is_requeued_and_resumes_from_the_checkpoint(tmp_path,
                                                                           teacher_ckpt):
    """SIGUSR2 (what Slurm sends before preempting a job) to the job mid-cell: submitit
    requeues it, the new run resumes after the last checkpointed epoch, and the row is the
    one of an uninterrupted run."""
    from kt_bench.api.plugins import load_plugins
    from kt_bench.sweep.cells import expand, select
    from kt_bench.sweep.config import load_grid

    load_plugins()
    grid = load_grid("demo")
    grid.recipe = dataclasses.replace(grid.recipe, epochs=5)
    cells = select(expand(grid, "no", str(teacher_ckpt)), ["method=kd", "seed=0"])
    out = tmp_path / "pre"
    (job,) = submit([cells], "local", LauncherConfig(),
                    JobSettings(str(out), str(out / "teachers"), device="cpu"))
    cell_dir = out / "cells" / cells[0].cell_id
    metrics = cell_dir / "metrics.jsonl"
    deadline = time.time() + 300
    while not (metrics.exists() and metrics.read_text().strip()):
        assert time.time() < deadline and not job.done(), "the job ended before its first epoch"
        time.sleep(0.05)
    pid = int(re.search(r"pid=(\d+)", (cell_dir / "log.txt").read_text()).group(1))
    os.kill(pid, signal.SIGUSR2)
    (row,) = job.result()
    log = (cell_dir / "log.txt").read_text()
    assert log.count(" start ") == 2, log
    assert "stopped; a new run resumes" in log and "(resuming from checkpoint.pt)" in log, log
    epochs = [json.loads(line)["epoch"] for line in metrics.read_text().splitlines()]
    assert epochs == [1, 2, 3, 4, 5]

    plain = tmp_path / "plain"
    assert main(_demo_args(teacher_ckpt, plain, "--epochs", "5", "--only", "method=kd")) == 0
    assert {k: row[k] for k in NUMBERS} == _rows(plain)[NUMBERS].iloc[0].to_dict()


def test_status_shows_each_cells_state(tmp_path, capsys):
    from kt_bench.api.plugins import load_plugins
    from kt_bench.core.locks import FileLock
    from kt_bench.sweep.cells import expand, select
    from kt_bench.sweep.config import load_grid
    from kt_bench.sweep.manifest import write_manifest

    load_plugins()
    cells = select(expand(load_grid("demo")), ["method=student,kd,fitnet,at,nst_poly",
                                               "seed=0"])
    assert [c.method for c in cells] == ["student", "kd", "fitnet", "at", "nst_poly"]
    write_manifest(tmp_path, cells)
    dirs = [tmp_path / "cells" / c.cell_id for c in cells]
    for d in dirs[:4]:
        d.mkdir(parents=True)

    def row(cell, **outcome) -> str:  # as the runner writes it: the identity, then the outcome
        return json.dumps({**cell.identity(), "world_size": 1, **outcome})

    (dirs[0] / "result.json").write_text(row(
        cells[0], status="ok", error="", top1=90.0, top5=99.0, top1_best=90.0,
        teacher_top1=91.0, wall_s=1.0, images_per_s=10.0))
    (dirs[0] / "metrics.jsonl").write_text("{}\n" * 12)
    (dirs[1] / "result.json").write_text(row(cells[1], status="failed",
                                             error="RuntimeError: boom"))
    (dirs[2] / "checkpoint.pt").write_bytes(b"")
    (dirs[2] / "metrics.jsonl").write_text("{}\n" * 5)
    lock = FileLock(dirs[3] / "lock")
    lock.acquire()
    try:
        assert main(["status", str(tmp_path)]) == 0
    finally:
        lock.release()
    out = capsys.readouterr().out
    states = {line.split()[4]: line for line in out.splitlines()[2:-1]}
    assert " ok " in states["student"] and "12/12" in states["student"]
    assert " failed " in states["kd"] and "RuntimeError: boom" in states["kd"]
    assert " interrupted " in states["fitnet"] and "5/12" in states["fitnet"]
    assert " running " in states["at"] and f"{os.getpid()}" in states["at"]
    assert " pending " in states["nst_poly"]
    assert out.splitlines()[-1] == ("5 cells: 1 ok, 1 failed, 1 running, 1 interrupted, "
                                    "1 pending")
    assert main(["status", str(tmp_path / "nothing")]) == 2
    assert "holds no cells" in capsys.readouterr().err


def test_slurm_job_requests_and_bad_launcher_input(tmp_path, capsys):
    cfg = LauncherConfig(partition="gpu", gpus_per_job=4, cpus_per_job=32, mem_gb=200,
                         time_min=600, array_parallelism=10, account="lab")
    params = executor_parameters("slurm", cfg)
    assert params["tasks_per_node"] == 4 and params["gpus_per_node"] == 4  # a process per GPU
    assert params["cpus_per_task"] == 8 and params["mem_gb"] == 200
    assert params["slurm_partition"] == "gpu" and params["slurm_account"] == "lab"
    assert params["slurm_array_parallelism"] == 10 and params["timeout_min"] == 600
    assert "slurm_qos" not in params

    grid = tmp_path / "g.toml"
    grid.write_text('extends = "demo"\nname = "g"\n[launcher]\ngpus = 2\n')
    assert main(["run", "--grid", str(grid), "--launcher", "local"]) == 2
    err = capsys.readouterr().err
    assert f"{grid}: launcher: unknown key 'gpus'; accepted: partition, gpus_per_job" in err
    assert main(["run", "--grid", "demo", "--launcher", "local", "--time-min", "0",
                 "--out", str(tmp_path / "o")]) == 2
    assert "launcher options.time_min must be an integer >= 1, got 0" in capsys.readouterr().err
    if not any((Path(p) / "srun").exists() for p in os.environ["PATH"].split(os.pathsep)):
        assert main(["run", "--grid", "demo", "--launcher", "slurm", "--out",
                     str(tmp_path / "s")]) == 2
        assert ('cannot submit to slurm: RuntimeError: Could not detect "srun"'
                in capsys.readouterr().err)


def test_jobs_beyond_the_max_array_size_go_in_further_arrays(monkeypatch, tmp_path):
    import contextlib

    import kt_bench.sweep.launch as launch

    arrays: list[list] = []

    class FakeExecutor:
        @contextlib.contextmanager
        def batch(self):
            arrays.append([])
            yield

        def submit(self, job):
            arrays[-1].append(job)
            return job

    monkeypatch.setattr(launch, "make_executor", lambda kind, folder, cfg: FakeExecutor())
    groups = [[f"cell{i}"] for i in range(5)]
    jobs = submit(groups, "slurm", LauncherConfig(max_array_size=2), JobSettings(str(tmp_path),
                                                                                 "t"))
    assert [len(a) for a in arrays] == [2, 2, 1]
    assert [j.cells for j in jobs] == groups


@pytest.mark.slow  # 15-50 s on 2 cores: in `pytest -m slow`, not the default run
def test_two_stage_fitnet_trains_data_parallel(tmp_path, teacher_ckpt):
    """FitNet's hint stage leaves the classifier without gradients; DDP must be told that
    parameters may sit out (without it this cell fails)."""
    grid = tmp_path / "fitnet.toml"
    grid.write_text('extends = "demo"\nname = "fitnet2"\nmethods = ["fitnet"]\n'
                    '[method_options.fitnet]\nhint_epochs = 1\n')
    out = tmp_path / "out"
    args = _demo_args(teacher_ckpt, out, "--epochs", "2")
    args[args.index("demo")] = str(grid)
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "kt_bench", *args],
        capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    row = _rows(out).iloc[0]
    assert (row.status, row.world_size) == ("ok", 2)


CRD_DDP_SCRIPT = '''
import sys

import torch

from kt_bench.api import plugins
from kt_bench.training.recipe import Recipe
from kt_bench.data import load_dataset
from kt_bench.training.engine import train
from kt_bench.training.device import make_accelerator
from kt_bench.api.method import build_method, method_config
from kt_bench.models import build_model
from kt_bench.core.options import Spec

plugins.load_builtin_methods()
accelerator = make_accelerator("cpu")
# 101 samples in batches of 32: the last batch of 5 splits 3 / 2 over the two processes
data = load_dataset(Spec("synthetic", {"n_train": 101, "n_test": 20, "image_size": 8}))
torch.manual_seed(0)
teacher = build_model(Spec("resnet8", {"width": 0.5}), data.num_classes, data.in_channels)
method = build_method("crd", method_config("crd", {"crd": {"feat_dim": 16, "nce_m": 0.3}}))
result = train(data, Spec("resnet8", {"width": 0.25}), method,
               Recipe(epochs=2, batch_size=32, lr=0.05), 0, accelerator, teacher)
torch.save({"memory_v1": method.memory_v1, "memory_v2": method.memory_v2, "z": method.z,
            "facts": result.facts, "world": accelerator.num_processes},
           f"{sys.argv[1]}/rank{accelerator.process_index}.pt")
'''


@pytest.mark.slow  # 15-50 s on 2 cores: in `pytest -m slow`, not the default run
def test_crd_banks_stay_equal_on_every_process(tmp_path):
    """A CRD cell over 2 gloo processes: each process updates its memory banks with the whole
    global batch (gathered), so after training both processes hold the same banks and the
    same normalising constants, and every sample's row was updated (a unit vector) on both,
    whichever process trained on it."""
    script = tmp_path / "crd_ddp.py"
    script.write_text(CRD_DDP_SCRIPT)
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(script), str(tmp_path)],
        capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    assert r0["world"] == r1["world"] == 2
    assert r0["facts"] == r1["facts"] == {"crd_nce_k": 90}  # 101 minus a class of 11
    for key in ("memory_v1", "memory_v2", "z"):
        assert torch.equal(r0[key], r1[key]), key
    assert (r0["z"] > 0).all()
    for key in ("memory_v1", "memory_v2"):
        assert torch.allclose(r0[key].norm(dim=1), torch.ones(101), atol=1e-5), key
