"""``ofd``: the margins against numerical integration and mdistiller's, the partial L2 and the
loss against loop-level formulas and finite differences, the connectors and the margins built
from the teacher's BatchNorms against mdistiller's, combinations, and the loss of a configured
method (its teacher on the batch's statistics) against an independent re-statement of
mdistiller's ``forward_train`` (tests/ref_mdistiller_features.py)."""

from __future__ import annotations

import math

import pytest
import torch
from kt_bench.methods.ofd import OFD, make_connector, ofd_loss, ofd_margin, partial_l2
from torch import nn

from kt_bench.api.method import NotApplicable, build_method, method_config
from kt_bench.models import build_model

from ..ref_mdistiller_features import (
    m_bn_before_relu,
    m_margins,
    m_ofd_loss,
    m_stage_channels,
    make_m_connectors,
)
from . import mdistiller
from .composition import gen, prepare
from .mdistiller import CE_ROUNDING, PAIRS, R32X4, STAGES3, grid_options

# ---- margins ---------------------------------------------------------------------------------


def _negative_part_mean(std: float, mean: float, points: int = 400001) -> tuple[float, float]:
    """(P(x < 0), E[x | x < 0]) for x ~ N(mean, std²), by the trapezoidal rule on [mean −
    14·std, 0]."""
    s = abs(std)
    lo = min(mean - 14 * s, -1e-9)
    x = torch.linspace(lo, 0.0, points, dtype=torch.float64)
    density = torch.exp(-0.5 * ((x - mean) / s) ** 2) / (s * math.sqrt(2 * math.pi))
    mass = torch.trapezoid(density, x).item()
    first = torch.trapezoid(x * density, x).item()
    return mass, first / mass


@pytest.mark.parametrize("std,mean", [(1.0, 0.0), (1.0, 1.0), (0.5, -1.0), (2.0, 3.0),
                                      (-1.5, 0.5), (0.3, 0.8), (1.0, 3.05), (1.0, 3.2),
                                      (-0.2, 1.0), (0.7, -2.5)])
def test_ofd_margin_is_the_mean_of_the_negative_part(std, mean):
    mass, conditional = _negative_part_mean(std, mean)
    got = ofd_margin(torch.tensor([std]), torch.tensor([mean])).item()
    if mass > 0.001:
        assert got == pytest.approx(conditional, rel=1e-5, abs=1e-6)
    else:  # too little mass below 0: M's fallback
        assert got == pytest.approx(-3 * abs(std), rel=1e-6)


def test_ofd_margin_equals_ms_and_handles_a_zero_weight():
    g = gen(9)
    bn = nn.BatchNorm2d(64)
    with torch.no_grad():
        bn.weight.copy_(torch.randn(64, generator=g))
        bn.bias.copy_(torch.randn(64, generator=g) * 2)
        bn.bias[:8] = 4 * bn.weight[:8].abs()  # the −3·std branch
    got = ofd_margin(bn.weight, bn.bias)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.view(1, -1, 1, 1), m_margins([bn])[0], rtol=1e-6, atol=1e-7)
    assert torch.equal(got[:8], -3 * bn.weight[:8].detach().abs())
    # weight 0: a point mass at the bias (M divides by zero here)
    zero = ofd_margin(torch.zeros(3), torch.tensor([-0.5, 0.0, 0.7]))
    assert zero.tolist() == [-0.5, 0.0, 0.0]


# ---- partial L2 ------------------------------------------------------------------------------

def _partial_l2_loops(s: torch.Tensor, t: torch.Tensor, m: torch.Tensor) -> float:
    b, c, h, w = s.shape
    total = 0.0
    for n in range(b):
        for k in range(c):
            mk = m.flatten()[k].item()
            for y in range(h):
                for x in range(w):
                    sv, tv = s[n, k, y, x].item(), t[n, k, y, x].item()
                    if sv > mk and tv <= mk:
                        total += (sv - mk) ** 2
                    if sv > tv and mk < tv <= 0:
                        total += (sv - tv) ** 2
                    if tv > 0:
                        total += (sv - tv) ** 2
    return total / b


@pytest.mark.parametrize("shape", [(2, 3, 4, 4), (1, 2, 3, 5), (3, 1, 1, 1)])
def test_partial_l2_matches_loops(shape):
    g = gen(shape[1] * 7 + shape[2])
    s = torch.randn(*shape, dtype=torch.float64, generator=g)
    t = torch.randn(*shape, dtype=torch.float64, generator=g)
    m = -torch.rand(1, shape[1], 1, 1, dtype=torch.float64, generator=g)
    assert partial_l2(s, t, m).item() == pytest.approx(_partial_l2_loops(s, t, m), rel=1e-5)


