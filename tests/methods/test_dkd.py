"""``dkd``: the formula against the paper's definitions in loop-level arithmetic, its
gradient, options, the warm-up, the labels, and the loss of a configured cell against a
re-statement of mdistiller's (tests/ref_logit_methods.py)."""

from __future__ import annotations

import pytest
import torch
from kt_bench.methods.dkd import dkd_loss, nckd_loss, tckd_loss
from kt_bench.methods.kd import kd_loss

from kt_bench.api.method import Batch, method_config
from kt_bench.api.plugins import load_builtin_methods

from ..ref_logit_methods import M_DKD_BETA, M_DKD_DEFAULTS, m_dkd_total
from . import composition
from .loops import check_logit_gradient, draw, kl, lists, softmax

load_builtin_methods()


def dkd_direct(s, t, y, alpha, beta, T):
    """α·TCKD + β·NCKD from the paper's definitions, sample by sample."""
    total = 0.0
    for i in range(len(s)):
        p_s = softmax([v / T for v in s[i]])
        p_t = softmax([v / T for v in t[i]])
        g = y[i]
        tckd = kl([p_t[g], 1 - p_t[g]], [p_s[g], 1 - p_s[g]])
        rest = [c for c in range(len(s[i])) if c != g]
        q_s = softmax([s[i][c] / T for c in rest])
        q_t = softmax([t[i][c] / T for c in rest])
        total += alpha * tckd + beta * kl(q_t, q_s)
    return T * T * total / len(s)


# ---- values ---------------------------------------------------------------------------------

@pytest.mark.parametrize("b,c,alpha,beta,T", [(2, 5, 1.0, 8.0, 4.0), (6, 10, 0.5, 2.0, 1.0),
                                              (3, 100, 1.0, 6.0, 4.0)])
def test_dkd_loss_matches_the_loop_level_formula(b, c, alpha, beta, T):
    s, t, y = draw(b, c, seed=b * 100 + c)
    expected = dkd_direct(lists(s), lists(t), y.tolist(), alpha, beta, T)
    assert dkd_loss(s, t, y, alpha, beta, T).item() == pytest.approx(expected, rel=1e-5)
    # TCKD is a small KL between near-equal binary distributions: float32 cancellation (as in
    # mdistiller's own float32 form) leaves ~1e-5 relative error with 100 classes
    assert tckd_loss(s, t, y, T).item() == pytest.approx(
        dkd_direct(lists(s), lists(t), y.tolist(), 1.0, 0.0, T), rel=2e-4)
    assert nckd_loss(s, t, y, T).item() == pytest.approx(
        dkd_direct(lists(s), lists(t), y.tolist(), 0.0, 1.0, T), rel=1e-5)


def test_dkd_recombines_into_kd_for_one_sample():
    """The paper's identity KD = TCKD + (1 − p_t(target))·NCKD (one sample, so no averaging)."""
    s, t, y = draw(1, 8, seed=3)
    T = 4.0
    p_target = torch.softmax(t / T, dim=1)[0, y[0]].item()
    recombined = tckd_loss(s, t, y, T) + (1 - p_target) * nckd_loss(s, t, y, T)
    assert recombined.item() == pytest.approx(kd_loss(s, t, T).item(), rel=1e-5)


def test_dkd_depends_on_the_labels_and_vanishes_for_equal_logits():
    s, t, y = draw(4, 10, seed=4)
    assert dkd_loss(t, t, y).item() == pytest.approx(0.0, abs=1e-5)
    y2 = (y + 1) % 10
    assert dkd_loss(s, t, y).item() != pytest.approx(dkd_loss(s, t, y2).item(), rel=1e-3)


# ---- gradients ------------------------------------------------------------------------------

GRAD_CASES = {
    "dkd": (lambda s, t, y: dkd_loss(s, t, y, 1.0, 8.0, 4.0),
            lambda s, t, y: dkd_direct(lists(s), lists(t), y.tolist(), 1.0, 8.0, 4.0)),
    "dkd_T1": (lambda s, t, y: dkd_loss(s, t, y, 0.5, 2.0, 1.0),
               lambda s, t, y: dkd_direct(lists(s), lists(t), y.tolist(), 0.5, 2.0, 1.0)),
}


