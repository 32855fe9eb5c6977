"""``cc`` and ``vid``: the pure losses against loop-level formulas and finite differences, their
trainable parts in the optimiser, their combinations, and the loss of a configured method
against an independent re-statement of RepDistiller's (tests/ref_repdistiller_cc_vid.py)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from kt_bench.methods.cc import CC, cc_loss
from kt_bench.methods.vid import VID, VIDHead, initial_log_scale, vid_loss
from torch import nn

from kt_bench.config import Recipe
from kt_bench.engine import Trainee, base_ce_weight, setup_method, teacher_taps, total_loss
from kt_bench.method import Batch, build_method, method_config
from kt_bench.models import build_model
from kt_bench.taps import TapRecorder

from .fixtures import central_differences as _central_differences
from .ref_repdistiller_cc_vid import (
    R_FLAGS_CC_VID,
    RVIDLoss,
    make_r_cc_modules,
    make_r_vid_modules,
    repdistiller_cc_vid_loss,
)
from .repdistiller_ref import repdistiller_feats
from .test_repdistiller_composition import _perturb_batchnorm

VGG_LAYERS = ["stage1", "stage2", "stage3", "stage4"]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---- cc_loss ---------------------------------------------------------------------------------

def _cc_loops(e_s: torch.Tensor, e_t: torch.Tensor) -> float:
    s, t = e_s.tolist(), e_t.tolist()
    b, d = len(s), len(s[0])
    pairs = [sum(abs(s[i][k] - t[i][k]) * abs(s[i + 1][k] - t[i + 1][k]) for k in range(d))
             for i in range(b - 1)]
    return sum(pairs) / (b - 1)


@pytest.mark.parametrize("b,d", [(2, 5), (3, 1), (7, 4)])
def test_cc_loss_is_the_mean_over_consecutive_pairs(b, d):
    gen = _gen(b * 10 + d)
    e_s = torch.randn(b, d, dtype=torch.float64, generator=gen)
    e_t = torch.randn(b, d, dtype=torch.float64, generator=gen)
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


def _away_from_kinks(b: int, d: int, gen: torch.Generator):
    """(e_s, e_t) in float64 with |e_s − e_t| >= 0.1 everywhere (|.| is smooth there)."""
    e_s = torch.randn(b, d, dtype=torch.float64, generator=gen)
    sign = torch.randint(0, 2, (b, d), generator=gen).double() * 2 - 1
    gap = 0.1 + torch.rand(b, d, dtype=torch.float64, generator=gen)
    return e_s, e_s + sign * gap


def test_cc_loss_gradients_match_finite_differences():
    e_s, e_t = _away_from_kinks(4, 3, _gen(5))
    e_s.requires_grad_(True)
    e_t.requires_grad_(True)
    cc_loss(e_s, e_t).backward()
    # piecewise quadratic: central differences are exact up to float32 rounding of the loss
    for x, other, first in ((e_s, e_t, True), (e_t, e_s, False)):
        def f(v, other=other, first=first):
            return cc_loss(v, other.detach()) if first else cc_loss(other.detach(), v)
        for i, num in _central_differences(f, x, 1e-2).items():
            assert x.grad.flatten()[i].item() == pytest.approx(num, rel=1e-3, abs=1e-4), i


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
    gen = _gen(shape[0])
    mean = torch.randn(*shape, dtype=torch.float64, generator=gen)
    target = torch.randn(*shape, dtype=torch.float64, generator=gen)
    log_scale = torch.randn(shape[1], dtype=torch.float64, generator=gen) * 2
    got = vid_loss(mean, log_scale, target, eps).item()
    assert got == pytest.approx(_vid_loops(mean, log_scale, target, eps), rel=1e-5)


def test_vid_loss_rejects_bad_shapes():
    with pytest.raises(ValueError, match="one shape"):
        vid_loss(torch.randn(2, 3, 4, 4), torch.zeros(3), torch.randn(2, 3, 2, 2))
    with pytest.raises(ValueError, match="one entry per channel"):
        vid_loss(torch.randn(2, 3, 4, 4), torch.zeros(4), torch.randn(2, 3, 4, 4))


def test_vid_loss_gradients_match_finite_differences():
    gen = _gen(11)
    mean = torch.randn(2, 3, 2, 2, dtype=torch.float64, generator=gen).requires_grad_(True)
    target = torch.randn(2, 3, 2, 2, dtype=torch.float64, generator=gen).requires_grad_(True)
    log_scale = torch.randn(3, dtype=torch.float64, generator=gen).requires_grad_(True)
    vid_loss(mean, log_scale, target).backward()
    assert target.grad is None  # the teacher's map is detached
    t = target.detach()
    # quadratic in the mean: exact central differences (up to float32 rounding)
    for i, num in _central_differences(lambda m: vid_loss(m, log_scale.detach(), t),
                                       mean, 1e-2).items():
        assert mean.grad.flatten()[i].item() == pytest.approx(num, rel=1e-3, abs=1e-5), i
    for i, num in _central_differences(lambda s: vid_loss(mean.detach(), s, t),
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
    gen = _gen(s_hw * 100 + t_hw)
    torch.manual_seed(s_hw + t_hw)
    head = VIDHead(3, 5)
    with torch.no_grad():
        head.log_scale.add_(torch.randn(5, generator=gen))
    ref = RVIDLoss(3, 5, 5)
    ref.load_state_dict(head.state_dict())
    f_s = torch.randn(2, 3, s_hw, s_hw, generator=gen)
    f_t = torch.randn(2, 5, t_hw, t_hw, generator=gen)
    assert head(f_s, f_t).item() == pytest.approx(ref(f_s, f_t).item(), rel=1e-6)
    if s_hw > t_hw:  # the student's map is 2x2 average-pooled before the regressor
        pooled = f_s.reshape(2, 3, t_hw, 2, t_hw, 2).mean(dim=(3, 5))
        want = vid_loss(head.regressor(pooled), head.log_scale, f_t)
        assert head(f_s, f_t).item() == pytest.approx(want.item(), rel=1e-6)


# ---- the methods' options --------------------------------------------------------------------

def test_defaults_and_options_round_trip():
    cc = method_config("cc")["cc"]
    assert cc == {"weight": 0.02, "ce_weight": None, "feat_dim": 128}
    vid = method_config("vid")["vid"]
    assert vid == {"weight": 1.0, "ce_weight": None, "layers": ["stage1", "stage2", "stage3"],
                   "init_var": 5.0, "eps": 1e-5}
    method = build_method("vid", method_config("vid", {"vid": {"layers": VGG_LAYERS}}))
    assert method.taps == tuple(VGG_LAYERS)
    assert build_method("cc", method_config("cc")).taps == ("pool",)


@pytest.mark.parametrize("make", [
    lambda: CC(feat_dim=0), lambda: CC(feat_dim=2.5),
    lambda: VID(init_var=0.0), lambda: VID(init_var=1e-6), lambda: VID(eps=-1.0),
    lambda: VID(layers="stage1"), lambda: VID(layers=[]),
])
def test_bad_options_raise(make):
    with pytest.raises(ValueError):
        make()


# ---- trainable parts: in the optimiser, with gradients ---------------------------------------

def _pair():
    torch.manual_seed(0)
    return build_model("resnet8", 10), build_model("resnet8x4", 10)


def _one_step(method_name: str, options: dict | None = None):
    """Set the method up as the engine does, run one SGD step of the Trainee; returns the
    method, the optimiser, each parameter's value before the step and its gradient."""
    student, teacher = _pair()
    method = build_method(method_name, method_config(method_name, options))
    x = torch.randn(4, 3, 32, 32, generator=_gen(3))
    y = torch.randint(0, 10, (4,), generator=_gen(4))
    setup_method(method, student, teacher, x)
    trainee = Trainee(student, method).train()
    optimizer = torch.optim.SGD(trainee.parameters(), lr=0.1)
    recorder = TapRecorder(teacher, teacher.tap_map, method.taps)
    t_taps = teacher_taps(teacher.eval(), recorder, x)
    logits, terms = trainee(x, t_taps, Batch(y, 0, 1))
    loss = total_loss(logits, y, terms, method.term_weights(0, 1), 1.0)
    loss.backward()
    before = {n: p.detach().clone() for n, p in method.named_parameters()}
    grads = {n: p.grad.clone() for n, p in method.named_parameters()}
    optimizer.step()
    assert all(p.grad is None for p in teacher.parameters())
    return method, optimizer, before, grads


