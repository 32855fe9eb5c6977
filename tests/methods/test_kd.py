"""``kd`` and ``kd_ls`` (KD on standardized logits): the formula against a loop-level
computation, its gradient, options, and the loss of a configured cell against RepDistiller's
(tests/repdistiller_ref.py) and the logit-standardization authors' code
(tests/ref_logit_methods.py)."""

from __future__ import annotations

import math

import pytest
import torch
from kt_bench.methods.kd import kd_loss

from kt_bench.api.method import method_config
from kt_bench.api.plugins import load_builtin_methods

from ..ref_logit_methods import LS_KD_DEFAULTS, LS_KD_PAIRS, ls_kd_total
from . import composition
from .loops import (
    check_feature_gradient,
    check_logit_gradient,
    draw,
    kl,
    lists,
    softmax,
)

load_builtin_methods()
torch.manual_seed(0)


def _zscore(z: list[float]) -> list[float]:
    m = sum(z) / len(z)
    sd = math.sqrt(sum((v - m) ** 2 for v in z) / (len(z) - 1))  # unbiased
    return [(v - m) / (sd + 1e-7) for v in z]


def kd_direct(s, t, T, standardize=False):
    """T² · mean over samples of KL(softmax(t/T) ‖ softmax(s/T)), optionally z-scored."""
    total = 0.0
    for i in range(len(s)):
        a, b = (_zscore(s[i]), _zscore(t[i])) if standardize else (s[i], t[i])
        total += kl(softmax([v / T for v in b]), softmax([v / T for v in a]))
    return T * T * total / len(s)


# ---- values ---------------------------------------------------------------------------------

def test_kd_loss_is_t2_times_kl_teacher_to_student():
    s, t, T = torch.randn(4, 7), torch.randn(4, 7), 3.0
    expected = 0.0
    for i in range(4):
        p_s = softmax([v / T for v in s[i].tolist()])
        p_t = softmax([v / T for v in t[i].tolist()])
        expected += sum(pt * (math.log(pt) - math.log(ps)) for pt, ps in zip(p_t, p_s, strict=True))
    expected = T * T * expected / 4
    assert kd_loss(s, t, T).item() == pytest.approx(expected, rel=1e-5)
    assert kd_loss(t, t, T).item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("b,c,T", [(2, 5, 2.0), (4, 10, 3.0), (3, 100, 4.0)])
def test_kd_loss_with_standardization_matches_the_loop_level_formula(b, c, T):
    s, t, _ = draw(b, c, seed=21 + b, scale=5.0)
    expected = kd_direct(lists(s), lists(t), T, standardize=True)
    assert kd_loss(s, t, T, standardize=True).item() == pytest.approx(expected, rel=1e-5)
    # off, it is plain KD, unchanged
    assert kd_loss(s, t, T).item() == pytest.approx(kd_direct(lists(s), lists(t), T), rel=1e-5)


def test_standardized_kd_ignores_per_sample_shift_and_scale():
    s, t, _ = draw(3, 10, seed=5)
    a = torch.tensor([[0.5], [3.0], [10.0]], dtype=torch.float64)
    shifted = s * a + torch.tensor([[1.0], [-4.0], [7.0]], dtype=torch.float64)
    base = kd_loss(s, t, 2.0, standardize=True).item()
    assert kd_loss(shifted, t * 2.5 - 1.0, 2.0, standardize=True).item() == pytest.approx(
        base, rel=1e-4)
    assert kd_loss(shifted, t, 2.0).item() != pytest.approx(kd_loss(s, t, 2.0).item(), rel=1e-2)


# ---- gradients ------------------------------------------------------------------------------

def test_gradient_reaches_the_student_only_and_matches_finite_differences():
    check_feature_gradient(lambda s, t: kd_loss(s.flatten(1), t.flatten(1), 2.0))


@pytest.mark.parametrize("b", [2, 4])
def test_standardized_gradient_reaches_the_student_only_and_matches_finite_differences(b):
    check_logit_gradient(lambda s, t, y: kd_loss(s, t, 2.0, standardize=True),
                         lambda s, t, y: kd_direct(lists(s), lists(t), 2.0, standardize=True), b)


# ---- the methods: options, weights -----------------------------------------------------------

def test_defaults_are_the_reference_configurations():
    assert method_config("kd_ls")["kd_ls"] == {"weight": 9.0, "T": 2.0, "ce_weight": 0.1}
    assert composition.configured("kd_ls").standardize is True
    # kd keeps its defaults; standardize is off unless asked for
    assert method_config("kd")["kd"] == {"weight": 1.0, "T": 4.0, "standardize": False,
                                        "ce_weight": None}
    assert composition.configured("kd", {"kd": {"standardize": True}}).standardize is True


def test_kd_ls_weight_does_not_ramp():
    assert composition.configured("kd_ls").term_weights(0, 240) == {"kd_ls": 9.0}


@pytest.mark.parametrize("options", [{"T": -2.0}])
def test_bad_option_values_are_config_errors(options):
    composition.assert_config_error("kd_ls", options)


# ---- composition: kt-bench's cell vs the reference code's loss ------------------------------

@pytest.mark.parametrize("teacher_name,student_name", composition.PAIRS)
def test_cell_loss_equals_repdistillers(teacher_name, student_name):
    composition.check_cell_loss_equals_repdistillers("kd", teacher_name, student_name)


@pytest.mark.parametrize("teacher_name,student_name", composition.LOGIT_PAIRS)
def test_kd_ls_cell_loss_equals_the_reference(teacher_name, student_name):
    teacher, student, x, y = composition.reference_models(teacher_name, student_name)
    T, w = LS_KD_PAIRS[(teacher_name, student_name)]
    options = {"ce_weight": LS_KD_DEFAULTS["CE_WEIGHT"], "T": T, "weight": w}
    cfg = {"TEMPERATURE": T, "KD_WEIGHT": w}
    composition.assert_same_loss_and_gradient(
        composition.configured_loss("kd_ls", options, teacher, student, x, y, 0),
        ls_kd_total(student, teacher, x, y, cfg), student)
    # and kd with standardize on is the same method
    kd_options = {**options, "standardize": True}
    ours = composition.configured_loss("kd", kd_options, teacher, student, x, y, 0)
    assert ours.item() == pytest.approx(ls_kd_total(student, teacher, x, y, cfg).item(),
                                        rel=1e-5)
