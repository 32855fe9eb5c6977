"""``reviewkd`` and ``ofd``: the pure losses against loop-level formulas, numerical integration and
finite differences; the ABFs and connectors built from the taps against mdistiller's per-pair
configuration; combinations; and the loss of a configured method against an independent
re-statement of mdistiller's ``forward_train`` (tests/ref_mdistiller_features.py)."""

from __future__ import annotations

import math

import pytest
import torch
from kt_bench.methods.ofd import OFD, make_connector, ofd_loss, ofd_margin, partial_l2
from kt_bench.methods.reviewkd import ABF, ReviewKD, hcl_level_loss, hcl_loss
from torch import nn

from kt_bench.config import Recipe
from kt_bench.engine import (
    Trainee,
    base_ce_weight,
    batch_statistics_teacher,
    setup_method,
    tap_shapes,
    teacher_taps,
    total_loss,
)
from kt_bench.method import Batch, NotApplicable, build_method, method_config
from kt_bench.models import build_model
from kt_bench.taps import TapRecorder

from .ref_mdistiller_features import (
    M_REVIEWKD_CONFIGS,
    MABF,
    m_bn_before_relu,
    m_margins,
    m_ofd_loss,
    m_reviewkd_loss,
    m_stage_channels,
    make_m_abfs,
    make_m_connectors,
    mdistiller_feats,
)

STAGES3 = ["stage1", "stage2", "stage3"]
VGG_LAYERS = ["stage1", "stage2", "stage3", "stage4"]
#: The grid options that reproduce M's configuration (VGG pairs override ``layers``).
GRID_OPTIONS = {
    "reviewkd": {"weight": 5.0, "warmup": 20, "layers": STAGES3, "stu_preact": False,
                 "max_mid_channel": 512},
    "ofd": {"weight": 0.001, "kernel_size": 1, "layers": STAGES3},
}
PAIRS = [("resnet56", "resnet20"), ("wrn_40_2", "wrn_16_2"), ("vgg13", "vgg8")]
CRD_PAIRS = [("wrn_40_2", "wrn_16_2"), ("wrn_40_2", "wrn_40_1"), ("resnet56", "resnet20"),
             ("resnet110", "resnet20"), ("resnet110", "resnet32"), ("resnet32x4", "resnet8x4"),
             ("vgg13", "vgg8")]


def grid_options(name: str, pair: tuple[str, str]) -> dict:
    """The grid's options of ``name`` for ``pair``."""
    options = dict(GRID_OPTIONS[name])
    if pair[0].startswith("vgg"):
        options["layers"] = VGG_LAYERS
    return options


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _central_differences(fn, x: torch.Tensor, step: float) -> list[float]:
    """(fn(x + step·e_i) − fn(x − step·e_i)) / (2·step) for every element i."""
    flat = x.detach().clone().flatten()
    out = []
    for i in range(flat.numel()):
        plus, minus = flat.clone(), flat.clone()
        plus[i] += step
        minus[i] -= step
        out.append((float(fn(plus.view_as(x))) - float(fn(minus.view_as(x)))) / (2 * step))
    return out


# ---- hcl_loss --------------------------------------------------------------------------------

def _adaptive_mean(f: torch.Tensor, n: int, c: int, i: int, j: int, size: int) -> float:
    """One cell of an adaptive average pool to size x size (PyTorch's window rule)."""
    h, w = f.shape[2], f.shape[3]
    h0, h1 = (i * h) // size, -((-(i + 1) * h) // size)
    w0, w1 = (j * w) // size, -((-(j + 1) * w) // size)
    cells = [f[n, c, y, x].item() for y in range(h0, h1) for x in range(w0, w1)]
    return sum(cells) / len(cells)