def test_partial_l2_is_the_distance_to_the_margin_clipped_teacher():
    """For margins <= 0 it is the paper's partial L2 against max(t, m): (s − max(t, m))²
    except where s <= max(t, m) <= 0."""
    g = gen(4)
    s = torch.randn(2, 3, 3, 3, dtype=torch.float64, generator=g)
    t = torch.randn(2, 3, 3, 3, dtype=torch.float64, generator=g)
    m = torch.tensor([-0.5, -0.1, 0.0], dtype=torch.float64).view(1, 3, 1, 1)
    target = torch.maximum(t, m)
    skip = (s <= target) & (target <= 0)
    want = ((s - target).pow(2) * ~skip).sum() / 2
    assert partial_l2(s, t, m).item() == pytest.approx(want.item(), rel=1e-5)
    # by hand, one channel, margin −1: teacher (−2, −0.5, 0.5, 0), student (0, −1, 0, 0.5)
    s1 = torch.tensor([0.0, -1.0, 0.0, 0.5]).view(1, 1, 1, 4)
    t1 = torch.tensor([-2.0, -0.5, 0.5, 0.0]).view(1, 1, 1, 4)
    want = (0 - -1) ** 2 + 0.0 + 0.5 ** 2 + 0.5 ** 2
    assert partial_l2(s1, t1, torch.tensor(-1.0)).item() == pytest.approx(want)
    with pytest.raises(ValueError, match="one shape"):
        partial_l2(s1, t1.view(1, 1, 4, 1), torch.tensor(-1.0))


def test_partial_l2_gradients_match_finite_differences():
    g = gen(6)
    m = torch.tensor([-0.4, -1.0]).view(1, 2, 1, 1).double()
    t = torch.randn(2, 2, 3, 3, dtype=torch.float64, generator=g)
    s = torch.randn(2, 2, 3, 3, dtype=torch.float64, generator=g)
    # keep the student away from the kinks at t and m
    near = ((s - t).abs() < 0.05) | ((s - m).abs() < 0.05)
    s = torch.where(near, s + 0.2, s)
    var = s.clone().requires_grad_(True)
    teacher = t.clone().requires_grad_(True)
    partial_l2(var, teacher, m).backward()
    assert teacher.grad is None
    numeric = mdistiller.central_differences(lambda v: _partial_l2_loops(v, t, m), s, 1e-6)
    for i, num in enumerate(numeric):
        assert var.grad.flatten()[i].item() == pytest.approx(num, rel=1e-4, abs=1e-6), i


def test_ofd_loss_pools_the_teacher_and_halves_shallower_levels():
    g = gen(8)
    f_s = [torch.randn(2, 3, 4, 4, dtype=torch.float64, generator=g),
           torch.randn(2, 2, 2, 2, dtype=torch.float64, generator=g)]
    f_t = [torch.randn(2, 3, 8, 8, dtype=torch.float64, generator=g),
           torch.randn(2, 2, 2, 2, dtype=torch.float64, generator=g)]
    margins = [-torch.rand(1, 3, 1, 1, dtype=torch.float64, generator=g),
               -torch.rand(1, 2, 1, 1, dtype=torch.float64, generator=g)]
    pooled = f_t[0].reshape(2, 3, 4, 2, 4, 2).mean(dim=(3, 5))
    want = (_partial_l2_loops(f_s[0], pooled, margins[0]) / 2
            + _partial_l2_loops(f_s[1], f_t[1], margins[1]))
    assert ofd_loss(f_s, f_t, margins).item() == pytest.approx(want, rel=1e-5)
    with pytest.raises(ValueError, match="one length"):
        ofd_loss(f_s, f_t, margins[:1])


