"""``cc``: the correlation-congruence loss against a loop-level formula and finite differences,
its embeddings in the optimiser and their gradients, its combinations, and the loss of a
configured method against an independent re-statement of RepDistiller's
(tests/ref_repdistiller_cc_vid.py)."""

from __future__ import annotations

import pytest
import torch
from kt_bench.methods.cc import CC, cc_loss
from torch import nn

from kt_bench.api.method import Batch, build_method, method_config

from ..fixtures import central_differences
from ..ref_repdistiller_cc_vid import make_r_cc_modules
from . import trainable_parts
from .composition import gen

# ---- cc_loss ---------------------------------------------------------------------------------


def _cc_loops(e_s: torch.Tensor, e_t: torch.Tensor) -> float:
    s, t = e_s.tolist(), e_t.tolist()
    b, d = len(s), len(s[0])
    pairs = [sum(abs(s[i][k] - t[i][k]) * abs(s[i + 1][k] - t[i + 1][k]) for k in range(d))
             for i in range(b - 1)]
    return sum(pairs) / (b - 1)


@pytest.mark.parametrize("b,d", [(2, 5), (3, 1), (7, 4)])
def test_cc_loss_is_the_mean_over_consecutive_pairs(b, d):
    g = gen(b * 10 + d)
    e_s = torch.randn(b, d, dtype=torch.float64, generator=g)
    e_t = torch.randn(b, d, dtype=torch.float64, generator=g)
    assert cc_loss(e_s, e_t).item() == pytest.approx(_cc_loops(e_s, e_t), rel=1e-5)
    assert cc_loss(e_s, e_s).item() == 0.0
    # the order of the batch matters: only consecutive samples are paired
    perm = torch.tensor([*range(1, b), 0]) if b > 2 else torch.arange(b)
    assert cc_loss(e_s[perm], e_t[perm]).item() == pytest.approx(
        _cc_loops(e_s[perm], e_t[perm]), rel=1e-5)


def test_cc_loss_of_two_samples_by_hand():
    e_s = torch.tensor([[1.0, -2.0], [0.5, 3.0]])
    e_t = torch.tensor([[0.0, 1.0], [2.5, 1.0]])
    # deltas (1, 3) and (2, 2): one pair, 1·2 + 3·2
    assert cc_loss(e_s, e_t).item() == pytest.approx(8.0)


def test_cc_loss_rejects_bad_shapes():
    with pytest.raises(ValueError, match="at least 2"):
        cc_loss(torch.randn(1, 4), torch.randn(1, 4))
    with pytest.raises(ValueError, match="one shape"):
        cc_loss(torch.randn(3, 4), torch.randn(3, 5))


def _away_from_kinks(b: int, d: int, g: torch.Generator):
    """(e_s, e_t) in float64 with |e_s − e_t| >= 0.1 everywhere (|.| is smooth there)."""
    e_s = torch.randn(b, d, dtype=torch.float64, generator=g)
    sign = torch.randint(0, 2, (b, d), generator=g).double() * 2 - 1
    gap = 0.1 + torch.rand(b, d, dtype=torch.float64, generator=g)
    return e_s, e_s + sign * gap


def test_cc_loss_gradients_match_finite_differences():
    e_s, e_t = _away_from_kinks(4, 3, gen(5))
    e_s.requires_grad_(True)
    e_t.requires_grad_(True)
    cc_loss(e_s, e_t).backward()
    # piecewise quadratic: central differences are exact up to float32 rounding of the loss
    for x, other, first in ((e_s, e_t, True), (e_t, e_s, False)):
        def f(v, other=other, first=first):
            return cc_loss(v, other.detach()) if first else cc_loss(other.detach(), v)
        for i, num in central_differences(f, x, 1e-2).items():
            assert x.grad.flatten()[i].item() == pytest.approx(num, rel=1e-3, abs=1e-4), i


# ---- the method's options --------------------------------------------------------------------

def test_defaults_and_options_round_trip():
    cc = method_config("cc")["cc"]
    assert cc == {"weight": 0.02, "ce_weight": None, "feat_dim": 128}
    assert build_method("cc", method_config("cc")).taps == ("pool",)