def _mse_loops(f_s: torch.Tensor, f_t: torch.Tensor, size: int | None) -> float:
    b, c, h, w = f_s.shape
    total, count = 0.0, 0
    for n in range(b):
        for k in range(c):
            if size is None:
                cells = [(f_s[n, k, y, x].item() - f_t[n, k, y, x].item()) ** 2
                         for y in range(h) for x in range(w)]
            else:
                cells = [(_adaptive_mean(f_s, n, k, i, j, size)
                          - _adaptive_mean(f_t, n, k, i, j, size)) ** 2
                         for i in range(size) for j in range(size)]
            total += sum(cells)
            count += len(cells)
    return total / count


def _hcl_level_loops(f_s: torch.Tensor, f_t: torch.Tensor) -> float:
    loss, total, weight = _mse_loops(f_s, f_t, None), 1.0, 1.0
    for size in (4, 2, 1):
        if size < f_s.shape[2]:
            weight /= 2
            loss += weight * _mse_loops(f_s, f_t, size)
            total += weight
    return loss / total


@pytest.mark.parametrize("shape", [(2, 3, 8, 8), (2, 2, 4, 4), (3, 2, 1, 1), (2, 3, 5, 5),
                                   (2, 2, 6, 3), (1, 1, 2, 2)])
def test_hcl_level_loss_matches_loops(shape):
    gen = _gen(sum(shape))
    f_s = torch.randn(*shape, dtype=torch.float64, generator=gen)
    f_t = torch.randn(*shape, dtype=torch.float64, generator=gen)
    got = hcl_level_loss(f_s, f_t).item()
    assert got == pytest.approx(_hcl_level_loops(f_s, f_t), rel=1e-5)


def test_hcl_level_loss_by_hand():
    # a 2x2 map: of the contexts 4, 2, 1 only 1 is below the height 2; it weighs 1/2
    f_s = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
    f_t = torch.zeros(1, 1, 2, 2)
    full = (1 + 4 + 9 + 16) / 4
    pooled = 2.5 ** 2
    assert hcl_level_loss(f_s, f_t).item() == pytest.approx((full + 0.5 * pooled) / 1.5)
    # a 1x1 map: the plain squared error
    assert hcl_level_loss(torch.full((1, 1, 1, 1), 3.0), torch.ones(1, 1, 1, 1)).item() == 4.0


def test_hcl_loss_sums_the_levels_and_checks_its_input():
    gen = _gen(3)
    maps = [((2, 4, 8, 8), (2, 4, 8, 8)), ((2, 5, 4, 4), (2, 5, 4, 4)), ((2, 6, 1, 1),) * 2]
    f_s = [torch.randn(s, dtype=torch.float64, generator=gen) for s, _ in maps]
    f_t = [torch.randn(t, dtype=torch.float64, generator=gen) for _, t in maps]
    want = sum(_hcl_level_loops(s, t) for s, t in zip(f_s, f_t, strict=True))
    assert hcl_loss(f_s, f_t).item() == pytest.approx(want, rel=1e-5)
    with pytest.raises(ValueError, match="one length"):
        hcl_loss(f_s, f_t[:2])
    with pytest.raises(ValueError, match="one shape"):
        hcl_loss([f_s[0]], [f_t[1]])


def test_hcl_loss_gradients_match_finite_differences():
    gen = _gen(5)
    f_s = [torch.randn(2, 2, 4, 4, dtype=torch.float64, generator=gen),
           torch.randn(2, 3, 3, 3, dtype=torch.float64, generator=gen)]
    f_t = [torch.randn(f.shape, dtype=torch.float64, generator=gen) for f in f_s]
    for level in range(2):
        var = f_s[level].clone().requires_grad_(True)
        teacher = f_t[level].clone().requires_grad_(True)
        args = [f if i != level else var for i, f in enumerate(f_s)]
        hcl_loss(args, [t if i != level else teacher for i, t in enumerate(f_t)]).backward()
        assert teacher.grad is None  # the teacher's map is detached

        def loops(v, level=level):
            return sum(_hcl_level_loops(v if i == level else s, t)
                       for i, (s, t) in enumerate(zip(f_s, f_t, strict=True)))

        numeric = _central_differences(loops, f_s[level], 1e-6)
        for i, num in enumerate(numeric):
            assert var.grad.flatten()[i].item() == pytest.approx(num, rel=1e-4, abs=1e-7), i