@pytest.mark.parametrize("k", [1, 3])
def test_connector_is_ms(k):
    torch.manual_seed(k)
    c = make_connector(64, 128, k)
    conv, bn = c
    assert (conv.kernel_size, conv.padding, conv.bias) == ((k, k), ((k - 1) // 2,) * 2, None)
    assert conv.weight.std().item() == pytest.approx(math.sqrt(2 / (k * k * 128)), rel=0.05)
    assert torch.equal(bn.weight, torch.ones(128)) and torch.equal(bn.bias, torch.zeros(128))
    assert set(c.state_dict()) == set(make_m_connectors([64], [128], k)[0].state_dict())
    assert c(torch.randn(2, 64, 5, 5)).shape == (2, 128, 5, 5)


# ---- the method ------------------------------------------------------------------------------

def test_ofd_defaults_taps_buffers_and_margins_from_the_teachers_bns():
    assert method_config("ofd")["ofd"] == {"weight": 0.001, "ce_weight": None,
                                           "kernel_size": 1, "layers": STAGES3}
    torch.manual_seed(0)
    teacher, student = build_model("resnet8x4", 10), build_model("resnet8", 10)
    mdistiller.perturb_batchnorm(teacher, gen(2))
    method = build_method("ofd", method_config("ofd"))
    assert method.taps == ("stage1_pre", "stage2_pre", "stage3_pre")
    prepare(method, student, teacher, torch.randn(2, 3, 32, 32, generator=gen(3)),
            num_classes=10)
    assert {n for n, _ in method.named_parameters()} == {
        f"connectors.{i}.{p}" for i in range(3) for p in ("0.weight", "1.weight", "1.bias")}
    buffers = dict(method.named_buffers())
    for i, (ours, theirs) in enumerate(zip(method.margins, m_margins(m_bn_before_relu(teacher)),
                                           strict=True)):
        assert buffers[f"margin{i}"] is ours
        torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-7)
    assert {f"margin{i}" for i in range(3)} <= set(method.state_dict())
    # the teacher's named BNs are M's get_bn_before_relu
    modules = dict(teacher.named_modules())
    assert [modules[teacher.bn_before_relu[k]] for k in STAGES3] == m_bn_before_relu(teacher)


@pytest.mark.parametrize("make", [
    lambda: OFD(kernel_size=0), lambda: OFD(kernel_size=1.5), lambda: OFD(layers=[]),
    lambda: OFD(layers="stage1"),
])
def test_bad_options_raise(make):
    with pytest.raises(ValueError):
        make()


class _NoBNs(nn.Module):
    def __init__(self, bn_before_relu=None):
        super().__init__()
        self.relu = nn.ReLU()
        if bn_before_relu is not None:
            self.bn_before_relu = bn_before_relu


@pytest.mark.parametrize("teacher", [_NoBNs(), _NoBNs({}), _NoBNs({"stage1": "relu",
                                                                   "stage2": "relu",
                                                                   "stage3": "relu"})])
def test_ofd_is_not_applicable_without_the_teachers_bns(teacher):
    with pytest.raises(NotApplicable):
        OFD().setup_teacher(teacher)


def test_combinations_build_set_up_train_and_return_every_term():
    mdistiller.check_combination("kd+ofd", {"kd", "ofd"})


# ---- against mdistiller's forward_train ------------------------------------------------------

def _copied_connectors(method: OFD, student: nn.Module, teacher: nn.Module) -> nn.ModuleList:
    connectors = make_m_connectors(m_stage_channels(student)[1:], m_stage_channels(teacher)[1:],
                                   method.kernel_size)
    for ours, theirs in zip(method.connectors, connectors, strict=True):
        theirs.load_state_dict(ours.state_dict())
    return connectors


@pytest.mark.parametrize("pair", [*PAIRS, R32X4])
def test_ofd_loss_equals_mdistillers(pair):
    """M's OFD runs its teacher in train mode: kt-bench gives OFD a train-mode copy."""
    teacher, student, x, y, method = mdistiller.setup(pair, "ofd", grid_options("ofd", pair))
    x = 2 * x + 0.5  # a batch whose statistics are not the running ones
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    ours = mdistiller.kt_bench_loss(method, student, teacher, x, y, 7)
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in before.items())
    margins = m_margins(m_bn_before_relu(teacher))
    connectors = _copied_connectors(method, student, teacher)
    theirs = m_ofd_loss(student, teacher, x, y, connectors, margins, teacher_train=True)
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-5)
    eval_mode = m_ofd_loss(student, teacher, x, y, connectors, margins, teacher_train=False)
    assert abs(ours.item() - eval_mode.item()) > 1e-2 * abs(theirs.item())  # it matters
    # and in float64, with the gradients of the student and the connectors
    mdistiller.double(teacher, student, method, connectors)
    x = x.double()
    ours = mdistiller.kt_bench_loss(method, student, teacher, x, y, 7)
    theirs = m_ofd_loss(student, teacher, x, y, connectors, [m.double() for m in margins],
                        teacher_train=True)
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-9, abs=CE_ROUNDING)
    mdistiller.assert_same_gradients(ours, theirs,
                                     [*student.parameters(), *method.connectors.parameters()],
                                     [*student.parameters(), *connectors.parameters()], 1e-7)
