"""The full demo grid, as the README's first command runs it (slow: about 4 minutes)."""

import pandas as pd
import pytest

from kt_bench.cli import main

DEMO_METHODS = ["student", "kd", "fitnet", "at", "nst_linear", "nst_poly", "nst_gauss",
                "kd+nst_poly"]


@pytest.mark.slow
def test_demo_grid_trains_a_teacher_clearly_above_the_student(tmp_path, capsys):
    assert main(["run", "--grid", "demo", "--out", str(tmp_path / "demo")]) == 0
    rows = pd.read_csv(tmp_path / "demo" / "results.csv").set_index("method")
    assert sorted(rows.index) == sorted(DEMO_METHODS)
    assert (rows["status"] == "ok").all()
    assert rows["teacher_top1"].iloc[0] >= rows.loc["student", "top1"] + 1.0
    stdout = capsys.readouterr().out
    assert all(m in stdout for m in DEMO_METHODS)
    for name in ("report.md", "report/table.tex", "report/accuracy.png", "report/curves.png"):
        assert (tmp_path / "demo" / name).exists(), name
