"""``reviewkd``: the hierarchical context loss against loop-level formulas and finite
differences, the ABFs built from the taps against mdistiller's per-pair configuration, the
warm-up, combinations, and the loss of a configured method against an independent
re-statement of mdistiller's ``forward_train`` (tests/ref_mdistiller_features.py)."""

from __future__ import annotations

import pytest
import torch
from kt_bench.methods.reviewkd import ABF, ReviewKD, hcl_level_loss, hcl_loss
from torch import nn

from kt_bench.api.method import build_method, method_config
from kt_bench.models import build_model
from kt_bench.training.lifecycle import tap_shapes

from ..ref_mdistiller_features import (
    M_REVIEWKD_CONFIGS,
    MABF,
    m_reviewkd_loss,
    m_stage_channels,
    make_m_abfs,
)
from . import mdistiller
from .composition import gen, prepare
from .mdistiller import CE_ROUNDING, PAIRS, R32X4, STAGES3, VGG_LAYERS, grid_options

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
    g = gen(sum(shape))
    f_s = torch.randn(*shape, dtype=torch.float64, generator=g)
    f_t = torch.randn(*shape, dtype=torch.float64, generator=g)
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
    g = gen(3)
    maps = [((2, 4, 8, 8), (2, 4, 8, 8)), ((2, 5, 4, 4), (2, 5, 4, 4)), ((2, 6, 1, 1),) * 2]
    f_s = [torch.randn(s, dtype=torch.float64, generator=g) for s, _ in maps]
    f_t = [torch.randn(t, dtype=torch.float64, generator=g) for _, t in maps]
    want = sum(_hcl_level_loops(s, t) for s, t in zip(f_s, f_t, strict=True))
    assert hcl_loss(f_s, f_t).item() == pytest.approx(want, rel=1e-5)
    with pytest.raises(ValueError, match="one length"):
        hcl_loss(f_s, f_t[:2])
    with pytest.raises(ValueError, match="one shape"):
        hcl_loss([f_s[0]], [f_t[1]])


def test_hcl_loss_gradients_match_finite_differences():
    g = gen(5)
    f_s = [torch.randn(2, 2, 4, 4, dtype=torch.float64, generator=g),
           torch.randn(2, 3, 3, 3, dtype=torch.float64, generator=g)]
    f_t = [torch.randn(f.shape, dtype=torch.float64, generator=g) for f in f_s]
    for level in range(2):
        var = f_s[level].clone().requires_grad_(True)
        teacher = f_t[level].clone().requires_grad_(True)
        args = [f if i != level else var for i, f in enumerate(f_s)]
        hcl_loss(args, [t if i != level else teacher for i, t in enumerate(f_t)]).backward()
        assert teacher.grad is None  # the teacher's map is detached

        def loops(v, level=level):
            return sum(_hcl_level_loops(v if i == level else s, t)
                       for i, (s, t) in enumerate(zip(f_s, f_t, strict=True)))

        numeric = mdistiller.central_differences(loops, f_s[level], 1e-6)
        for i, num in enumerate(numeric):
            assert var.grad.flatten()[i].item() == pytest.approx(num, rel=1e-4, abs=1e-7), i


# ---- ABF -------------------------------------------------------------------------------------

@pytest.mark.parametrize("s_hw,t_hw", [(4, 4), (4, 8), (8, 4)])
def test_abf_equals_ms_abf(s_hw, t_hw):
    g = gen(s_hw * 10 + t_hw)
    torch.manual_seed(s_hw + t_hw)
    ours = ABF(3, 5, 7, fuse=True)
    ref = MABF(3, 5, 7, fuse=True)
    ref.load_state_dict(ours.state_dict())  # fails unless the layout is M's
    x = torch.randn(2, 3, s_hw, s_hw, generator=g)
    residual = torch.randn(2, 5, 2, 2, generator=g)
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


