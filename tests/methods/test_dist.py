"""``dist``: the formula against a loop-level computation, its gradient, options, and the
loss of a configured cell against a re-statement of the authors' code
(tests/ref_logit_methods.py)."""

from __future__ import annotations

import math

import pytest
from kt_bench.methods.dist import dist_loss

from kt_bench.api.method import method_config
from kt_bench.api.plugins import load_builtin_methods

from ..ref_logit_methods import DIST_CIFAR, dist_total
from . import composition
from .loops import check_logit_gradient, draw, lists, softmax

load_builtin_methods()


def _pearson(a: list[float], b: list[float]) -> float:
    ma, mb = sum(a) / len(a), sum(b) / len(b)
    ac, bc = [v - ma for v in a], [v - mb for v in b]
    num = sum(u * v for u, v in zip(ac, bc, strict=True))
    return num / (math.sqrt(sum(u * u for u in ac)) * math.sqrt(sum(v * v for v in bc)) + 1e-8)


def dist_direct(s, t, beta, gamma, tau):
    """τ²(β·(1 − mean row correlation) + γ·(1 − mean column correlation)) of softmax(z/τ)."""
    y_s = [softmax([v / tau for v in row]) for row in s]
    y_t = [softmax([v / tau for v in row]) for row in t]
    n, c = len(y_s), len(y_s[0])
    inter = 1 - sum(_pearson(y_s[i], y_t[i]) for i in range(n)) / n
    cols = [([y_s[i][k] for i in range(n)], [y_t[i][k] for i in range(n)]) for k in range(c)]
    intra = 1 - sum(_pearson(a, b) for a, b in cols) / c
    return tau * tau * (beta * inter + gamma * intra)


# ---- values ---------------------------------------------------------------------------------

@pytest.mark.parametrize("b,c,beta,gamma,tau", [(2, 5, 1.0, 1.0, 1.0), (2, 7, 1.0, 1.0, 4.0),
                                                (8, 10, 0.5, 2.0, 4.0), (5, 100, 1.0, 1.0, 4.0)])
def test_dist_loss_matches_the_loop_level_formula(b, c, beta, gamma, tau):
    s, t, _ = draw(b, c, seed=7 + b + c)
    expected = dist_direct(lists(s), lists(t), beta, gamma, tau)
    assert dist_loss(s, t, beta, gamma, tau).item() == pytest.approx(expected, rel=1e-5)


def test_dist_is_zero_for_equal_logits_and_beta_gamma_pick_the_relations():
    s, t, _ = draw(4, 6, seed=11)
    # not exactly 0: the 1e-8 in the correlation's denominator, ×τ²
    same = dist_loss(t, t, tau=4.0).item()
    assert same == pytest.approx(dist_direct(lists(t), lists(t), 1.0, 1.0, 4.0), abs=1e-5)
    assert 0 <= same < 1e-3
    inter = dist_loss(s, t, 1.0, 0.0, 2.0).item()
    intra = dist_loss(s, t, 0.0, 1.0, 2.0).item()
    assert inter > 0 and intra > 0
    assert dist_loss(s, t, 2.0, 3.0, 2.0).item() == pytest.approx(2 * inter + 3 * intra, rel=1e-5)


# ---- gradients ------------------------------------------------------------------------------

GRAD_CASES = {
    "dist": (lambda s, t, y: dist_loss(s, t, 1.0, 1.0, 4.0),
             lambda s, t, y: dist_direct(lists(s), lists(t), 1.0, 1.0, 4.0)),
    "dist_tau1": (lambda s, t, y: dist_loss(s, t, 2.0, 0.5, 1.0),
                  lambda s, t, y: dist_direct(lists(s), lists(t), 2.0, 0.5, 1.0)),
}


@pytest.mark.parametrize("name", list(GRAD_CASES))
@pytest.mark.parametrize("b", [2, 4])
def test_gradient_reaches_the_student_only_and_matches_finite_differences(name, b):
    check_logit_gradient(*GRAD_CASES[name], b)


# ---- the method: options, weights ------------------------------------------------------------

def test_defaults_are_the_reference_configuration():
    assert method_config("dist")["dist"] == {"weight": 2.0, "beta": 1.0, "gamma": 1.0,
                                            "tau": 4.0, "ce_weight": None}


@pytest.mark.parametrize("options", [{"tau": 0.0}, {"gamma": -0.5}])
def test_bad_option_values_are_config_errors(options):
    composition.assert_config_error("dist", options)


def test_dist_weight_does_not_ramp():
    assert composition.configured("dist").term_weights(0, 240) == {"dist": 2.0}


# ---- composition: kt-bench's cell vs the authors' loss --------------------------------------

@pytest.mark.parametrize("teacher_name,student_name", composition.LOGIT_PAIRS)
def test_dist_cell_loss_equals_the_authors(teacher_name, student_name):
    teacher, student, x, y = composition.reference_models(teacher_name, student_name)
    assert DIST_CIFAR["ori_loss_weight"] == 1.0  # so the recipe's CE weight 1 is theirs
    composition.assert_same_loss_and_gradient(
        composition.configured_loss("dist", {}, teacher, student, x, y, 0),
        dist_total(student, teacher, x, y), student)
