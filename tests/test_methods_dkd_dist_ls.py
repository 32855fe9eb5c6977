"""DKD, DIST and KD with logit standardization: formulas, gradients, options, and the loss a
configured kt-bench cell computes against re-statements of the reference code's composition
(tests/ref_logit_methods.py)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from kt_bench.methods.dist import dist_loss
from kt_bench.methods.dkd import dkd_loss, nckd_loss, tckd_loss
from kt_bench.methods.kd import kd_loss

from kt_bench.config import Recipe
from kt_bench.engine import setup_method
from kt_bench.errors import ConfigError
from kt_bench.method import Batch, build_method, method_config
from kt_bench.models import build_model
from kt_bench.plugins import load_builtin_methods

from .ref_logit_methods import (
    DIST_CIFAR,
    LS_KD_DEFAULTS,
    LS_KD_PAIRS,
    M_DKD_BETA,
    M_DKD_DEFAULTS,
    dist_total,
    ls_kd_total,
    m_dkd_total,
)
from .test_repdistiller_composition import _perturb_batchnorm, kt_bench_loss

load_builtin_methods()


# ---- loop-level formulas in float64 Python arithmetic ----------------------------------------

def _softmax(z: list[float]) -> list[float]:
    m = max(z)
    e = [math.exp(v - m) for v in z]
    return [v / sum(e) for v in e]


def _kl(p: list[float], q: list[float]) -> float:
    return sum(a * (math.log(a) - math.log(b)) for a, b in zip(p, q, strict=True) if a > 0)


def dkd_direct(s, t, y, alpha, beta, T):
    """α·TCKD + β·NCKD from the paper's definitions, sample by sample."""
    total = 0.0
    for i in range(len(s)):
        p_s = _softmax([v / T for v in s[i]])
        p_t = _softmax([v / T for v in t[i]])
        g = y[i]
        tckd = _kl([p_t[g], 1 - p_t[g]], [p_s[g], 1 - p_s[g]])
        rest = [c for c in range(len(s[i])) if c != g]
        q_s = _softmax([s[i][c] / T for c in rest])
        q_t = _softmax([t[i][c] / T for c in rest])
        total += alpha * tckd + beta * _kl(q_t, q_s)
    return T * T * total / len(s)


def _pearson(a: list[float], b: list[float]) -> float:
    ma, mb = sum(a) / len(a), sum(b) / len(b)
    ac, bc = [v - ma for v in a], [v - mb for v in b]
    num = sum(u * v for u, v in zip(ac, bc, strict=True))
    return num / (math.sqrt(sum(u * u for u in ac)) * math.sqrt(sum(v * v for v in bc)) + 1e-8)


def dist_direct(s, t, beta, gamma, tau):
    """τ²(β·(1 − mean row correlation) + γ·(1 − mean column correlation)) of softmax(z/τ)."""
    y_s = [_softmax([v / tau for v in row]) for row in s]
    y_t = [_softmax([v / tau for v in row]) for row in t]
    n, c = len(y_s), len(y_s[0])
    inter = 1 - sum(_pearson(y_s[i], y_t[i]) for i in range(n)) / n
    cols = [([y_s[i][k] for i in range(n)], [y_t[i][k] for i in range(n)]) for k in range(c)]
    intra = 1 - sum(_pearson(a, b) for a, b in cols) / c
    return tau * tau * (beta * inter + gamma * intra)


def _zscore(z: list[float]) -> list[float]:
    m = sum(z) / len(z)
    sd = math.sqrt(sum((v - m) ** 2 for v in z) / (len(z) - 1))  # unbiased
    return [(v - m) / (sd + 1e-7) for v in z]


def kd_direct(s, t, T, standardize=False):
    """T² · mean over samples of KL(softmax(t/T) ‖ softmax(s/T)), optionally z-scored."""
    total = 0.0
    for i in range(len(s)):
        a, b = (_zscore(s[i]), _zscore(t[i])) if standardize else (s[i], t[i])
        total += _kl(_softmax([v / T for v in b]), _softmax([v / T for v in a]))
    return T * T * total / len(s)