@pytest.mark.parametrize("name", list(GRAD_CASES))
@pytest.mark.parametrize("b", [2, 4])
def test_gradient_reaches_the_student_only_and_matches_finite_differences(name, b):
    check_logit_gradient(*GRAD_CASES[name], b)


# ---- the method: options, warm-up, labels ----------------------------------------------------

def test_defaults_are_the_reference_configuration():
    assert method_config("dkd")["dkd"] == {"weight": 1.0, "alpha": 1.0, "beta": 8.0, "T": 4.0,
                                          "warmup": 20, "ce_weight": None}
    assert M_DKD_DEFAULTS == {"CE_WEIGHT": 1.0, "ALPHA": 1.0, "BETA": 8.0, "T": 4.0,
                              "WARMUP": 20}


@pytest.mark.parametrize("options", [{"T": 0.0}, {"beta": -1.0}, {"warmup": -1}])
def test_bad_option_values_are_config_errors(options):
    composition.assert_config_error("dkd", options)


def test_dkd_weight_ramps_in_over_warmup_epochs_counted_from_one():
    dkd = composition.configured("dkd", {"dkd": {"weight": 2.0}})
    # mdistiller's epoch counter starts at 1: kt-bench's epoch e is its e + 1
    expected = {0: 2.0 / 20, 1: 2.0 * 2 / 20, 9: 2.0 * 10 / 20, 18: 2.0 * 19 / 20, 19: 2.0,
                20: 2.0, 239: 2.0}
    for epoch, w in expected.items():
        assert dkd.term_weights(epoch, 240) == {"dkd": pytest.approx(w)}
    short = composition.configured("dkd", {"dkd": {"warmup": 4}})
    assert [short.term_weights(e, 10)["dkd"] for e in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]
    assert composition.configured("dkd", {"dkd": {"warmup": 0}}).term_weights(0, 10) == {"dkd": 1.0}


def test_the_labels_reach_dkd():
    dkd = composition.configured("dkd")
    s, t, y = draw(4, 10, seed=41)
    s, t = s.float(), t.float()
    terms = dkd.terms({"logits": s}, {"logits": t}, Batch(y, 0, 240))
    assert terms["dkd"].item() == pytest.approx(dkd_loss(s, t, y).item(), rel=1e-6)
    other = dkd.terms({"logits": s}, {"logits": t}, Batch((y + 3) % 10, 0, 240))
    assert other["dkd"].item() == pytest.approx(dkd_loss(s, t, (y + 3) % 10).item(), rel=1e-6)
    assert other["dkd"].item() != pytest.approx(terms["dkd"].item(), rel=1e-3)


# ---- composition: kt-bench's cell vs mdistiller's loss --------------------------------------

@pytest.mark.parametrize("teacher_name,student_name",
                         [*composition.LOGIT_PAIRS, ("wrn_40_2", "wrn_16_2")])
@pytest.mark.parametrize("epoch", [4, 30])  # inside the 20-epoch warm-up, and after it
def test_dkd_cell_loss_equals_mdistillers(teacher_name, student_name, epoch):
    teacher, student, x, y = composition.reference_models(teacher_name, student_name)
    beta = M_DKD_BETA[(teacher_name, student_name)]
    rel = 1e-4 if teacher_name.startswith("wrn") else 1e-5  # R/M pool WRN with a fixed 8x8
    composition.assert_same_loss_and_gradient(
        composition.configured_loss("dkd", {"beta": beta}, teacher, student, x, y, epoch),
        m_dkd_total(student, teacher, x, y, epoch + 1, beta), student, rel)


def test_dkd_cell_loss_differs_from_mdistillers_at_an_off_by_one_epoch():
    """The comparison can fail: M's epoch e (not e + 1) gives another total in the warm-up."""
    teacher, student, x, y = composition.reference_models("resnet56", "resnet20")
    ours = composition.configured_loss("dkd", {"beta": 2.0}, teacher, student, x, y, 4).item()
    off = m_dkd_total(student, teacher, x, y, 4, 2.0).item()
    assert ours != pytest.approx(off, rel=1e-3)
