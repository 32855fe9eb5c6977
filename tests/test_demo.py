"""The full demo grid, as the README's first command runs it (slow: several minutes)."""

import pandas as pd
import pytest

from kt_bench.commands.main import main

from .conftest import share_fusion_choice

DEMO_METHODS = ["student", "kd", "fitnet", "at", "nst_linear", "nst_poly", "nst_gauss",
                "kd+nst_poly"]


@pytest.mark.slow
def test_demo_grid_trains_a_teacher_clearly_above_the_student(tmp_path, capsys):
    assert main(["run", "--grid", "demo", "--out", str(tmp_path / "demo")]) == 0
    rows = pd.read_csv(tmp_path / "demo" / "results.csv")
    assert sorted(rows["method"].unique()) == sorted(DEMO_METHODS)
    assert len(rows) == 3 * len(DEMO_METHODS) and set(rows["seed"]) == {0, 1, 2}
    assert (rows["status"] == "ok").all()
    assert rows["teacher_top1"].nunique() == 1  # one teacher for every seed
    student = rows.loc[rows["method"] == "student", "top1"].mean()
    assert rows["teacher_top1"].iloc[0] >= student + 1.0
    stdout = capsys.readouterr().out
    assert all(m in stdout for m in DEMO_METHODS)
    # the demo's downstream evaluation: a linear probe of every student, a column of its own
    probes = pd.read_csv(tmp_path / "demo" / "downstream.csv")
    assert len(probes) == len(rows) and (probes["status"] == "ok").all()
    assert set(probes["unit"]) == {"probe-digits"} and probes["value"].between(0, 100).all()
    assert "probe-digits top1 (Δ vs student" in stdout
    for name in ("report.md", "report/table.tex", "report/accuracy.png", "report/curves.png"):
        assert (tmp_path / "demo" / name).exists(), name


@pytest.mark.slow
def test_full_demo_grid_through_the_local_launcher_equals_the_plain_run(tmp_path):
    """The whole demo grid (its own teacher trained in the job) as a local submitit job."""
    numbers = ["cell_id", "method", "status", "top1", "top5", "top1_best", "teacher_top1"]
    plain, jobs = tmp_path / "plain", tmp_path / "jobs"
    assert main(["run", "--grid", "demo", "--device", "cpu", "--no-report",
                 "--out", str(plain)]) == 0
    share_fusion_choice(plain, jobs)
    assert main(["run", "--grid", "demo", "--device", "cpu", "--no-report", "--launcher",
                 "local", "--out", str(jobs)]) == 0
    a = pd.read_csv(plain / "results.csv").sort_values("cell_id").reset_index(drop=True)
    b = pd.read_csv(jobs / "results.csv").sort_values("cell_id").reset_index(drop=True)
    assert len(b) == 3 * len(DEMO_METHODS) and (b["status"] == "ok").all()
    assert a[numbers].equals(b[numbers])