def _lists(x: torch.Tensor):
    return x.double().tolist()


def _draw(b, c, seed, scale=2.0):
    gen = torch.Generator().manual_seed(seed)
    s = torch.randn(b, c, dtype=torch.float64, generator=gen) * scale
    t = torch.randn(b, c, dtype=torch.float64, generator=gen) * scale
    y = torch.randint(0, c, (b,), generator=gen)
    return s, t, y


# ---- values ---------------------------------------------------------------------------------

@pytest.mark.parametrize("b,c,alpha,beta,T", [(2, 5, 1.0, 8.0, 4.0), (6, 10, 0.5, 2.0, 1.0),
                                              (3, 100, 1.0, 6.0, 4.0)])
def test_dkd_loss_matches_the_loop_level_formula(b, c, alpha, beta, T):
    s, t, y = _draw(b, c, seed=b * 100 + c)
    expected = dkd_direct(_lists(s), _lists(t), y.tolist(), alpha, beta, T)
    assert dkd_loss(s, t, y, alpha, beta, T).item() == pytest.approx(expected, rel=1e-5)
    # TCKD is a small KL between near-equal binary distributions: float32 cancellation (as in
    # mdistiller's own float32 form) leaves ~1e-5 relative error with 100 classes
    assert tckd_loss(s, t, y, T).item() == pytest.approx(
        dkd_direct(_lists(s), _lists(t), y.tolist(), 1.0, 0.0, T), rel=2e-4)
    assert nckd_loss(s, t, y, T).item() == pytest.approx(
        dkd_direct(_lists(s), _lists(t), y.tolist(), 0.0, 1.0, T), rel=1e-5)


def test_dkd_recombines_into_kd_for_one_sample():
    """The paper's identity KD = TCKD + (1 − p_t(target))·NCKD (one sample, so no averaging)."""
    s, t, y = _draw(1, 8, seed=3)
    T = 4.0
    p_target = torch.softmax(t / T, dim=1)[0, y[0]].item()
    recombined = tckd_loss(s, t, y, T) + (1 - p_target) * nckd_loss(s, t, y, T)
    assert recombined.item() == pytest.approx(kd_loss(s, t, T).item(), rel=1e-5)


def test_dkd_depends_on_the_labels_and_vanishes_for_equal_logits():
    s, t, y = _draw(4, 10, seed=4)
    assert dkd_loss(t, t, y).item() == pytest.approx(0.0, abs=1e-5)
    y2 = (y + 1) % 10
    assert dkd_loss(s, t, y).item() != pytest.approx(dkd_loss(s, t, y2).item(), rel=1e-3)


@pytest.mark.parametrize("b,c,beta,gamma,tau", [(2, 5, 1.0, 1.0, 1.0), (2, 7, 1.0, 1.0, 4.0),
                                                (8, 10, 0.5, 2.0, 4.0), (5, 100, 1.0, 1.0, 4.0)])
def test_dist_loss_matches_the_loop_level_formula(b, c, beta, gamma, tau):
    s, t, _ = _draw(b, c, seed=7 + b + c)
    expected = dist_direct(_lists(s), _lists(t), beta, gamma, tau)
    assert dist_loss(s, t, beta, gamma, tau).item() == pytest.approx(expected, rel=1e-5)


def test_dist_is_zero_for_equal_logits_and_beta_gamma_pick_the_relations():
    s, t, _ = _draw(4, 6, seed=11)
    # not exactly 0: the 1e-8 in the correlation's denominator, ×τ²
    same = dist_loss(t, t, tau=4.0).item()
    assert same == pytest.approx(dist_direct(_lists(t), _lists(t), 1.0, 1.0, 4.0), abs=1e-5)
    assert 0 <= same < 1e-3
    inter = dist_loss(s, t, 1.0, 0.0, 2.0).item()
    intra = dist_loss(s, t, 0.0, 1.0, 2.0).item()
    assert inter > 0 and intra > 0
    assert dist_loss(s, t, 2.0, 3.0, 2.0).item() == pytest.approx(2 * inter + 3 * intra, rel=1e-5)