@pytest.mark.parametrize("name,expected", [
    ("cc", {"embed_s.weight": (128, 64), "embed_s.bias": (128,),
            "embed_t.weight": (128, 256), "embed_t.bias": (128,)}),
    ("vid", {f"heads.stage{i}.{p}": s for i, (c_s, c_t) in enumerate(
        [(16, 64), (32, 128), (64, 256)], start=1) for p, s in [
        ("regressor.0.weight", (c_t, c_s, 1, 1)), ("regressor.2.weight", (c_t, c_t, 1, 1)),
        ("regressor.4.weight", (c_t, c_t, 1, 1)), ("log_scale", (c_t,))]}),
])
def test_trainable_parts_are_in_the_optimiser_and_train(name, expected):
    method, optimizer, before, grads = _one_step(name)
    params = dict(method.named_parameters())
    assert {n: tuple(p.shape) for n, p in params.items()} == expected
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert all(id(p) in in_optimizer for p in params.values())
    for n, p in params.items():
        assert torch.count_nonzero(grads[n]) > 0, n
        assert not torch.equal(p.detach(), before[n]), n


def test_cc_teacher_embedding_trains_but_the_teacher_feature_gets_no_gradient():
    method = CC(feat_dim=6)
    method.setup({"pool": torch.Size([3, 4])}, {"pool": torch.Size([3, 5])})
    s = torch.randn(3, 4, requires_grad=True)
    t = torch.randn(3, 5, requires_grad=True)
    method.loss_terms({"pool": s}, {"pool": t})["cc"].backward()
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
        for i, num in _central_differences(at, original, step, every).items():
            assert grad.flatten()[i].item() == pytest.approx(num, rel=5e-3, abs=1e-5), i
    finally:
        with torch.no_grad():
            param.copy_(original)


