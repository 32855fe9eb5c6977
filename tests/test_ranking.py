"""Methods ranked across problems (Demšar 2006), by hand: ranks with ties, mean ranks, the
Nemenyi critical difference, the Friedman statistic, the groups a diagram joins, and the
diagram's files."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from kt_bench.core.errors import KtBenchError
from kt_bench.reporting.ranking import (
    cliques,
    critical_difference,
    friedman,
    mean_ranks,
    nemenyi_q,
    problem_scores,
    rank_matrix,
    rank_methods,
)

#: Four problems x four methods (higher is better); b and c tie on p1.
SCORES = pd.DataFrame({"a": [90, 85, 70, 50], "b": [80, 86, 60, 40], "c": [80, 70, 65, 45],
                       "d": [70, 60, 71, 30]}, index=["p1", "p2", "p3", "p4"], dtype=float)


def test_ranks_are_one_for_the_best_and_ties_share_their_mean_rank():
    assert rank_matrix(SCORES).loc["p1"].tolist() == [1.0, 2.5, 2.5, 4.0]
    assert rank_matrix(SCORES).loc["p3"].tolist() == [2.0, 4.0, 3.0, 1.0]
    # a: (1+2+2+1)/4; b: (2.5+1+4+3)/4; c: (2.5+3+3+2)/4; d: (4+4+1+4)/4
    assert mean_ranks(SCORES).to_dict() == pytest.approx(
        {"a": 1.5, "b": 2.625, "c": 2.625, "d": 3.25})
    assert list(mean_ranks(SCORES).index) == ["a", "b", "c", "d"]


@pytest.mark.parametrize("k, q", [(2, 1.960), (3, 2.343), (4, 2.569), (5, 2.728), (6, 2.850),
                                  (7, 2.949), (8, 3.031), (9, 3.102), (10, 3.164)])
def test_nemenyi_q_matches_demsars_table(k, q):
    assert nemenyi_q(k) == pytest.approx(q, abs=1e-3)


def test_critical_difference_by_hand():
    # q(4) = 2.569; CD = 2.569 * sqrt(4 * 5 / (6 * 4)) = 2.3452
    assert critical_difference(4, 4) == pytest.approx(2.569 * math.sqrt(20 / 24), abs=1e-3)
    with pytest.raises(KtBenchError, match="two or more methods, got 1"):
        critical_difference(1, 4)


def test_friedman_statistic_and_iman_davenport_f_by_hand():
    # chi2 = 12N/(k(k+1)) (sum R^2 - k(k+1)^2/4) = 2.4 (1.5^2 + 2 x 2.625^2 + 3.25^2 - 25)
    chi2, f, p = friedman(SCORES)
    assert chi2 == pytest.approx(3.825)
    assert f == pytest.approx(3 * 3.825 / (12 - 3.825))  # (N-1) chi2 / (N(k-1) - chi2)
    from scipy.stats import f as f_distribution

    assert p == pytest.approx(f_distribution.sf(f, 3, 9))
    agree = pd.DataFrame({"a": [3.0, 3.0], "b": [2.0, 2.0], "c": [1.0, 1.0]})
    assert friedman(agree)[1:] == (math.inf, 0.0)  # every problem ranks them alike


def test_cliques_join_methods_closer_than_the_critical_difference():
    ranks = mean_ranks(SCORES)  # a 1.5, b 2.625, c 2.625, d 3.25
    assert cliques(ranks, 2.35) == [["a", "b", "c", "d"]]
    assert cliques(ranks, 0.7) == [["b", "c", "d"]]  # a is 1.125 from b
    assert cliques(ranks, 0.5) == [["b", "c"]]  # d is 0.625 from c
    chain = pd.Series({"x": 1.0, "y": 1.8, "z": 2.6})
    assert cliques(chain, 1.0) == [["x", "y"], ["y", "z"]]  # x and z are 1.6 apart


def test_rank_methods_leaves_out_methods_missing_a_problem():
    scores = SCORES.assign(e=[99.0, None, 99.0, 99.0])
    ranking = rank_methods(scores)
    assert ranking.left_out == ["e"] and ranking.problems == 4
    assert ranking.ranks.to_dict() == pytest.approx(mean_ranks(SCORES).to_dict())
    assert ranking.cd == pytest.approx(critical_difference(4, 4))
    assert rank_methods(SCORES.iloc[:1]) is None  # one problem: nothing to rank across


def test_problem_scores_take_each_pair_as_a_problem():
    summary = pd.DataFrame({
        "dataset": ["c", "c", "c", "c"], "teacher": ["t1", "t1", "t2", "t2"],
        "student": ["s", "s", "s", "s"], "method": ["student", "kd"] * 2,
        "top1": [70.0, 72.0, 60.0, 59.0], "config": ["", "", "", ""]})
    scores = problem_scores(summary)
    assert list(scores.index) == ["c: t1 → s", "c: t2 → s"]
    assert scores.to_dict("list") == {"student": [70.0, 60.0], "kd": [72.0, 59.0]}


def test_cd_diagram_writes_png_and_pdf(tmp_path):
    from kt_bench.reporting.cd_diagram import cd_diagram

    paths = cd_diagram(rank_methods(SCORES), tmp_path)
    assert [p.name for p in paths] == ["ranking.png", "ranking.pdf"]
    assert all(p.stat().st_size > 1000 for p in paths)


def test_a_tiny_p_value_is_printed_as_a_bound_not_as_zero():
    from kt_bench.reporting.ranking import p_text

    assert p_text(0.0) == "p < 0.001" and p_text(0.0004) == "p < 0.001"
    assert p_text(0.0123) == "p = 0.0123" and p_text(0.5) == "p = 0.5"