@pytest.mark.parametrize("b,c,T", [(2, 5, 2.0), (4, 10, 3.0), (3, 100, 4.0)])
def test_kd_loss_with_standardization_matches_the_loop_level_formula(b, c, T):
    s, t, _ = _draw(b, c, seed=21 + b, scale=5.0)
    expected = kd_direct(_lists(s), _lists(t), T, standardize=True)
    assert kd_loss(s, t, T, standardize=True).item() == pytest.approx(expected, rel=1e-5)
    # off, it is plain KD, unchanged
    assert kd_loss(s, t, T).item() == pytest.approx(kd_direct(_lists(s), _lists(t), T), rel=1e-5)


def test_standardized_kd_ignores_per_sample_shift_and_scale():
    s, t, _ = _draw(3, 10, seed=5)
    a = torch.tensor([[0.5], [3.0], [10.0]], dtype=torch.float64)
    shifted = s * a + torch.tensor([[1.0], [-4.0], [7.0]], dtype=torch.float64)
    base = kd_loss(s, t, 2.0, standardize=True).item()
    assert kd_loss(shifted, t * 2.5 - 1.0, 2.0, standardize=True).item() == pytest.approx(
        base, rel=1e-4)
    assert kd_loss(shifted, t, 2.0).item() != pytest.approx(kd_loss(s, t, 2.0).item(), rel=1e-2)


# ---- gradients ------------------------------------------------------------------------------