def test_cc_gradients_for_features_and_embeddings_match_finite_differences():
    gen = _gen(21)
    torch.manual_seed(21)
    method = CC(feat_dim=4)
    method.setup({"pool": torch.Size([3, 5])}, {"pool": torch.Size([3, 6])})
    s = torch.randn(3, 5, generator=gen)
    t = torch.randn(3, 6, generator=gen)

    def loss(s_pool=s):
        return method.loss_terms({"pool": s_pool}, {"pool": t})["cc"]

    for param in method.parameters():
        _params_fd(loss, param, 1e-2, every=3)
    s_var = s.clone().requires_grad_(True)
    loss(s_var).backward()
    for i, num in _central_differences(lambda v: loss(v).detach(), s, 1e-2).items():
        assert s_var.grad.flatten()[i].item() == pytest.approx(num, rel=5e-3, abs=1e-5), i


def test_vid_gradients_for_features_and_heads_match_finite_differences():
    """The plugin's gradients (it computes in float32) against central differences of the same
    loss in float64 (R's VIDLoss re-statement holding the heads' parameters)."""
    gen = _gen(22)
    torch.manual_seed(22)
    method = VID(layers=["a", "b"])
    method.setup({"a": torch.Size([2, 3, 4, 4]), "b": torch.Size([2, 4, 2, 2])},
                 {"a": torch.Size([2, 5, 2, 2]), "b": torch.Size([2, 2, 2, 2])})
    with torch.no_grad():
        for head in method.heads.values():
            head.log_scale.copy_(torch.randn(head.log_scale.shape, generator=gen))
    student = {k: torch.randn(s, generator=gen) for k, s in (("a", (2, 3, 4, 4)),
                                                             ("b", (2, 4, 2, 2)))}
    teacher = {k: torch.randn(s, generator=gen) for k, s in (("a", (2, 5, 2, 2)),
                                                             ("b", (2, 2, 2, 2)))}
    a = student["a"].clone().requires_grad_(True)
    method.loss_terms({"a": a, "b": student["b"]}, teacher)["vid"].backward()

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

            numeric = _central_differences(at, original, 1e-6)
            with torch.no_grad():
                ref_param.copy_(original)
            for i, num in numeric.items():
                assert param.grad.flatten()[i].item() == pytest.approx(num, rel=1e-4, abs=1e-7), \
                    (k, name, i)
    for i, num in _central_differences(ref_loss, student["a"].double(), 1e-6).items():
        assert a.grad.flatten()[i].item() == pytest.approx(num, rel=1e-4, abs=1e-7), i