@pytest.mark.parametrize("pair", mdistiller.CRD_PAIRS)
def test_abfs_built_from_the_taps_equal_ms_configuration(pair):
    torch.manual_seed(0)
    teacher, student = build_model(pair[0], 100), build_model(pair[1], 100)
    x = torch.randn(2, 3, 32, 32, generator=gen(1))
    method = build_method("reviewkd", method_config("reviewkd",
                                                    {"reviewkd": grid_options("reviewkd", pair)}))
    prepare(method, student, teacher, x)
    assert _abf_config(method, student, x) == M_REVIEWKD_CONFIGS[pair]
    c_in = M_REVIEWKD_CONFIGS[pair][2]
    mids = {abf.conv1[0].out_channels for abf in method.abfs}
    assert mids == {min(512, c_in[-1])}
    assert [abf.att_conv is not None for abf in method.abfs] == [True] * (len(c_in) - 1) + [False]
    # the stage channels M's models report agree with the taps (OFD's connectors use them)
    assert m_stage_channels(student)[1:] == c_in[:-1]
    assert m_stage_channels(teacher)[1:] == M_REVIEWKD_CONFIGS[pair][3][:-1]


# ---- options ---------------------------------------------------------------------------------

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
])
def test_bad_options_raise(make):
    with pytest.raises(ValueError):
        make()


# ---- combinations ----------------------------------------------------------------------------

@pytest.mark.parametrize("spec,names", [("kd+reviewkd", {"kd", "reviewkd"}),
                                        ("reviewkd+ofd", {"reviewkd", "ofd"})])
def test_combinations_build_set_up_train_and_return_every_term(spec, names):
    mdistiller.check_combination(spec, names)


# ---- against mdistiller's forward_train ------------------------------------------------------

def _copied_abfs(method: ReviewKD, pair: tuple[str, str]) -> nn.ModuleList:
    """M's ABFs for the pair's M configuration, holding kt-bench's ABF weights."""
    _, _, c_in, c_out = M_REVIEWKD_CONFIGS[pair]
    abfs = make_m_abfs(c_in, c_out)
    n = len(abfs)
    for i, abf in enumerate(method.abfs):  # M keeps them deepest first
        abfs[n - 1 - i].load_state_dict(abf.state_dict())  # fails unless the shapes match
    return abfs


@pytest.mark.parametrize("pair", [*PAIRS, R32X4])
def test_reviewkd_loss_equals_mdistillers(pair):
    teacher, student, x, y, method = mdistiller.setup(pair, "reviewkd",
                                                      grid_options("reviewkd", pair))
    shapes, out_shapes, _, _ = M_REVIEWKD_CONFIGS[pair]
    abfs = _copied_abfs(method, pair)
    for epoch in (4, 30):  # inside the warm-up and after it
        ours = mdistiller.kt_bench_loss(method, student, teacher, x, y, epoch)
        # M's epochs count from 1; M's CIFAR config: REVIEWKD_WEIGHT 5
        theirs = m_reviewkd_loss(student, teacher, x, y, epoch + 1, abfs, shapes, out_shapes,
                                 weight=5.0)
        assert ours.item() == pytest.approx(theirs.item(), rel=1e-5), epoch
    # and in float64 (float32 rounding amplified through a deep network would hide small
    # differences), with the gradients of the student and the ABFs
    mdistiller.double(teacher, student, method, abfs)
    x = x.double()
    ours = mdistiller.kt_bench_loss(method, student, teacher, x, y, 4)
    theirs = m_reviewkd_loss(student, teacher, x, y, 5, abfs, shapes, out_shapes, weight=5.0)
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-9, abs=CE_ROUNDING)
    n = len(abfs)
    our_params = [*student.parameters(), *method.abfs.parameters()]
    their_params = [*student.parameters(),
                    *(p for i in range(n) for p in abfs[n - 1 - i].parameters())]
    mdistiller.assert_same_gradients(ours, theirs, our_params, their_params, 1e-7)


def test_reviewkd_with_the_students_preact_maps_equals_mdistillers():
    pair = ("resnet20", "resnet8")
    teacher, student, x, y, method = mdistiller.setup(pair, "reviewkd", {"stu_preact": True})
    ours = mdistiller.kt_bench_loss(method, student, teacher, x, y, 2)
    shapes, out_shapes, _, _ = M_REVIEWKD_CONFIGS[pair]
    theirs = m_reviewkd_loss(student, teacher, x, y, 3, _copied_abfs(method, pair), shapes,
                             out_shapes, weight=1.0, stu_preact=True)
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-5)