def _central_differences(fn, x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    flat = x.detach().flatten()
    out = torch.empty_like(flat)
    for i in range(flat.numel()):
        plus, minus = flat.clone(), flat.clone()
        plus[i] += eps
        minus[i] -= eps
        out[i] = (fn(plus.view_as(x)) - fn(minus.view_as(x))) / (2 * eps)
    return out.view_as(x)


GRAD_CASES = {
    "dkd": (lambda s, t, y: dkd_loss(s, t, y, 1.0, 8.0, 4.0),
            lambda s, t, y: dkd_direct(_lists(s), _lists(t), y.tolist(), 1.0, 8.0, 4.0)),
    "dkd_T1": (lambda s, t, y: dkd_loss(s, t, y, 0.5, 2.0, 1.0),
               lambda s, t, y: dkd_direct(_lists(s), _lists(t), y.tolist(), 0.5, 2.0, 1.0)),
    "dist": (lambda s, t, y: dist_loss(s, t, 1.0, 1.0, 4.0),
             lambda s, t, y: dist_direct(_lists(s), _lists(t), 1.0, 1.0, 4.0)),
    "dist_tau1": (lambda s, t, y: dist_loss(s, t, 2.0, 0.5, 1.0),
                  lambda s, t, y: dist_direct(_lists(s), _lists(t), 2.0, 0.5, 1.0)),
    "kd_ls": (lambda s, t, y: kd_loss(s, t, 2.0, standardize=True),
              lambda s, t, y: kd_direct(_lists(s), _lists(t), 2.0, standardize=True)),
}


@pytest.mark.parametrize("name", list(GRAD_CASES))
@pytest.mark.parametrize("b", [2, 4])
def test_gradient_reaches_the_student_only_and_matches_finite_differences(name, b):
    loss_fn, direct = GRAD_CASES[name]
    s, t, y = _draw(b, 6, seed=31 + b)
    s.requires_grad_(True)
    t.requires_grad_(True)
    loss_fn(s, t, y).backward()
    assert t.grad is None or torch.count_nonzero(t.grad) == 0
    # the float32 loss's gradient against differences of the float64 loop-level formula
    num = _central_differences(lambda v: direct(v, t.detach(), y), s)
    torch.testing.assert_close(s.grad, num, rtol=2e-3, atol=2e-5)


# ---- methods: options, warm-up, labels, combinations ----------------------------------------

def _build(name: str, options: dict | None = None):
    return build_method(name, method_config(name, options))


def test_defaults_are_the_reference_configurations():
    assert method_config("dkd")["dkd"] == {"weight": 1.0, "alpha": 1.0, "beta": 8.0, "T": 4.0,
                                          "warmup": 20, "ce_weight": None}
    assert M_DKD_DEFAULTS == {"CE_WEIGHT": 1.0, "ALPHA": 1.0, "BETA": 8.0, "T": 4.0,
                              "WARMUP": 20}
    assert method_config("dist")["dist"] == {"weight": 2.0, "beta": 1.0, "gamma": 1.0,
                                            "tau": 4.0, "ce_weight": None}
    assert method_config("kd_ls")["kd_ls"] == {"weight": 9.0, "T": 2.0, "ce_weight": 0.1}
    assert _build("kd_ls").standardize is True
    # kd keeps its defaults; standardize is off unless asked for
    assert method_config("kd")["kd"] == {"weight": 1.0, "T": 4.0, "standardize": False,
                                        "ce_weight": None}
    assert _build("kd", {"kd": {"standardize": True}}).standardize is True


@pytest.mark.parametrize("name,options", [
    ("dkd", {"T": 0.0}), ("dkd", {"beta": -1.0}), ("dkd", {"warmup": -1}),
    ("dist", {"tau": 0.0}), ("dist", {"gamma": -0.5}), ("kd_ls", {"T": -2.0}),
])
def test_bad_option_values_are_config_errors(name, options):
    with pytest.raises(ConfigError):
        _build(name, {name: options})


def test_dkd_weight_ramps_in_over_warmup_epochs_counted_from_one():
    dkd = _build("dkd", {"dkd": {"weight": 2.0}})
    # mdistiller's epoch counter starts at 1: kt-bench's epoch e is its e + 1
    expected = {0: 2.0 / 20, 1: 2.0 * 2 / 20, 9: 2.0 * 10 / 20, 18: 2.0 * 19 / 20, 19: 2.0,
                20: 2.0, 239: 2.0}
    for epoch, w in expected.items():
        assert dkd.term_weights(epoch, 240) == {"dkd": pytest.approx(w)}
    short = _build("dkd", {"dkd": {"warmup": 4}})
    assert [short.term_weights(e, 10)["dkd"] for e in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]
    assert _build("dkd", {"dkd": {"warmup": 0}}).term_weights(0, 10) == {"dkd": 1.0}
    # the others do not ramp
    assert _build("dist").term_weights(0, 240) == {"dist": 2.0}
    assert _build("kd_ls").term_weights(0, 240) == {"kd_ls": 9.0}


def test_the_labels_reach_dkd():
    dkd = _build("dkd")
    s, t, y = _draw(4, 10, seed=41)
    s, t = s.float(), t.float()
    terms = dkd.terms({"logits": s}, {"logits": t}, Batch(y, 0, 240))
    assert terms["dkd"].item() == pytest.approx(dkd_loss(s, t, y).item(), rel=1e-6)
    other = dkd.terms({"logits": s}, {"logits": t}, Batch((y + 3) % 10, 0, 240))
    assert other["dkd"].item() == pytest.approx(dkd_loss(s, t, (y + 3) % 10).item(), rel=1e-6)
    assert other["dkd"].item() != pytest.approx(terms["dkd"].item(), rel=1e-3)


@pytest.mark.parametrize("spec", ["kd+dkd", "dkd+dist", "dist+kd_ls", "kd+kd_ls"])
def test_combinations_build_and_return_every_member_term(spec):
    method = _build(spec)
    s, t, y = _draw(4, 10, seed=43)
    terms = method.terms({"logits": s.float()}, {"logits": t.float()}, Batch(y, 3, 240))
    names = spec.split("+")
    assert set(terms) == set(names)
    weights = method.term_weights(3, 240)
    assert set(weights) == set(names)
    if "dkd" in names:
        assert weights["dkd"] == pytest.approx(4 / 20)
        assert terms["dkd"].item() == pytest.approx(dkd_loss(s, t, y).item(), rel=1e-5)


# ---- composition: kt-bench's cell vs the reference code's loss ------------------------------

PAIRS = [("resnet56", "resnet20"), ("vgg13", "vgg8")]


def _models(teacher_name: str, student_name: str):
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    teacher, student = build_model(teacher_name, 100), build_model(student_name, 100)
    _perturb_batchnorm(teacher, gen)
    _perturb_batchnorm(student, gen)
    x = torch.randn(8, 3, 32, 32, generator=gen)
    y = torch.randint(0, 100, (8,), generator=gen)
    return teacher, student, x, y


def _ours(name, options, teacher, student, x, y, epoch, epochs=240):
    config = method_config(name, {name: options})
    method = build_method(name, config)
    setup_method(method, student, teacher, x)
    cell = SimpleNamespace(recipe=Recipe(epochs=epochs))
    loss, _ = kt_bench_loss(cell, student, teacher, x, y, epoch, method)
    return loss


def _assert_same_loss_and_gradient(ours, theirs, student, rel=1e-5):
    """Equal totals, and equal gradients for the student's parameters."""
    assert ours.item() == pytest.approx(theirs.item(), rel=rel, abs=1e-6)
    params = list(student.parameters())
    a = torch.cat([g.flatten() for g in torch.autograd.grad(ours, params)])
    b = torch.cat([g.flatten() for g in torch.autograd.grad(theirs, params)])
    assert ((a - b).norm() / b.norm()).item() < 1e-4


@pytest.mark.parametrize("teacher_name,student_name",
                         [*PAIRS, ("wrn_40_2", "wrn_16_2")])
@pytest.mark.parametrize("epoch", [4, 30])  # inside the 20-epoch warm-up, and after it
def test_dkd_cell_loss_equals_mdistillers(teacher_name, student_name, epoch):
    teacher, student, x, y = _models(teacher_name, student_name)
    beta = M_DKD_BETA[(teacher_name, student_name)]
    rel = 1e-4 if teacher_name.startswith("wrn") else 1e-5  # R/M pool WRN with a fixed 8x8
    _assert_same_loss_and_gradient(
        _ours("dkd", {"beta": beta}, teacher, student, x, y, epoch),
        m_dkd_total(student, teacher, x, y, epoch + 1, beta), student, rel)


def test_dkd_cell_loss_differs_from_mdistillers_at_an_off_by_one_epoch():
    """The comparison can fail: M's epoch e (not e + 1) gives another total in the warm-up."""
    teacher, student, x, y = _models("resnet56", "resnet20")
    ours = _ours("dkd", {"beta": 2.0}, teacher, student, x, y, 4).item()
    off = m_dkd_total(student, teacher, x, y, 4, 2.0).item()
    assert ours != pytest.approx(off, rel=1e-3)


@pytest.mark.parametrize("teacher_name,student_name", PAIRS)
def test_dist_cell_loss_equals_the_authors(teacher_name, student_name):
    teacher, student, x, y = _models(teacher_name, student_name)
    assert DIST_CIFAR["ori_loss_weight"] == 1.0  # so the recipe's CE weight 1 is theirs
    _assert_same_loss_and_gradient(
        _ours("dist", {}, teacher, student, x, y, 0), dist_total(student, teacher, x, y), student)


@pytest.mark.parametrize("teacher_name,student_name", PAIRS)
def test_kd_ls_cell_loss_equals_the_reference(teacher_name, student_name):
    teacher, student, x, y = _models(teacher_name, student_name)
    T, w = LS_KD_PAIRS[(teacher_name, student_name)]
    options = {"ce_weight": LS_KD_DEFAULTS["CE_WEIGHT"], "T": T, "weight": w}
    cfg = {"TEMPERATURE": T, "KD_WEIGHT": w}
    _assert_same_loss_and_gradient(
        _ours("kd_ls", options, teacher, student, x, y, 0),
        ls_kd_total(student, teacher, x, y, cfg), student)
    # and kd with standardize on is the same method
    kd_options = {**options, "standardize": True}
    assert _ours("kd", kd_options, teacher, student, x, y, 0).item() == pytest.approx(
        ls_kd_total(student, teacher, x, y, cfg).item(), rel=1e-5)