# ---- combinations ----------------------------------------------------------------------------

@pytest.mark.parametrize("spec,names", [("kd+vid", {"kd", "vid"}), ("kd+cc", {"kd", "cc"}),
                                        ("cc+vid", {"cc", "vid"})])
def test_combinations_build_set_up_and_return_every_term(spec, names):
    method, optimizer, _, grads = _one_step(spec)
    assert set(method.term_weights(0, 1)) == names
    trainable = {n for n, _ in method.named_parameters()}
    owned = {"cc": ".embed_t.", "vid": ".heads."}
    for name in names - {"kd"}:
        assert any(n.startswith("members.") and owned[name] in n for n in trainable), name
    assert all(torch.count_nonzero(g) > 0 for g in grads.values())


def test_kd_plus_vid_terms():
    student, teacher = _pair()
    method = build_method("kd+vid", method_config("kd+vid"))
    x = torch.randn(2, 3, 32, 32, generator=_gen(8))
    setup_method(method, student, teacher, x)
    trainee = Trainee(student, method).train()
    recorder = TapRecorder(teacher, teacher.tap_map, method.taps)
    _, terms = trainee(x, teacher_taps(teacher.eval(), recorder, x))
    assert set(terms) == {"kd", "vid"}
    assert all(v.dim() == 0 and torch.isfinite(v) for v in terms.values())
    assert method.term_weights(0, 240) == {"kd": 1.0, "vid": 1.0}


# ---- against RepDistiller's composition ------------------------------------------------------

#: The grid options that reproduce R's configuration (VGG pairs override vid's layers).
GRID_OPTIONS = {"cc": {"weight": 0.02, "feat_dim": 128},
                "vid": {"weight": 1.0, "layers": ["stage1", "stage2", "stage3"],
                        "init_var": 5.0, "eps": 1e-5}}
PAIRS = [("resnet56", "resnet20", 1e-5), ("vgg13", "vgg8", 1e-5), ("wrn_40_2", "wrn_16_2", 1e-4)]



def _kt_bench_loss(method, student, teacher, x, y, recipe: Recipe) -> torch.Tensor:
    """The loss of the engine's training step on (x, y) in epoch 0."""
    trainee = Trainee(student, method).train()
    recorder = TapRecorder(teacher, teacher.tap_map, method.taps)
    t_taps = teacher_taps(teacher.eval(), recorder, x)
    recorder.remove()
    logits, terms = trainee(x, t_taps, Batch(y, 0, recipe.epochs))
    trainee.recorder.remove()
    ce = base_ce_weight(method, recipe) * method.ce_scale(0, recipe.epochs)
    return total_loss(logits, y, terms, method.term_weights(0, recipe.epochs), ce)


def _r_modules(name: str, method, student, teacher, x) -> nn.ModuleList:
    """R's freshly built modules for the pair, their shapes and initial variances checked
    against kt-bench's freshly set-up method."""
    with torch.no_grad():
        feat_s, _ = repdistiller_feats(student.eval(), x[:2])
        feat_t, _ = repdistiller_feats(teacher.eval(), x[:2])
    if name == "cc":
        modules = make_r_cc_modules(feat_s, feat_t)
        assert modules[0].linear.weight.shape == method.embed_s.weight.shape
        assert modules[1].linear.weight.shape == method.embed_t.weight.shape
        return modules
    modules = make_r_vid_modules(feat_s, feat_t)
    assert len(modules) == len(method.layers)
    for r_head, layer in zip(modules, method.layers, strict=True):
        assert torch.allclose(r_head.log_scale, method.heads[layer].log_scale, rtol=1e-6, atol=0)
    return modules


