"""--teachers-dir runs a grid on the published teachers (RepDistiller's folder layout)."""

from __future__ import annotations

import pandas as pd
import torch

from kt_bench.commands.main import main
from kt_bench.core.options import Spec
from kt_bench.models import build_model

from .conftest import write_tiny_grid


def test_every_pair_loads_its_published_teacher(tmp_path, capsys):
    grid = write_tiny_grid(tmp_path, methods=("student", "kd"))
    teachers = tmp_path / "teachers"
    (teachers / "resnet8_vanilla").mkdir(parents=True)
    torch.manual_seed(3)
    model = build_model(Spec("resnet8", {"width": 0.5}), 10)
    torch.save({"model": model.state_dict(), "epoch": 240},
               teachers / "resnet8_vanilla" / "ckpt_epoch_240.pth")
    out = tmp_path / "out"
    assert main(["run", "--grid", str(grid), "--out", str(out), "--no-report",
                 "--teachers-dir", str(teachers)]) == 0
    rows = pd.read_csv(out / "results.csv")
    assert set(rows["status"]) == {"ok"}
    assert not list((out / "teachers").glob("*.ckpt"))  # loaded, never trained
    config = next((out / "cells").glob("*/config.json")).read_text()
    assert "resnet8_vanilla/ckpt_epoch_240.pth" in config  # part of the teacher's identity
    capsys.readouterr()


def test_a_missing_published_teacher_is_one_line(tmp_path, capsys):
    grid = write_tiny_grid(tmp_path)
    code = main(["run", "--grid", str(grid), "--dry-run", "--teachers-dir",
                 str(tmp_path / "none")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert err.startswith(f"kt-bench: error: --teachers-dir {tmp_path / 'none'}: no published "
                          "teacher for 'resnet8' at ")