@pytest.mark.parametrize("make", [lambda: CC(feat_dim=0), lambda: CC(feat_dim=2.5)])
def test_bad_options_raise(make):
    with pytest.raises(ValueError):
        make()


# ---- trainable parts: in the optimiser, with gradients ---------------------------------------

def test_trainable_parts_are_in_the_optimiser_and_train():
    trainable_parts.check_trainable_parts("cc", {
        "embed_s.weight": (128, 64), "embed_s.bias": (128,),
        "embed_t.weight": (128, 256), "embed_t.bias": (128,)})


def test_cc_teacher_embedding_trains_but_the_teacher_feature_gets_no_gradient():
    method = CC(feat_dim=6)
    method.setup({"pool": torch.Size([3, 4])}, {"pool": torch.Size([3, 5])})
    s = torch.randn(3, 4, requires_grad=True)
    t = torch.randn(3, 5, requires_grad=True)
    method.loss_terms({"pool": s}, {"pool": t}, Batch(torch.zeros(3, dtype=torch.long)))[
        "cc"].backward()
    assert t.grad is None
    assert s.grad is not None and torch.count_nonzero(s.grad) > 0
    assert torch.count_nonzero(method.embed_t.weight.grad) > 0


def _params_fd(loss_fn, param: nn.Parameter, step: float, every: int) -> None:
    """The parameter's autograd gradient against central differences of ``loss_fn()``."""
    param.grad = None
    loss_fn().backward()
    grad = param.grad.clone()
    original = param.detach().clone()

    def at(value):
        with torch.no_grad():
            param.copy_(value)
        return loss_fn().detach()

    try:
        for i, num in central_differences(at, original, step, every).items():
            assert grad.flatten()[i].item() == pytest.approx(num, rel=5e-3, abs=1e-5), i
    finally:
        with torch.no_grad():
            param.copy_(original)


def test_cc_gradients_for_features_and_embeddings_match_finite_differences():
    g = gen(21)
    torch.manual_seed(21)
    method = CC(feat_dim=4)
    method.setup({"pool": torch.Size([3, 5])}, {"pool": torch.Size([3, 6])})
    s = torch.randn(3, 5, generator=g)
    t = torch.randn(3, 6, generator=g)
    batch = Batch(torch.zeros(3, dtype=torch.long))

    def loss(s_pool=s):
        return method.loss_terms({"pool": s_pool}, {"pool": t}, batch)["cc"]

    for param in method.parameters():
        _params_fd(loss, param, 1e-2, every=3)
    s_var = s.clone().requires_grad_(True)
    loss(s_var).backward()
    for i, num in central_differences(lambda v: loss(v).detach(), s, 1e-2).items():
        assert s_var.grad.flatten()[i].item() == pytest.approx(num, rel=5e-3, abs=1e-5), i


# ---- combinations ----------------------------------------------------------------------------

@pytest.mark.parametrize("spec,names", [("kd+cc", {"kd", "cc"}), ("cc+vid", {"cc", "vid"})])
def test_combinations_build_set_up_and_return_every_term(spec, names):
    trainable_parts.check_combination(spec, names)


# ---- against RepDistiller's composition ------------------------------------------------------

def _r_modules(method, feat_s, feat_t) -> nn.ModuleList:
    """R's freshly built embeddings, their shapes checked against kt-bench's."""
    modules = make_r_cc_modules(feat_s, feat_t)
    assert modules[0].linear.weight.shape == method.embed_s.weight.shape
    assert modules[1].linear.weight.shape == method.embed_t.weight.shape
    return modules


def _load_into(method, modules: nn.ModuleList) -> None:
    """Copy kt-bench's embeddings into R's (strict state-dict loads: the layouts must
    match)."""
    modules[0].linear.load_state_dict(method.embed_s.state_dict())
    modules[1].linear.load_state_dict(method.embed_t.state_dict())


@pytest.mark.parametrize("teacher_name,student_name,rel", trainable_parts.PAIRS)
def test_loss_equals_repdistillers(teacher_name, student_name, rel):
    trainable_parts.check_loss_equals_repdistillers("cc", teacher_name, student_name, rel,
                                                    _r_modules, _load_into)


def test_losses_are_float32_under_bf16_autocast():
    trainable_parts.check_float32_under_bf16_autocast("cc")