def _load_into(name: str, method, modules: nn.ModuleList) -> None:
    """Copy kt-bench's trainable parameters into R's modules (strict state-dict loads: the
    layouts must match)."""
    if name == "cc":
        modules[0].linear.load_state_dict(method.embed_s.state_dict())
        modules[1].linear.load_state_dict(method.embed_t.state_dict())
        return
    for r_head, layer in zip(modules, method.layers, strict=True):
        r_head.load_state_dict(method.heads[layer].state_dict())


@pytest.mark.parametrize("teacher_name,student_name,rel", PAIRS)
@pytest.mark.parametrize("name", ["cc", "vid"])
def test_loss_equals_repdistillers(name, teacher_name, student_name, rel):
    assert R_FLAGS_CC_VID[name][2] == GRID_OPTIONS[name]["weight"]
    gen = _gen(0)
    torch.manual_seed(0)
    teacher = build_model(teacher_name, 100)
    student = build_model(student_name, 100)
    _perturb_batchnorm(teacher, gen)
    _perturb_batchnorm(student, gen)
    x = torch.randn(8, 3, 32, 32, generator=gen)
    y = torch.randint(0, 100, (8,), generator=gen)
    options = {name: dict(GRID_OPTIONS[name])}
    if name == "vid" and teacher_name.startswith("vgg"):
        options["vid"]["layers"] = VGG_LAYERS
    method = build_method(name, method_config(name, options))
    setup_method(method, student, teacher, x)
    modules = _r_modules(name, method, student, teacher, x)
    if name == "vid":  # distinct per-channel variances, so a mix-up of channels shows
        with torch.no_grad():
            for head in method.heads.values():
                head.log_scale.add_(torch.randn(head.log_scale.shape, generator=gen))
    _load_into(name, method, modules)

    recipe = Recipe(epochs=240)
    ours = _kt_bench_loss(method, student, teacher, x, y, recipe)
    theirs = repdistiller_cc_vid_loss(name, student, teacher, x, y, modules)
    assert ours.item() == pytest.approx(theirs.item(), rel=rel, abs=1e-6)

    # the same gradients reach the student and the method's own parameters
    ours = _kt_bench_loss(method, student, teacher, x, y, recipe)
    g_ours = torch.autograd.grad(ours, [*student.parameters(), *method.parameters()])
    theirs = repdistiller_cc_vid_loss(name, student, teacher, x, y, modules)
    g_theirs = torch.autograd.grad(theirs, [*student.parameters(), *modules.parameters()])
    a = torch.cat([g.flatten() for g in g_ours])
    b = torch.cat([g.flatten() for g in g_theirs])
    assert ((a - b).norm() / b.norm()).item() < 1e-5  # float32 rounding (measured <= 3e-7)
    n_method = sum(p.numel() for p in method.parameters())
    assert torch.count_nonzero(a[-n_method:]) > 0


@pytest.mark.parametrize("name", ["cc", "vid"])
def test_losses_are_float32_under_bf16_autocast(name):
    student, teacher = _pair()
    method = build_method(name, method_config(name))
    x = torch.randn(2, 3, 32, 32, generator=_gen(9))
    setup_method(method, student, teacher, x)
    trainee = Trainee(student, method).train()
    recorder = TapRecorder(teacher, teacher.tap_map, method.taps)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        t_taps = teacher_taps(teacher.eval(), recorder, x)
        _, terms = trainee(x, t_taps)
    assert terms[name].dtype == torch.float32 and torch.isfinite(terms[name])
    terms[name].backward()
    assert all(p.grad is not None for p in method.parameters())
