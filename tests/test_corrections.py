"""Holm and Benjamini–Hochberg corrections of a table's changes against the student, by hand:
adjusted p-values, the level of each interval, and the marks a corrected table shows."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from kt_bench.core.errors import KtBenchError
from kt_bench.reporting.corrections import adjusted_p, check_correction, interval_alphas
from kt_bench.reporting.report import (
    comparison_table,
    correction_note,
    latex_pivot,
    markdown_pivot,
    summarise,
)

#: p-values in the order given; sorted: 0.005 (4th), 0.01 (1st), 0.03 (3rd), 0.04 (2nd).
P = [0.01, 0.04, 0.03, 0.005]


def test_holm_adjusted_p_is_the_running_max_of_the_step_down_products():
    # 4 x 0.005 = 0.02; 3 x 0.01 = 0.03; 2 x 0.03 = 0.06; max(0.06, 1 x 0.04) = 0.06
    assert adjusted_p(P, "holm") == pytest.approx([0.03, 0.06, 0.06, 0.02])


def test_bh_adjusted_p_is_the_running_min_from_the_largest_p():
    # m/j p: 4 x 0.005 = 0.02, 2 x 0.01 = 0.02, 4/3 x 0.03 = 0.04, 1 x 0.04 = 0.04
    assert adjusted_p(P, "bh") == pytest.approx([0.02, 0.04, 0.04, 0.02])
    assert adjusted_p(P, "none") == P


def test_holm_interval_levels_follow_the_step_down_until_it_stops():
    # 0.005 <= 0.05/4 and 0.01 <= 0.05/3 are rejected; 0.03 > 0.05/2 stops the procedure, and
    # every later comparison keeps that level
    assert interval_alphas(P, "holm") == pytest.approx([0.05 / 3, 0.025, 0.025, 0.0125])


def test_bh_interval_levels_are_r_alpha_over_m():
    # thresholds 0.0125, 0.025, 0.0375, 0.05: 0.001 and 0.02 pass, 0.04 and 0.3 do not: R = 2
    assert interval_alphas([0.3, 0.001, 0.04, 0.02], "bh") == pytest.approx([0.025] * 4)
    assert interval_alphas(P, "bh") == pytest.approx([0.05] * 4)  # all four rejected
    assert interval_alphas([0.5, 0.9], "bh") == pytest.approx([0.025] * 2)  # none: alpha/m


def test_comparisons_without_a_p_value_are_no_part_of_the_family():
    adjusted = adjusted_p([math.nan, 0.02, 0.04], "holm")
    assert math.isnan(adjusted[0]) and adjusted[1:] == pytest.approx([0.04, 0.04])
    alphas = interval_alphas([math.nan, 0.02], "holm")
    assert math.isnan(alphas[0]) and alphas[1] == pytest.approx(0.05)


def test_an_unknown_correction_is_a_one_line_error():
    with pytest.raises(KtBenchError, match=r"^--correct 'bonferroni' is invalid; accepted: "
                                           r"holm, bh, none$"):
        check_correction("bonferroni")


def _rows() -> pd.DataFrame:
    """The student at 70 on three seeds and three methods whose seed differences are set."""
    diffs = {"kd": [1.0, 2.0, 3.0], "at": [3.0, 3.1, 2.9], "fitnet": [1.5, 2.25, 3.0]}
    out = [{"dataset": "d", "teacher": "t", "student": "s", "method": "student", "seed": s,
            "top1": 70.0, "status": "ok"} for s in range(3)]
    for method, d in diffs.items():
        out += [{"dataset": "d", "teacher": "t", "student": "s", "method": method, "seed": s,
                 "top1": 70.0 + x, "status": "ok"} for s, x in enumerate(d)]
    return pd.DataFrame(out)


def _t2(q: float) -> float:
    """Student's t quantile with 2 degrees of freedom (closed form: F(t) = 1/2 +
    t / (2 sqrt(2 + t^2)))."""
    a = 2 * q - 1
    return a * math.sqrt(2 / (1 - a * a))


def _p2(t: float) -> float:
    """Two-sided p of t with 2 degrees of freedom."""
    return 1 - abs(t) / math.sqrt(2 + t * t)


def test_holm_marks_and_intervals_of_a_hand_computed_table():
    # at: mean 3, se 0.1/sqrt3, t = 51.96, p = 0.00037016; fitnet: mean 2.25, se 0.75/sqrt3,
    # t = 5.196, p = 0.0351; kd: mean 2, se 1/sqrt3, t = 3.464, p = 0.0742
    se = {"at": 0.1 / math.sqrt(3), "fitnet": 0.75 / math.sqrt(3), "kd": 1 / math.sqrt(3)}
    mean = {"at": 3.0, "fitnet": 2.25, "kd": 2.0}
    p = {m: _p2(mean[m] / se[m]) for m in mean}
    assert p == pytest.approx({"at": 0.00037016, "fitnet": 0.035099, "kd": 0.074180}, rel=1e-4)
    plain = summarise(_rows(), correct="none").set_index("method")
    holm = summarise(_rows(), correct="holm").set_index("method")
    assert holm.loc[list(p), "p"].tolist() == pytest.approx(list(p.values()))
    # uncorrected, fitnet's p < 0.05 is significant; Holm (rank 2 of 3) doubles it to 0.0702
    assert plain.loc["fitnet", "significant"] and not holm.loc["fitnet", "significant"]
    assert holm.loc["at", "significant"] and not holm.loc["kd", "significant"]
    assert holm.loc[["at", "fitnet", "kd"], "p_adj"].tolist() == pytest.approx(
        [3 * p["at"], 2 * p["fitnet"], max(2 * p["fitnet"], p["kd"])])
    # intervals at Holm's levels: at 1 - 0.05/3, fitnet and kd 1 - 0.05/2 (where it stopped)
    for method, alpha in (("at", 0.05 / 3), ("fitnet", 0.025), ("kd", 0.025)):
        half = _t2(1 - alpha / 2) * se[method]
        line = holm.loc[method]
        assert line["ci_level"] == pytest.approx(1 - alpha)
        assert (line["delta_lo"], line["delta_hi"]) == pytest.approx(
            (mean[method] - half, mean[method] + half))
    half = _t2(0.975) * se["fitnet"]  # uncorrected: the 95% interval, as before
    assert plain.loc["fitnet", "delta_lo"] == pytest.approx(2.25 - half)
    # the tables mark it: † under Holm, none uncorrected; the note says how
    assert "(+2.25†)" in markdown_pivot(summarise(_rows()))
    assert "(+2.25)" in markdown_pivot(summarise(_rows(), correct="none"))
    note = correction_note(summarise(_rows()))
    assert "The 3 changes against `student`" in note and "Holm's step-down" in note
    assert "Holm" in latex_pivot(summarise(_rows())).rsplit(r"\bottomrule", 1)[1]
    text = comparison_table(_rows(), reference=pd.DataFrame())
    assert "Δ top1 vs student (Holm CI)" in text and "p (Holm)" in text and "0.070" in text
    bh = summarise(_rows(), correct="bh").set_index("method")
    # BH: fitnet 3/2 x 0.0351 = 0.0526 > 0.05; R = 1, intervals at 1 - 0.05/3
    assert bh.loc["fitnet", "p_adj"] == pytest.approx(1.5 * p["fitnet"])
    assert bh.loc["kd", "ci_level"] == pytest.approx(1 - 0.05 / 3)
    assert "Benjamini–Hochberg" in correction_note(summarise(_rows(), correct="bh"))


def test_the_python_report_checks_its_correction(tmp_path):
    import kt_bench

    with pytest.raises(KtBenchError, match=r"^kt_bench.report: correct = 'fdr' is invalid; "
                                           r"accepted: holm, bh, none$"):
        kt_bench.report(tmp_path, correct="fdr")
