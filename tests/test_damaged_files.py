"""Damaged files on disk (checkpoints, teacher caches, rows, the manifest) are set aside or
rebuilt, named in one line, and never stop a cell for good nor print a traceback."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
import torch

from kt_bench.api.method import build_method
from kt_bench.core.options import Spec
from kt_bench.data import load_dataset
from kt_bench.sweep import teachers
from kt_bench.training.checkpoints import previous_path
from kt_bench.training.device import make_accelerator
from kt_bench.training.engine import train
from kt_bench.training.recipe import Recipe

from .conftest import run_cli, set_aside, sorted_rows, write_tiny_grid

DATA = Spec("synthetic", {"n_train": 96, "n_test": 48, "image_size": 8, "noise": 2.0,
                          "augment": True})
STUDENT = Spec("resnet8", {"width": 0.25})
RECIPE = Recipe(epochs=3, batch_size=32, lr=0.05)
NUMBERS = ["top1", "top5", "top1_best", "teacher_top1"]


class _Killed(BaseException):
    """A killed process: not an Exception, so the engine does not record it as a failure."""


def _damage(path: Path, how: str) -> None:
    if how == "random":
        path.write_bytes(random.Random(0).randbytes(10))
    elif how == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    else:
        path.write_bytes(b"")


@pytest.fixture(scope="module")
def data():
    return load_dataset(DATA)


@pytest.fixture(scope="module")
def full(data):
    """The uninterrupted run every interrupted one must end equal to."""
    return train(data, STUDENT, build_method("student"), RECIPE, 0, make_accelerator("cpu"))


def _train(data, ckpt: Path, stop_after: int | None = None, student: Spec = STUDENT):
    def on_epoch(history):
        if len(history) == stop_after:
            raise _Killed

    return train(data, student, build_method("student"), RECIPE, 0, make_accelerator("cpu"),
                 checkpoint=ckpt, on_epoch=on_epoch)


def _same(a, b) -> bool:
    pa, pb = a.model.state_dict(), b.model.state_dict()
    return a.history == b.history and all(torch.equal(pa[k], pb[k]) for k in pa)


@pytest.mark.parametrize("how", ["random", "truncated", "empty"])
def test_a_damaged_checkpoint_is_set_aside_and_the_cell_starts_again(data, full, tmp_path,
                                                                     capsys, how):
    ckpt = tmp_path / "checkpoint.pt"
    with pytest.raises(_Killed):
        _train(data, ckpt, stop_after=1)
    assert ckpt.exists() and not previous_path(ckpt).exists()
    _damage(ckpt, how)
    damaged = ckpt.read_bytes()
    result = _train(data, ckpt)
    assert len(result.epoch_s) == 3  # from scratch
    assert _same(result, full)
    (aside,) = set_aside(ckpt)
    assert aside.read_bytes() == damaged  # kept for a look
    log = (tmp_path / "log.txt").read_text()
    assert f"{ckpt} is damaged (" in log and aside.name in log and "starting from scratch" in log
    err = capsys.readouterr().err
    assert f"kt-bench: {ckpt} is damaged (" in err and "Traceback" not in err


@pytest.mark.parametrize("how", ["random", "missing"])
def test_a_damaged_checkpoint_resumes_from_the_previous_copy(data, full, tmp_path, how):
    ckpt = tmp_path / "checkpoint.pt"
    with pytest.raises(_Killed):
        _train(data, ckpt, stop_after=2)
    prev = previous_path(ckpt)
    assert len(torch.load(prev, weights_only=False)["history"]) == 1
    assert len(torch.load(ckpt, weights_only=False)["history"]) == 2
    if how == "missing":  # cut between keeping the previous copy and writing the new one
        ckpt.unlink()
    else:
        _damage(ckpt, how)
    result = _train(data, ckpt)
    assert len(result.epoch_s) == 2  # epochs 2 and 3, after the previous copy's epoch 1
    assert _same(result, full)
    assert len(set_aside(ckpt)) == (how != "missing")
    assert f"resuming from {prev}" in (tmp_path / "log.txt").read_text()


def test_a_checkpoint_of_another_architecture_counts_as_damaged(data, full, tmp_path):
    ckpt = tmp_path / "checkpoint.pt"
    with pytest.raises(_Killed):
        _train(data, ckpt, stop_after=1, student=Spec("resnet8", {"width": 0.5}))
    result = _train(data, ckpt)
    assert _same(result, full)  # nothing of the half-fitting state was kept
    assert len(set_aside(ckpt)) == 1
    log = (tmp_path / "log.txt").read_text()
    assert "(RuntimeError: Error(s) in loading state_dict for Trainee: size mismatch" in log


@pytest.fixture
def run_copy(finished, tmp_path):
    """A copy of the finished run to damage."""
    grid, out = finished
    shutil.copytree(out, tmp_path / "out")
    return grid, tmp_path / "out"


def test_a_damaged_teacher_cache_is_trained_again_once(run_copy, capsys, monkeypatch):
    grid, out = run_copy
    before = sorted_rows(out)
    (cache,) = (out / "teachers").glob("*.pt")
    _damage(cache, "random")
    # and a damaged training checkpoint of that teacher, as if it had been killed too
    ckpt = cache.with_suffix(".ckpt")
    _damage(ckpt, "empty")
    for cell in (out / "cells").iterdir():
        (cell / "result.json").unlink()
        (cell / "checkpoint.pt").unlink()
    trained = []
    monkeypatch.setattr(teachers, "train", lambda *a, **k: trained.append(1) or train(*a, **k))
    code, _, err = run_cli(capsys, "run", "--grid", str(grid), "--out", str(out), "--no-report")
    assert code == 0 and len(trained) == 1
    after = sorted_rows(out)
    assert list(after["status"]) == ["ok", "ok"]
    assert after[NUMBERS].equals(before[NUMBERS])  # the same teacher, trained again
    assert len(set_aside(cache)) == 1 and len(set_aside(ckpt)) == 1
    assert not ckpt.exists() and not previous_path(ckpt).exists()
    assert f"kt-bench: {cache} is damaged (" in err and "training it again" in err
    assert cache.name in (out / "teachers" / "log.txt").read_text()


def test_a_damaged_cache_of_a_checkpoint_teacher_is_evaluated_again(tmp_path, capsys):
    from kt_bench.models import build_model

    torch.manual_seed(0)
    teacher = build_model(Spec("resnet8", {"width": 0.5}), num_classes=10)
    good = tmp_path / "teacher.pt"
    torch.save({"state_dict": teacher.state_dict()}, good)
    grid = write_tiny_grid(tmp_path, methods=("kd",))
    out = tmp_path / "out"
    argv = ["run", "--grid", str(grid), "--out", str(out), "--no-report"]
    assert run_cli(capsys, *argv, "--teacher-checkpoint", str(good))[0] == 0
    before = sorted_rows(out)
    (cache,) = (out / "teachers").glob("*.pt")
    _damage(cache, "truncated")
    next((out / "cells").glob("*/result.json")).unlink()
    code, _, err = run_cli(capsys, *argv, "--teacher-checkpoint", str(good))
    assert code == 0 and "loading and evaluating it again" in err
    assert sorted_rows(out)[NUMBERS].equals(before[NUMBERS])
    assert not list((out / "teachers").glob("*.ckpt"))  # evaluated, not trained

    bad = tmp_path / "bad.pt"
    _damage(bad, "random")
    code, _, err = run_cli(capsys, "run", "--grid", str(grid), "--out", str(tmp_path / "o2"),
                        "--no-report", "--teacher-checkpoint", str(bad))
    assert code == 1
    row = sorted_rows(tmp_path / "o2").iloc[0]
    assert row["status"] == "failed"
    assert row["error"].startswith(f"teacher checkpoint {bad} cannot be read: ")
    assert "\n" not in row["error"]


@pytest.mark.parametrize("text", ["{bad", "[]", ""])
def test_a_damaged_row_is_left_out_of_reports_and_its_cell_runs_again(run_copy, capsys, text):
    grid, out = run_copy
    before = sorted_rows(out)
    (kd,) = [p for p in (out / "cells").glob("*/result.json")
             if json.loads((p.parent / "config.json").read_text())["method"] == "kd"]
    kd.write_text(text)

    code, stdout, err = run_cli(capsys, "status", str(out))
    assert code == 0
    assert "1 ok, 1 interrupted" in stdout and "result.json is damaged" in stdout
    code, stdout, err = run_cli(capsys, "report", str(out))
    assert code == 0
    assert f"kt-bench: warning: {kd} is damaged" in err

    code, _, err = run_cli(capsys, "run", "--grid", str(grid), "--out", str(out), "--no-report")
    assert code == 0 and f"{kd} is damaged" in err
    assert len(set_aside(kd)) == 1 and set_aside(kd)[0].read_text() == text
    after = sorted_rows(out)
    assert list(after["status"]) == ["ok", "ok"]
    assert after[NUMBERS].equals(before[NUMBERS])  # rebuilt from the cell's last checkpoint
    code, _, err = run_cli(capsys, "report", str(out))
    assert code == 0 and "damaged" not in err


def test_a_damaged_manifest_is_rebuilt_and_every_command_works(run_copy, capsys):
    grid, out = run_copy
    manifest = out / "manifest.json"
    manifest.write_text("{bad\n")

    code, stdout, err = run_cli(capsys, "status", str(out))
    assert code == 0 and "2 cells: 2 ok" in stdout
    assert f"kt-bench: warning: {manifest} is damaged" in err
    code, _, err = run_cli(capsys, "report", str(out))
    assert code == 0
    code, _, err = run_cli(capsys, "run", "--grid", str(grid), "--out", str(out), "--no-report")
    assert code == 0 and f"{manifest} is damaged" in err
    assert len(json.loads(manifest.read_text())) == 2  # rewritten whole

    # with a damaged cell config too, the cell is still listed, by its id
    manifest.write_text("[]")
    config = next((out / "cells").glob("*/config.json"))
    config.write_text("{bad")
    code, stdout, err = run_cli(capsys, "status", str(out))
    assert code == 0 and config.parent.name in stdout and "2 cells: 2 ok" in stdout