# ---- ABF -------------------------------------------------------------------------------------

@pytest.mark.parametrize("s_hw,t_hw", [(4, 4), (4, 8), (8, 4)])
def test_abf_equals_ms_abf(s_hw, t_hw):
    gen = _gen(s_hw * 10 + t_hw)
    torch.manual_seed(s_hw + t_hw)
    ours = ABF(3, 5, 7, fuse=True)
    ref = MABF(3, 5, 7, fuse=True)
    ref.load_state_dict(ours.state_dict())  # fails unless the layout is M's
    x = torch.randn(2, 3, s_hw, s_hw, generator=gen)
    residual = torch.randn(2, 5, 2, 2, generator=gen)
    out, res = ours(x, residual, (t_hw, t_hw))
    ref_out, ref_res = ref(x, residual, s_hw, t_hw)
    assert out.shape == (2, 7, t_hw, t_hw) and res.shape == (2, 5, t_hw, t_hw)
    torch.testing.assert_close(out, ref_out, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(res, ref_res, rtol=1e-6, atol=1e-6)
    assert set(ABF(3, 5, 7, fuse=False).state_dict()) == set(MABF(3, 5, 7, False).state_dict())
    with pytest.raises(ValueError, match="residual"):
        ours(x, None, (s_hw, s_hw))


def _abf_config(method: ReviewKD, student: nn.Module, x: torch.Tensor):
    """(SHAPES, OUT_SHAPES, IN_CHANNELS, OUT_CHANNELS) of the built ABFs, in M's layout."""
    sizes = tap_shapes(student, method.student_levels, x)
    shapes = [int(sizes[k][2]) if len(sizes[k]) == 4 else 1 for k in method.student_levels]
    out_shapes = [h for h, _ in method.out_sizes]
    c_in = [abf.conv1[0].in_channels for abf in method.abfs]
    c_out = [abf.conv2[0].out_channels for abf in method.abfs]
    return shapes[::-1], out_shapes[::-1], c_in, c_out


@pytest.mark.parametrize("pair", CRD_PAIRS)
def test_abfs_built_from_the_taps_equal_ms_configuration(pair):
    torch.manual_seed(0)
    teacher, student = build_model(pair[0], 100), build_model(pair[1], 100)
    x = torch.randn(2, 3, 32, 32, generator=_gen(1))
    method = build_method("reviewkd", method_config("reviewkd",
                                                    {"reviewkd": grid_options("reviewkd", pair)}))
    setup_method(method, student, teacher, x)
    assert _abf_config(method, student, x) == M_REVIEWKD_CONFIGS[pair]
    c_in = M_REVIEWKD_CONFIGS[pair][2]
    mids = {abf.conv1[0].out_channels for abf in method.abfs}
    assert mids == {min(512, c_in[-1])}
    assert [abf.att_conv is not None for abf in method.abfs] == [True] * (len(c_in) - 1) + [False]
    # the stage channels M's models report agree with the taps (OFD's connectors use them)
    assert m_stage_channels(student)[1:] == c_in[:-1]
    assert m_stage_channels(teacher)[1:] == M_REVIEWKD_CONFIGS[pair][3][:-1]


# ---- reviewkd options ------------------------------------------------------------------------

def test_reviewkd_defaults_taps_and_warmup():
    config = method_config("reviewkd")["reviewkd"]
    assert config == {"weight": 1.0, "ce_weight": None, "warmup": 20, "layers": STAGES3,
                      "stu_preact": False, "max_mid_channel": 512}
    method = build_method("reviewkd", method_config("reviewkd"))
    assert method.taps == ("stage1", "stage2", "stage3", "pool", "stage1_pre", "stage2_pre",
                           "stage3_pre")
    pre = ReviewKD(stu_preact=True, layers=VGG_LAYERS)
    assert pre.taps == tuple(f"{k}_pre" for k in VGG_LAYERS) + ("pool",)
    five = build_method("reviewkd", method_config("reviewkd", {"reviewkd": {"weight": 5.0}}))
    # M counts epochs from 1: epoch e (0-based) weighs min((e+1)/20, 1)
    assert five.term_weights(0, 240) == {"reviewkd": 5.0 / 20}
    assert five.term_weights(4, 240) == {"reviewkd": 5.0 * 5 / 20}
    assert five.term_weights(19, 240) == {"reviewkd": 5.0}
    assert five.term_weights(200, 240) == {"reviewkd": 5.0}
    assert ReviewKD(warmup=0).term_weights(0, 240) == {"reviewkd": 1.0}


@pytest.mark.parametrize("make", [
    lambda: ReviewKD(warmup=-1), lambda: ReviewKD(warmup=1.5), lambda: ReviewKD(warmup=True),
    lambda: ReviewKD(max_mid_channel=0), lambda: ReviewKD(layers="stage1"),
    lambda: ReviewKD(layers=[]), lambda: ReviewKD(layers=["stage1", "pool"]),
    lambda: OFD(kernel_size=0), lambda: OFD(kernel_size=1.5), lambda: OFD(layers=[]),
    lambda: OFD(layers="stage1"),
])
def test_bad_options_raise(make):
    with pytest.raises(ValueError):
        make()


# ---- OFD margins -----------------------------------------------------------------------------

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
    gen = _gen(9)
    bn = nn.BatchNorm2d(64)
    with torch.no_grad():
        bn.weight.copy_(torch.randn(64, generator=gen))
        bn.bias.copy_(torch.randn(64, generator=gen) * 2)
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
    gen = _gen(shape[1] * 7 + shape[2])
    s = torch.randn(*shape, dtype=torch.float64, generator=gen)
    t = torch.randn(*shape, dtype=torch.float64, generator=gen)
    m = -torch.rand(1, shape[1], 1, 1, dtype=torch.float64, generator=gen)
    assert partial_l2(s, t, m).item() == pytest.approx(_partial_l2_loops(s, t, m), rel=1e-5)


def test_partial_l2_is_the_distance_to_the_margin_clipped_teacher():
    """For margins <= 0 it is the paper's partial L2 against max(t, m): (s − max(t, m))²
    except where s <= max(t, m) <= 0."""
    gen = _gen(4)
    s = torch.randn(2, 3, 3, 3, dtype=torch.float64, generator=gen)
    t = torch.randn(2, 3, 3, 3, dtype=torch.float64, generator=gen)
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
    gen = _gen(6)
    m = torch.tensor([-0.4, -1.0]).view(1, 2, 1, 1).double()
    t = torch.randn(2, 2, 3, 3, dtype=torch.float64, generator=gen)
    s = torch.randn(2, 2, 3, 3, dtype=torch.float64, generator=gen)
    # keep the student away from the kinks at t and m
    near = ((s - t).abs() < 0.05) | ((s - m).abs() < 0.05)
    s = torch.where(near, s + 0.2, s)
    var = s.clone().requires_grad_(True)
    teacher = t.clone().requires_grad_(True)
    partial_l2(var, teacher, m).backward()
    assert teacher.grad is None
    numeric = _central_differences(lambda v: _partial_l2_loops(v, t, m), s, 1e-6)
    for i, num in enumerate(numeric):
        assert var.grad.flatten()[i].item() == pytest.approx(num, rel=1e-4, abs=1e-6), i


def test_ofd_loss_pools_the_teacher_and_halves_shallower_levels():
    gen = _gen(8)
    f_s = [torch.randn(2, 3, 4, 4, dtype=torch.float64, generator=gen),
           torch.randn(2, 2, 2, 2, dtype=torch.float64, generator=gen)]
    f_t = [torch.randn(2, 3, 8, 8, dtype=torch.float64, generator=gen),
           torch.randn(2, 2, 2, 2, dtype=torch.float64, generator=gen)]
    margins = [-torch.rand(1, 3, 1, 1, dtype=torch.float64, generator=gen),
               -torch.rand(1, 2, 1, 1, dtype=torch.float64, generator=gen)]
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


# ---- OFD method ------------------------------------------------------------------------------

def test_ofd_defaults_taps_buffers_and_margins_from_the_teachers_bns():
    assert method_config("ofd")["ofd"] == {"weight": 0.001, "ce_weight": None,
                                           "kernel_size": 1, "layers": STAGES3}
    torch.manual_seed(0)
    teacher, student = build_model("resnet8x4", 10), build_model("resnet8", 10)
    _perturb_batchnorm(teacher, _gen(2))
    method = build_method("ofd", method_config("ofd"))
    assert method.taps == ("stage1_pre", "stage2_pre", "stage3_pre")
    setup_method(method, student, teacher, torch.randn(2, 3, 32, 32, generator=_gen(3)))
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


# ---- combinations ----------------------------------------------------------------------------

@pytest.mark.parametrize("spec,names", [("kd+reviewkd", {"kd", "reviewkd"}),
                                        ("kd+ofd", {"kd", "ofd"}),
                                        ("reviewkd+ofd", {"reviewkd", "ofd"})])
def test_combinations_build_set_up_train_and_return_every_term(spec, names):
    torch.manual_seed(0)
    student, teacher = build_model("resnet8", 10), build_model("resnet8x4", 10)
    method = build_method(spec, method_config(spec))
    x = torch.randn(4, 3, 32, 32, generator=_gen(3))
    y = torch.randint(0, 10, (4,), generator=_gen(4))
    setup_method(method, student, teacher, x)
    trainee = Trainee(student, method).train()
    optimizer = torch.optim.SGD(trainee.parameters(), lr=0.1)
    recorder = TapRecorder(teacher, teacher.tap_map, method.taps)
    logits, terms = trainee(x, teacher_taps(teacher.eval(), recorder, x), Batch(y, 0, 240))
    assert set(terms) == names
    assert all(v.dim() == 0 and torch.isfinite(v) and v > 0 for v in terms.values())
    weights = method.term_weights(0, 240)
    assert set(weights) == names and all(w > 0 for w in weights.values())
    total_loss(logits, y, terms, weights, 1.0).backward()
    params = dict(method.named_parameters())
    in_optimizer = {id(p) for g in optimizer.param_groups for p in g["params"]}
    owned = {"reviewkd": ".abfs.", "ofd": ".connectors."}
    for name in names - {"kd"}:
        mine = {n: p for n, p in params.items() if owned[name] in n}
        assert mine and all(id(p) in in_optimizer for p in mine.values())
        assert any(torch.count_nonzero(p.grad) > 0 for p in mine.values()), name


# ---- against mdistiller's forward_train ------------------------------------------------------

def _perturb_batchnorm(model: nn.Module, gen: torch.Generator) -> None:
    """Non-trivial BN affine parameters (some weights negative, some biases far above the
    weight, so both branches of OFD's margin are taken) and running statistics estimated on a
    random batch (so eval-mode activations stay of order 1 through deep networks)."""
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    for m in bns:
        c = m.num_features
        sign = torch.where(torch.rand(c, generator=gen) < 0.2, -1.0, 1.0)
        with torch.no_grad():
            m.weight.copy_((torch.rand(c, generator=gen) + 0.5) * sign)
            m.bias.copy_(torch.randn(c, generator=gen) * 0.5)
            m.bias[: max(1, c // 8)] = 4 * m.weight[: max(1, c // 8)].abs()
        m.reset_running_stats()
        m.momentum = None  # the running statistics become the calibration batch's
    was_training = model.training
    model.train()
    with torch.no_grad():
        model(torch.randn(16, 3, 32, 32, generator=gen))
    for m in bns:
        m.momentum = 0.1
    model.train(was_training)


def _setup(pair: tuple[str, str], name: str, options: dict):
    gen = _gen(0)
    torch.manual_seed(0)
    teacher, student = build_model(pair[0], 100), build_model(pair[1], 100)
    _perturb_batchnorm(teacher, gen)
    _perturb_batchnorm(student, gen)
    x = torch.randn(8, 3, 32, 32, generator=gen)
    y = torch.randint(0, 100, (8,), generator=gen)
    method = build_method(name, method_config(name, {name: options}))
    setup_method(method, student, teacher, x)
    return teacher, student, x, y, method


def _kt_bench_loss(method, student, teacher, x, y, epoch: int, epochs: int = 240):
    """The loss the engine's step computes on (x, y) in ``epoch`` (0-based), the teacher as
    the engine runs it for this method (eval mode, or a private train-mode copy)."""
    trainee = Trainee(student, method).train()
    if method.teacher_batch_statistics:
        teacher = batch_statistics_teacher(teacher)
    recorder = TapRecorder(teacher, teacher.tap_map, method.taps)
    t_taps = teacher_taps(teacher if method.teacher_batch_statistics else teacher.eval(),
                          recorder, x)
    recorder.remove()
    logits, terms = trainee(x, t_taps, Batch(y, epoch, epochs))
    trainee.recorder.remove()
    ce = base_ce_weight(method, Recipe(epochs=epochs)) * method.ce_scale(epoch, epochs)
    return total_loss(logits, y, terms, method.term_weights(epoch, epochs), ce)


def _assert_same_gradients(ours, theirs, our_params, their_params, rel: float):
    g_ours = torch.autograd.grad(ours, our_params)
    g_theirs = torch.autograd.grad(theirs, their_params)
    assert [g.shape for g in g_ours] == [g.shape for g in g_theirs]
    a = torch.cat([g.flatten() for g in g_ours])
    b = torch.cat([g.flatten() for g in g_theirs])
    assert ((a - b).norm() / b.norm()).item() < rel


def _copied_abfs(method: ReviewKD, pair: tuple[str, str]) -> nn.ModuleList:
    """M's ABFs for the pair's M configuration, holding kt-bench's ABF weights."""
    _, _, c_in, c_out = M_REVIEWKD_CONFIGS[pair]
    abfs = make_m_abfs(c_in, c_out)
    n = len(abfs)
    for i, abf in enumerate(method.abfs):  # M keeps them deepest first
        abfs[n - 1 - i].load_state_dict(abf.state_dict())  # fails unless the shapes match
    return abfs


R32X4 = ("resnet32x4", "resnet8x4")  # the pair of M's one CIFAR config


#: kt-bench's cross-entropy is float32 even for float64 logits: its rounding (about 5e-7 of a
#: cross-entropy near 4.6) bounds the agreement of float64 totals.
CE_ROUNDING = 2e-6


def _double(*modules: nn.Module) -> None:
    for module in modules:
        module.double()


@pytest.mark.parametrize("pair", [*PAIRS, R32X4])
def test_reviewkd_loss_equals_mdistillers(pair):
    teacher, student, x, y, method = _setup(pair, "reviewkd", grid_options("reviewkd", pair))
    shapes, out_shapes, _, _ = M_REVIEWKD_CONFIGS[pair]
    abfs = _copied_abfs(method, pair)
    for epoch in (4, 30):  # inside the warm-up and after it
        ours = _kt_bench_loss(method, student, teacher, x, y, epoch)
        # M's epochs count from 1; M's CIFAR config: REVIEWKD_WEIGHT 5
        theirs = m_reviewkd_loss(student, teacher, x, y, epoch + 1, abfs, shapes, out_shapes,
                                 weight=5.0)
        assert ours.item() == pytest.approx(theirs.item(), rel=1e-5), epoch
    # and in float64 (float32 rounding amplified through a deep network would hide small
    # differences), with the gradients of the student and the ABFs
    _double(teacher, student, method, abfs)
    x = x.double()
    ours = _kt_bench_loss(method, student, teacher, x, y, 4)
    theirs = m_reviewkd_loss(student, teacher, x, y, 5, abfs, shapes, out_shapes, weight=5.0)
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-9, abs=CE_ROUNDING)
    n = len(abfs)
    our_params = [*student.parameters(), *method.abfs.parameters()]
    their_params = [*student.parameters(),
                    *(p for i in range(n) for p in abfs[n - 1 - i].parameters())]
    _assert_same_gradients(ours, theirs, our_params, their_params, 1e-7)


def test_reviewkd_with_the_students_preact_maps_equals_mdistillers():
    pair = ("resnet20", "resnet8")
    teacher, student, x, y, method = _setup(pair, "reviewkd", {"stu_preact": True})
    ours = _kt_bench_loss(method, student, teacher, x, y, 2)
    shapes, out_shapes, _, _ = M_REVIEWKD_CONFIGS[pair]
    theirs = m_reviewkd_loss(student, teacher, x, y, 3, _copied_abfs(method, pair), shapes,
                             out_shapes, weight=1.0, stu_preact=True)
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-5)


def _copied_connectors(method: OFD, student: nn.Module, teacher: nn.Module) -> nn.ModuleList:
    connectors = make_m_connectors(m_stage_channels(student)[1:], m_stage_channels(teacher)[1:],
                                   method.kernel_size)
    for ours, theirs in zip(method.connectors, connectors, strict=True):
        theirs.load_state_dict(ours.state_dict())
    return connectors


@pytest.mark.parametrize("pair", [*PAIRS, R32X4])
def test_ofd_loss_equals_mdistillers(pair):
    """M's OFD runs its teacher in train mode: kt-bench gives OFD a train-mode copy."""
    teacher, student, x, y, method = _setup(pair, "ofd", grid_options("ofd", pair))
    x = 2 * x + 0.5  # a batch whose statistics are not the running ones
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    ours = _kt_bench_loss(method, student, teacher, x, y, 7)
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in before.items())
    margins = m_margins(m_bn_before_relu(teacher))
    connectors = _copied_connectors(method, student, teacher)
    theirs = m_ofd_loss(student, teacher, x, y, connectors, margins, teacher_train=True)
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-5)
    eval_mode = m_ofd_loss(student, teacher, x, y, connectors, margins, teacher_train=False)
    assert abs(ours.item() - eval_mode.item()) > 1e-2 * abs(theirs.item())  # it matters
    # and in float64, with the gradients of the student and the connectors
    _double(teacher, student, method, connectors)
    x = x.double()
    ours = _kt_bench_loss(method, student, teacher, x, y, 7)
    theirs = m_ofd_loss(student, teacher, x, y, connectors, [m.double() for m in margins],
                        teacher_train=True)
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-9, abs=CE_ROUNDING)
    _assert_same_gradients(ours, theirs, [*student.parameters(), *method.connectors.parameters()],
                           [*student.parameters(), *connectors.parameters()], 1e-7)


def test_ref_feature_dicts_agree_with_the_taps():
    """The re-statement walks the same layers the taps name (a check of the re-statement)."""
    for pair in PAIRS:
        torch.manual_seed(0)
        model = build_model(pair[1], 100).eval()
        layers = VGG_LAYERS if pair[1].startswith("vgg") else STAGES3
        x = torch.randn(2, 3, 32, 32, generator=_gen(1))
        wanted = [*layers, *(f"{k}_pre" for k in layers), "pool"]
        recorder = TapRecorder(model, model.tap_map, wanted)
        with torch.no_grad():
            taps = recorder.collect(model(x))
            logits, feats = mdistiller_feats(model, x)
        recorder.remove()
        torch.testing.assert_close(logits, taps["logits"], rtol=1e-5, atol=1e-5)
        for i, k in enumerate(layers, start=1):
            torch.testing.assert_close(feats["feats"][i], taps[k])
            torch.testing.assert_close(feats["preact_feats"][i], taps[f"{k}_pre"])
        torch.testing.assert_close(feats["pooled_feat"], taps["pool"], rtol=1e-5, atol=1e-6)
