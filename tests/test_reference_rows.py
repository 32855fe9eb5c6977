"""Every published figure of the CIFAR-100 tables prints beside its cell."""

from __future__ import annotations

import pandas as pd
import pytest

from kt_bench.reporting.report import display_table, load_reference, summarise
from kt_bench.sweep.cells import expand
from kt_bench.sweep.config import load_grid


@pytest.mark.parametrize("grid,figures", [
    # RepDistiller: 14 rows x 7 pairs (FSP's N/A a row without a number); mdistiller: 6 DKD
    ("crd-cifar100", 14 * 7 + 6),
    # RepDistiller: 13 rows x 6 pairs (no FSP row); mdistiller: 5 DKD
    ("crd-cifar100-hetero", 13 * 6 + 5),
])
def test_each_cell_shows_its_published_figure(grid, figures):
    cells = expand(load_grid(grid))
    rows = pd.DataFrame([{**c.identity(), "status": "ok", "top1": 50.0, "top1_best": 51.0,
                          "top5": 80.0, "teacher_top1": 70.0, "wall_s": 1.0,
                          "images_per_s": 1.0} for c in cells])
    reference = load_reference()
    ref = reference[reference["grid"] == grid]
    assert len(ref) == figures
    summary = summarise(rows, reference)
    shown = display_table(summary).set_index(["method"], append=True)
    summary = summary.set_index(["teacher", "student", "method"])
    assert len(summary) == len(cells)
    for r in ref.itertuples():
        line = summary.loc[(r.teacher, r.student, r.method)]
        if not pd.isna(r.top1):
            assert line["published_top1"] == r.top1
        elif r.method == "dkd":  # mdistiller's figures are best-epoch means
            assert line["published_top1_best"] == r.top1_best
        else:  # the published table prints N/A (FSP on wrn_40_2 -> wrn_40_1)
            assert r.method == "fsp" and pd.isna(line["published_top1"])
        assert line["published_teacher_top1"] == r.teacher_top1
    texts = set(shown["published top1"])
    assert "n/a" in texts or grid.endswith("hetero")
    assert any(t.endswith("(best epoch)") for t in texts)


def test_hetero_cifar100_reference_rows_name_its_cells_and_hold_no_guessed_figure():
    cells = expand(load_grid("hetero-cifar100"))
    keys = {(c.dataset.label, c.teacher.label, c.student.label, c.method) for c in cells}
    reference = load_reference()
    ref = reference[reference["grid"] == "hetero-cifar100"]
    assert len(ref) == 10 * 9  # 10 pairs x the 9 rows of OFA-KD's CIFAR-100 comparison
    assert all((r.dataset, r.teacher, r.student, r.method) in keys for r in ref.itertuples())
    assert ref[["top1", "top1_best", "teacher_top1"]].isna().all().all()
    assert ref["note"].str.startswith("not transcribed").all()
