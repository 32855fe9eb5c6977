"""A few cells of the benchmark grids, trained a step on CIFAR-format files with published
teachers, report the published figures beside them."""

from __future__ import annotations

import pytest
import torch

from kt_bench.commands.main import main
from kt_bench.models import build_model
from kt_bench.training.reference_checkpoints import reference_teacher_path

from .fixtures import write_cifar100


def _published_teacher(folder, name: str) -> None:
    """A stand-in for the published file: the zoo's network saved as RepDistiller saves it."""
    path = reference_teacher_path(folder, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    torch.save({"model": build_model(name, 100).state_dict(), "epoch": 240}, path)


@pytest.mark.parametrize("grid,teacher,student,methods,published", [
    ("crd-cifar100", "resnet56", "resnet20", "student,kd,dkd",
     {"student": "69.06", "kd": "70.66", "dkd": "71.97 (best epoch)"}),
    pytest.param("crd-cifar100-hetero", "resnet32x4", "shufflev1", "kd,crd",
                 {"kd": "74.07", "crd": "75.11"}, marks=pytest.mark.slow),  # 16 s on 2 cores
])
def test_cells_of_the_benchmark_show_their_published_figures(tmp_path, capsys, grid, teacher,
                                                              student, methods, published):
    data, teachers, out = tmp_path / "data", tmp_path / "teachers", tmp_path / "out"
    write_cifar100(data, per_class_train=2, per_class_test=1)
    _published_teacher(teachers, teacher)
    args = ["run", "--grid", grid, "--only", f"teacher={teacher}", "--only",
            f"student={student}", "--methods", methods, "--epochs", "1", "--data-root",
            str(data), "--teachers-dir", str(teachers), "--out", str(out), "--no-report"]
    assert main(args) == 0
    capsys.readouterr()
    assert main(["report", str(out)]) == 0
    table = capsys.readouterr().out
    for method, figure in published.items():
        line = next(ln for ln in table.splitlines() if f"| {method} " in ln)
        assert f"| {figure} " in line, line
