"""Every published figure of crd_cifar100.csv prints beside its crd-cifar100 cell."""

from __future__ import annotations

import pandas as pd

from kt_bench.cells import expand
from kt_bench.config import load_grid
from kt_bench.report import load_reference, summarise


def test_each_crd_cell_shows_its_published_figure():
    cells = expand(load_grid("crd-cifar100"))
    rows = pd.DataFrame([{**c.identity(), "status": "ok", "top1": 50.0, "top1_best": 51.0,
                          "top5": 80.0, "teacher_top1": 70.0, "wall_s": 1.0,
                          "images_per_s": 1.0} for c in cells])
    reference = load_reference()
    ref = reference[reference["grid"] == "crd-cifar100"]
    summary = summarise(rows, reference).set_index(["teacher", "student", "method"])
    assert len(summary) == len(cells)
    shown = 0
    for r in ref.itertuples():
        key = (r.teacher, r.student, r.method)
        if key not in summary.index:  # methods of the table not in the grid yet (AB, FT, ...)
            assert r.method in {"ab", "ft", "fsp"}, key
            continue
        line = summary.loc[key]
        if pd.isna(r.top1):
            assert r.method == "dkd" and line["published_top1_best"] == r.top1_best
        else:
            assert line["published_top1"] == r.top1
        assert line["published_teacher_top1"] == r.teacher_top1
        shown += 1
    # every same-architecture figure of the methods in the grid: 11 R rows x 7 pairs
    # (student, kd, fitnet, at, sp, cc, vid, rkd, pkt, nst_poly, crd) + 6 DKD figures
    assert shown == 11 * 7 + 6
