"""``vid``: the Gaussian negative log-likelihood against a loop-level formula and finite
differences, its heads against RepDistiller's VIDLoss, their parameters in the optimiser, its
combinations, and the loss of a configured method against an independent re-statement of
RepDistiller's (tests/ref_repdistiller_cc_vid.py)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from kt_bench.methods.vid import VID, VIDHead, initial_log_scale, vid_loss
from torch import nn

from kt_bench.api.method import Batch, build_method, method_config
from kt_bench.training.lifecycle import Trainee

from ..fixtures import central_differences
from ..ref_repdistiller_cc_vid import RVIDLoss, make_r_vid_modules
from . import trainable_parts
from .composition import gen, prepare, read_teacher
from .trainable_parts import VGG_LAYERS

# ---- vid_loss --------------------------------------------------------------------------------


def _vid_loops(mean: torch.Tensor, log_scale: torch.Tensor, target: torch.Tensor,
               eps: float) -> float:
    b, c, h, w = mean.shape
    total = 0.0
    for n in range(b):
        for k in range(c):
            var = math.log(1 + math.exp(log_scale[k].item())) + eps
            for y in range(h):
                for x in range(w):
                    d = mean[n, k, y, x].item() - target[n, k, y, x].item()
                    total += 0.5 * (d * d / var + math.log(var))
    return total / (b * c * h * w)


@pytest.mark.parametrize("shape,eps", [((2, 3, 2, 2), 1e-5), ((3, 1, 3, 2), 0.3)])
def test_vid_loss_is_the_gaussian_negative_log_likelihood(shape, eps):
    g = gen(shape[0])
    mean = torch.randn(*shape, dtype=torch.float64, generator=g)
    target = torch.randn(*shape, dtype=torch.float64, generator=g)
    log_scale = torch.randn(shape[1], dtype=torch.float64, generator=g) * 2
    got = vid_loss(mean, log_scale, target, eps).item()
    assert got == pytest.approx(_vid_loops(mean, log_scale, target, eps), rel=1e-5)


def test_vid_loss_rejects_bad_shapes():
    with pytest.raises(ValueError, match="one shape"):
        vid_loss(torch.randn(2, 3, 4, 4), torch.zeros(3), torch.randn(2, 3, 2, 2))
    with pytest.raises(ValueError, match="one entry per channel"):
        vid_loss(torch.randn(2, 3, 4, 4), torch.zeros(4), torch.randn(2, 3, 4, 4))


def test_vid_loss_gradients_match_finite_differences():
    g = gen(11)
    mean = torch.randn(2, 3, 2, 2, dtype=torch.float64, generator=g).requires_grad_(True)
    target = torch.randn(2, 3, 2, 2, dtype=torch.float64, generator=g).requires_grad_(True)
    log_scale = torch.randn(3, dtype=torch.float64, generator=g).requires_grad_(True)
    vid_loss(mean, log_scale, target).backward()
    assert target.grad is None  # the teacher's map is detached
    t = target.detach()
    # quadratic in the mean: exact central differences (up to float32 rounding)
    for i, num in central_differences(lambda m: vid_loss(m, log_scale.detach(), t),
                                      mean, 1e-2).items():
        assert mean.grad.flatten()[i].item() == pytest.approx(num, rel=1e-3, abs=1e-5), i
    for i, num in central_differences(lambda s: vid_loss(mean.detach(), s, t),
                                      log_scale, 1e-2).items():
        assert log_scale.grad[i].item() == pytest.approx(num, rel=2e-3, abs=1e-5), i


@pytest.mark.parametrize("init_var,eps", [(5.0, 1e-5), (0.5, 0.1), (800.0, 1e-5)])
def test_log_scale_starts_at_the_initial_variance(init_var, eps):
    head = VIDHead(3, 4, init_var, eps)
    assert head.log_scale.shape == (4,)
    var = F.softplus(head.log_scale.double()) + eps
    assert var.tolist() == pytest.approx([init_var] * 4, rel=1e-6)
    if init_var < 700:  # R's own formula overflows past exp(709)
        r_value = math.log(math.exp(init_var - eps) - 1.0)
        assert initial_log_scale(init_var, eps) == pytest.approx(r_value, rel=1e-12, abs=1e-12)


def test_vid_head_layout_is_rs():
    head = VIDHead(16, 32)
    convs = [m for m in head.regressor if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels) for c in convs] == [(16, 32), (32, 32), (32, 32)]
    assert all(c.bias is None and c.kernel_size == (1, 1) for c in convs)
    assert [type(m) for m in head.regressor] == [nn.Conv2d, nn.ReLU, nn.Conv2d, nn.ReLU,
                                                 nn.Conv2d]
    assert set(head.state_dict()) == set(RVIDLoss(16, 32, 32).state_dict())


@pytest.mark.parametrize("s_hw,t_hw", [(8, 4), (4, 8), (4, 4)])
def test_vid_head_equals_rs_vidloss_for_unequal_sizes_and_channels(s_hw, t_hw):
    g = gen(s_hw * 100 + t_hw)
    torch.manual_seed(s_hw + t_hw)
    head = VIDHead(3, 5)
    with torch.no_grad():
        head.log_scale.add_(torch.randn(5, generator=g))
    ref = RVIDLoss(3, 5, 5)
    ref.load_state_dict(head.state_dict())
    f_s = torch.randn(2, 3, s_hw, s_hw, generator=g)
    f_t = torch.randn(2, 5, t_hw, t_hw, generator=g)
    assert head(f_s, f_t).item() == pytest.approx(ref(f_s, f_t).item(), rel=1e-6)
    if s_hw > t_hw:  # the student's map is 2x2 average-pooled before the regressor
        pooled = f_s.reshape(2, 3, t_hw, 2, t_hw, 2).mean(dim=(3, 5))
        want = vid_loss(head.regressor(pooled), head.log_scale, f_t)
        assert head(f_s, f_t).item() == pytest.approx(want.item(), rel=1e-6)


# ---- the method's options --------------------------------------------------------------------

def test_defaults_and_options_round_trip():
    vid = method_config("vid")["vid"]
    assert vid == {"weight": 1.0, "ce_weight": None, "layers": ["stage1", "stage2", "stage3"],
                   "init_var": 5.0, "eps": 1e-5}
    method = build_method("vid", method_config("vid", {"vid": {"layers": VGG_LAYERS}}))
    assert method.taps == tuple(VGG_LAYERS)


@pytest.mark.parametrize("make", [
    lambda: VID(init_var=0.0), lambda: VID(init_var=1e-6), lambda: VID(eps=-1.0),
    lambda: VID(layers="stage1"), lambda: VID(layers=[]),
])
def test_bad_options_raise(make):
    with pytest.raises(ValueError):
        make()


# ---- trainable parts: in the optimiser, with gradients ---------------------------------------

def test_trainable_parts_are_in_the_optimiser_and_train():
    trainable_parts.check_trainable_parts("vid", {
        f"heads.stage{i}.{p}": s for i, (c_s, c_t) in enumerate(
            [(16, 64), (32, 128), (64, 256)], start=1) for p, s in [
            ("regressor.0.weight", (c_t, c_s, 1, 1)), ("regressor.2.weight", (c_t, c_t, 1, 1)),
            ("regressor.4.weight", (c_t, c_t, 1, 1)), ("log_scale", (c_t,))]})


def test_vid_gradients_for_features_and_heads_match_finite_differences():
    """The plugin's gradients (it computes in float32) against central differences of the same
    loss in float64 (R's VIDLoss re-statement holding the heads' parameters)."""
    g = gen(22)
    torch.manual_seed(22)
    method = VID(layers=["a", "b"])
    method.setup({"a": torch.Size([2, 3, 4, 4]), "b": torch.Size([2, 4, 2, 2])},
                 {"a": torch.Size([2, 5, 2, 2]), "b": torch.Size([2, 2, 2, 2])})
    with torch.no_grad():
        for head in method.heads.values():
            head.log_scale.copy_(torch.randn(head.log_scale.shape, generator=g))
    student = {k: torch.randn(s, generator=g) for k, s in (("a", (2, 3, 4, 4)),
                                                           ("b", (2, 4, 2, 2)))}
    teacher = {k: torch.randn(s, generator=g) for k, s in (("a", (2, 5, 2, 2)),
                                                           ("b", (2, 2, 2, 2)))}
    a = student["a"].clone().requires_grad_(True)
    method.loss_terms({"a": a, "b": student["b"]}, teacher,
                      Batch(torch.zeros(2, dtype=torch.long)))["vid"].backward()

    refs = {}
    for k, head in method.heads.items():
        refs[k] = RVIDLoss(*head.regressor[0].weight.shape[1::-1], head.log_scale.numel())
        refs[k] = refs[k].double()
        refs[k].load_state_dict(head.state_dict())

    def ref_loss(a64=None):
        a64 = student["a"].double() if a64 is None else a64
        with torch.no_grad():
            return (refs["a"](a64, teacher["a"].double())
                    + refs["b"](student["b"].double(), teacher["b"].double()))

    for k, head in method.heads.items():
        for name, param in head.named_parameters():
            ref_param = dict(refs[k].named_parameters())[name]
            original = ref_param.detach().clone()

            def at(value, ref_param=ref_param):
                with torch.no_grad():
                    ref_param.copy_(value)
                return ref_loss()

            numeric = central_differences(at, original, 1e-6)
            with torch.no_grad():
                ref_param.copy_(original)
            for i, num in numeric.items():
                assert param.grad.flatten()[i].item() == pytest.approx(num, rel=1e-4, abs=1e-7), \
                    (k, name, i)
    for i, num in central_differences(ref_loss, student["a"].double(), 1e-6).items():
        assert a.grad.flatten()[i].item() == pytest.approx(num, rel=1e-4, abs=1e-7), i


# ---- combinations ----------------------------------------------------------------------------

def test_combinations_build_set_up_and_return_every_term():
    trainable_parts.check_combination("kd+vid", {"kd", "vid"})


def test_kd_plus_vid_terms():
    student, teacher = trainable_parts.pair()
    method = build_method("kd+vid", method_config("kd+vid"))
    x = torch.randn(2, 3, 32, 32, generator=gen(8))
    prepare(method, student, teacher, x, num_classes=10)
    trainee = Trainee(student, method).train()
    _, terms = trainee(x, read_teacher(method, teacher, x),
                       Batch(torch.zeros(2, dtype=torch.long)))
    assert set(terms) == {"kd", "vid"}
    assert all(v.dim() == 0 and torch.isfinite(v) for v in terms.values())
    assert method.term_weights(0, 240) == {"kd": 1.0, "vid": 1.0}


# ---- against RepDistiller's composition ------------------------------------------------------

def _r_modules(method, feat_s, feat_t) -> nn.ModuleList:
    """R's freshly built VIDLoss modules, their initial variances checked against kt-bench's
    freshly prepared heads."""
    modules = make_r_vid_modules(feat_s, feat_t)
    assert len(modules) == len(method.layers)
    for r_head, layer in zip(modules, method.layers, strict=True):
        assert torch.allclose(r_head.log_scale, method.heads[layer].log_scale, rtol=1e-6, atol=0)
    return modules


def _distinct_variances(method, g: torch.Generator) -> None:
    """Distinct per-channel variances, so that a mix-up of channels shows."""
    with torch.no_grad():
        for head in method.heads.values():
            head.log_scale.add_(torch.randn(head.log_scale.shape, generator=g))


def _load_into(method, modules: nn.ModuleList) -> None:
    """Copy kt-bench's heads into R's modules (strict state-dict loads: the layouts must
    match)."""
    for r_head, layer in zip(modules, method.layers, strict=True):
        r_head.load_state_dict(method.heads[layer].state_dict())


@pytest.mark.parametrize("teacher_name,student_name,rel", trainable_parts.PAIRS)
def test_loss_equals_repdistillers(teacher_name, student_name, rel):
    trainable_parts.check_loss_equals_repdistillers("vid", teacher_name, student_name, rel,
                                                    _r_modules, _load_into, _distinct_variances)


def test_losses_are_float32_under_bf16_autocast():
    trainable_parts.check_float32_under_bf16_autocast("vid")
