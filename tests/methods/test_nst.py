"""``nst_linear``, ``nst_poly`` and ``nst_gauss``: the loss against a loop-level computation of
the MMD² of each kernel, its gradient, the ``layers`` option (the sum over several taps), and
the crd-cifar100 cell's loss (``nst_poly``) against RepDistiller's (tests/repdistiller_ref.py)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from kt_bench.methods.nst import (
    NSTGauss,
    NSTLinear,
    NSTPoly,
    gaussian_mmd2,
    nst_loss,
    selectivity_samples,
    shared_bandwidth,
)

from kt_bench.api.align import align_spatial
from kt_bench.api.method import Batch, build_method
from kt_bench.core.errors import ConfigError

from .composition import (
    PAIRS,
    check_cell_loss_equals_repdistillers,
    check_vgg_cells_use_all_four_stage_outputs,
)
from .loops import assert_gradient_matches, check_feature_gradient

torch.manual_seed(0)

#: The batch the options tests give the methods (NST reads no labels).
BATCH = Batch(torch.zeros(2, dtype=torch.long))


# ---- NST -------------------------------------------------------------------------------------

def _rows(f):
    """Per sample: list of L2-normalised channel maps (as float64 lists)."""
    out = []
    for n in range(f.shape[0]):
        chans = []
        for k in range(f.shape[1]):
            v = f[n, k].flatten().double()
            chans.append((v / v.norm()).tolist())
        out.append(chans)
    return out


def _dot(x, y):
    return sum(a * b for a, b in zip(x, y, strict=True))


def _sqdist(x, y):
    return sum((a - b) ** 2 for a, b in zip(x, y, strict=True))


def _mean_kernel(xs, ys, kernel, degree, c, sigma2):
    pairs = list(itertools.product(xs, ys))
    if kernel == "linear":
        vals = [_dot(x, y) for x, y in pairs]
    elif kernel == "poly":
        vals = [(_dot(x, y) + c) ** degree for x, y in pairs]
    else:
        vals = [math.exp(-_sqdist(x, y) / (2 * sigma2)) for x, y in pairs]
    return sum(vals) / len(vals)


def _mean_sqdist(xs, ys):
    return sum(_sqdist(x, y) for x in xs for y in ys) / (len(xs) * len(ys))


def _bandwidths(s, t, sigma2, bandwidth):
    """σ² of the terms (tt, ss, st): fixed, shared (all ordered pairs of the union, diagonal
    included) or per term (the old, non-MMD choice: each term's own pairs)."""
    if sigma2 is not None:
        return [sigma2] * 3
    if bandwidth == "shared":
        return [_mean_sqdist(t + s, t + s)] * 3
    return [_mean_sqdist(t, t), _mean_sqdist(s, s), _mean_sqdist(s, t)]


def nst_direct(f_s, f_t, kernel, degree=2, c=0.0, sigma2=None, sigma_from=None,
               bandwidth="shared"):
    """MMD² = mean k(t,t') + mean k(s,s') - 2 mean k(s,t), per sample, averaged.

    Gaussian with ``sigma2=None``: σ² from the image's samples, one for all three terms
    (``bandwidth="shared"``) or each term its own (``"per_term"``, to document the old loss).
    With ``sigma_from=(f_s0, f_t0)`` σ² comes from those *base* maps (frozen, as the loss
    detaches it).
    """
    total = 0.0
    rows = list(zip(_rows(f_s), _rows(f_t), strict=True))
    base = list(zip(_rows(sigma_from[0]), _rows(sigma_from[1]), strict=True)) if sigma_from \
        else rows
    for (s, t), (s0, t0) in zip(rows, base, strict=True):
        s2 = _bandwidths(s0, t0, sigma2, bandwidth) if kernel == "gaussian" else [None] * 3
        total += (_mean_kernel(t, t, kernel, degree, c, s2[0])
                  + _mean_kernel(s, s, kernel, degree, c, s2[1])
                  - 2 * _mean_kernel(s, t, kernel, degree, c, s2[2]))
    return total / f_s.shape[0]


CASES = [
    dict(kernel="linear"),
    dict(kernel="poly", degree=2, c=0.0),
    dict(kernel="poly", degree=3, c=1.0),
    dict(kernel="gaussian", sigma2=None),
    dict(kernel="gaussian", sigma2=0.7),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c.values())))
def test_nst_loss_matches_formula_with_unequal_channels(case):
    f_s, f_t = torch.randn(2, 3, 3, 3), torch.randn(2, 5, 3, 3)
    got = nst_loss(f_s, f_t, **case).item()
    assert got == pytest.approx(nst_direct(f_s, f_t, **case), rel=1e-4, abs=1e-7)


@pytest.mark.parametrize("case", CASES[:2] + CASES[3:4], ids=["linear", "poly", "gauss"])
def test_nst_loss_aligns_unequal_spatial_sizes_by_pooling(case):
    f_s, f_t = torch.randn(2, 3, 6, 6), torch.randn(2, 4, 3, 3)
    pooled = F.adaptive_avg_pool2d(f_s, 3)
    assert nst_loss(f_s, f_t, **case).item() == pytest.approx(nst_direct(pooled, f_t, **case),
                                                               rel=1e-4, abs=1e-7)
    up, _ = align_spatial(f_t, f_s, "interpolate")  # teacher larger: student is resized up
    got = nst_loss(f_t, f_s, align="interpolate", **case).item()
    assert got == pytest.approx(nst_direct(up, f_s, **case), rel=1e-4, abs=1e-7)


@pytest.mark.parametrize("kernel", ["linear", "poly", "gaussian"])
def test_nst_loss_is_zero_for_equal_maps_and_positive_otherwise(kernel):
    f = torch.randn(3, 6, 4, 4)
    assert nst_loss(f, f.clone(), kernel=kernel).item() == pytest.approx(0.0, abs=1e-6)
    assert nst_loss(torch.randn(3, 6, 4, 4), f, kernel=kernel).item() > 1e-4


@pytest.mark.parametrize("kernel", ["linear", "poly"])
@pytest.mark.parametrize("shape_s,shape_t", [((2, 16, 2, 2), (2, 24, 2, 2)),   # HW < C
                                             ((2, 3, 5, 5), (2, 4, 5, 5))])    # HW > C
def test_nst_gram_and_kernel_forms_agree(kernel, shape_s, shape_t):
    f_s, f_t = torch.randn(shape_s), torch.randn(shape_t)
    a = nst_loss(f_s, f_t, kernel=kernel, form="kernel")
    b = nst_loss(f_s, f_t, kernel=kernel, form="gram")
    c = nst_loss(f_s, f_t, kernel=kernel, form="auto")
    assert a.item() == pytest.approx(b.item(), rel=1e-4, abs=1e-7)
    assert c.item() == pytest.approx(a.item(), rel=1e-4, abs=1e-7)


def test_nst_gram_form_refuses_other_kernels():
    with pytest.raises(ValueError, match="form='gram'"):
        nst_loss(torch.randn(1, 2, 2, 2), torch.randn(1, 2, 2, 2), kernel="poly", c=1.0,
                 form="gram")
    with pytest.raises(ValueError, match="accepted: linear, poly, gaussian"):
        nst_loss(torch.randn(1, 2, 2, 2), torch.randn(1, 2, 2, 2), kernel="cubic")


# ---- NST-Gaussian: one bandwidth per image, a true MMD² ----------------------------------------

def _random_pairs(gen, b):
    """``b`` random (student, teacher) pairs of one random shape (a batch), some of them
    near-equal, sparse or collapsed."""
    c_s, c_t, h, w = (int(v) for v in torch.randint(1, 6, (4,), generator=gen))
    kind = int(torch.randint(0, 4, (1,), generator=gen))
    f_t = torch.randn(b, c_t, h, w, generator=gen)
    if kind == 0:  # unrelated maps, maybe of twice the size (pooled to the teacher's)
        scale = int(torch.randint(1, 3, (1,), generator=gen))
        f_s = torch.randn(b, c_s, h * scale, w * scale, generator=gen)
    elif kind == 1:  # the teacher's channels, slightly perturbed: MMD² near 0
        f_s = f_t + 1e-3 * torch.randn(f_t.shape, generator=gen)
    elif kind == 2:  # post-ReLU maps: sparse, some channels all zero
        f_t = f_t.relu()
        f_s = torch.randn(b, c_s, h, w, generator=gen).relu()
    else:  # a collapsed student: every channel the teacher's first, plus noise
        f_s = f_t[:, :1].expand(b, c_s, h, w) + 0.05 * torch.randn(b, c_s, h, w, generator=gen)
    return f_s, f_t


def test_nst_gaussian_is_nonnegative_on_1000_random_pairs():
    """50 batches of 20 pairs, each batch of one random shape; every image's MMD² is checked."""
    gen = torch.Generator().manual_seed(1)
    per_image = []
    for _ in range(50):
        f_s, f_t = _random_pairs(gen, 20)
        loss = nst_loss(f_s, f_t, kernel="gaussian")
        f_s, f_t = align_spatial(f_s, f_t)
        raw = gaussian_mmd2(selectivity_samples(f_s), selectivity_samples(f_t))  # (20,)
        # the loss is the batch mean of the per-image values clamped at 0 ...
        assert loss.item() == pytest.approx(raw.clamp_min(0).mean().item(), rel=1e-6, abs=1e-9)
        assert loss.item() >= 0.0
        per_image.append(raw)
    raw = torch.cat(per_image)
    assert raw.numel() == 1000
    # ... and the clamp removes float32 rounding only
    assert raw.min().item() > -1e-5
    assert (raw.clamp_min(0) >= 0).all()


@pytest.mark.parametrize("shape", [(2, 5, 3, 3), (1, 1, 2, 2), (3, 4, 1, 1), (2, 3, 1, 7)])
@pytest.mark.parametrize("sigma2", [None, 0.3])
def test_nst_gaussian_is_zero_for_equal_inputs(shape, sigma2):
    f = torch.randn(shape)
    got = nst_loss(f, f.clone(), kernel="gaussian", sigma2=sigma2).item()
    assert got == pytest.approx(0.0, abs=1e-6)


def test_shared_bandwidth_is_the_mean_squared_distance_over_the_union():
    f_s, f_t = torch.randn(2, 3, 3, 3), torch.randn(2, 5, 3, 3)
    f_t[0, 1] = 0  # an all-zero channel: normalised to the zero vector
    s, t = selectivity_samples(f_s), selectivity_samples(f_t)
    got = shared_bandwidth(s, t).flatten()
    for n, (rs, rt) in enumerate(zip(_rows(f_s), _rows(f_t), strict=True)):
        rt = [[0.0] * 9 if any(math.isnan(v) for v in r) else r for r in rt]
        assert got[n].item() == pytest.approx(_mean_sqdist(rt + rs, rt + rs), rel=1e-5)
    # unit-norm samples: 2·(1 − ‖mean of the union‖²)
    s = selectivity_samples(torch.randn(2, 3, 3, 3))
    t = selectivity_samples(torch.randn(2, 4, 3, 3))
    closed = 2 * (1 - torch.cat([t, s], 1).mean(1).pow(2).sum(-1))
    assert torch.allclose(shared_bandwidth(s, t).flatten(), closed, atol=1e-6)


def test_nst_gaussian_penalises_a_collapsed_student():
    """Teacher {t1, t2}, 60° apart (‖t1 − t2‖² = 1); student {t1, normalize(t1 + ε)}, ‖ε‖² = 0.01:
    the student covers one of the teacher's two patterns. One shared σ² gives MMD² ≈ 0.37; the
    old per-term bandwidths gave ≈ 0.003, since each term's σ² rescales its own distances (the
    student's near-duplicate pair looks as far apart as the teacher's distinct pair)."""
    t1 = [1.0, 0.0, 0.0]
    t2 = [0.5, math.sqrt(3) / 2, 0.0]
    s2 = [1.0, 0.0, 0.1]  # t1 + ε, normalised by the loss
    f_t = torch.tensor([[[t1], [t2]]])  # (1, 2, 1, 3): two channels of a 1x3 map
    f_s = torch.tensor([[[t1], [s2]]])
    # by hand: the squared distances between unit vectors, 2 − 2·cos
    c1, c2 = 1 / math.sqrt(1.01), 0.5 / math.sqrt(1.01)  # cos(t1, s2), cos(t2, s2)
    d12, d1, d2 = 1.0, 2 - 2 * c1, 2 - 2 * c2  # ‖t1−t2‖², ‖t1−s2‖², ‖t2−s2‖²
    # shared σ²: all 16 ordered pairs of the union {t1, t2, t1, s2} (diagonal included)
    sigma2 = 2 * (d12 + 0.0 + d1 + d12 + d2 + d1) / 16

    def k(d, s2_):
        return math.exp(-d / (2 * s2_))

    def mmd2(s2_tt, s2_ss, s2_st):
        k_tt = (2 * k(0, s2_tt) + 2 * k(d12, s2_tt)) / 4
        k_ss = (2 * k(0, s2_ss) + 2 * k(d1, s2_ss)) / 4
        # student t1 vs teacher t1, t2; student s2 vs teacher t1, t2
        k_st = (k(0, s2_st) + k(d12, s2_st) + k(d1, s2_st) + k(d2, s2_st)) / 4
        return k_tt + k_ss - 2 * k_st

    shared = mmd2(sigma2, sigma2, sigma2)
    assert shared == pytest.approx(0.3676, abs=1e-3)
    got = nst_loss(f_s, f_t, kernel="gaussian").item()
    assert got >= 0.1
    assert got == pytest.approx(shared, rel=1e-4)
    assert nst_direct(f_s, f_t, "gaussian") == pytest.approx(shared, rel=1e-6)
    # the old per-term bandwidths: each term's own pairs' mean squared distance
    per_term = mmd2(2 * d12 / 4, 2 * d1 / 4, (0 + d12 + d1 + d2) / 4)
    old = nst_direct(f_s, f_t, "gaussian", bandwidth="per_term")
    assert old == pytest.approx(per_term, rel=1e-5)  # the maps are float32
    assert old == pytest.approx(0.0031, abs=2e-4)
    assert got > 100 * old


# ---- gradients -------------------------------------------------------------------------------

GRAD_LOSSES = {
    f"nst-{c['kernel']}-{c.get('sigma2')}-{c.get('c')}": (lambda s, t, c=c: nst_loss(s, t, **c))
    for c in CASES if not (c["kernel"] == "gaussian" and c["sigma2"] is None)
}


@pytest.mark.parametrize("name", list(GRAD_LOSSES))
def test_gradient_reaches_the_student_only_and_matches_finite_differences(name):
    check_feature_gradient(GRAD_LOSSES[name])


def test_gaussian_default_sigma_is_detached_from_the_gradient():
    """sigma2=None: the gradient is that of the loss with the image's one shared σ² held fixed
    (float64 inputs, central differences of the float64 loop-level reference)."""
    f_s = torch.randn(1, 3, 2, 2, dtype=torch.float64, requires_grad=True)
    f_t = torch.randn(1, 4, 2, 2, dtype=torch.float64)
    nst_loss(f_s, f_t, kernel="gaussian").backward()
    base = (f_s.detach(), f_t)
    assert_gradient_matches(f_s.grad, lambda v: nst_direct(v, f_t, "gaussian", sigma_from=base),
                            f_s, 1e-4, rel=2e-2, abs_tol=1e-5)


# ---- NST: layers ----------------------------------------------------------------------------

NST_CLASSES = [
    (NSTLinear, "linear", {}),
    (NSTPoly, "poly", {"degree": 3, "c": 1.0}),
    (NSTGauss, "gaussian", {"sigma2": None}),
    (NSTGauss, "gaussian", {"sigma2": 0.5}),
]


@pytest.mark.parametrize("cls,kernel,opts", NST_CLASSES,
                         ids=["linear", "poly", "gauss", "gauss-fixed"])
def test_nst_default_is_the_single_last_map(cls, kernel, opts):
    method = cls(**opts)
    assert method.layers == ("feat",)
    assert method.taps == ("feat",)
    assert method.align == "pool"
    student = {"feat": torch.randn(2, 3, 4, 4)}
    teacher = {"feat": torch.randn(2, 5, 4, 4)}
    got = method.loss_terms(student, teacher, BATCH)[method.name]
    want = nst_loss(student["feat"], teacher["feat"], kernel=kernel, **opts)
    assert got.item() == pytest.approx(want.item(), rel=1e-6)


@pytest.mark.parametrize("cls,kernel,opts", NST_CLASSES,
                         ids=["linear", "poly", "gauss", "gauss-fixed"])
def test_nst_sums_over_the_layers(cls, kernel, opts):
    layers = ["stage1", "stage2", "stage3"]  # a list, as a grid's TOML gives it
    method = cls(layers=layers, align="pool", **opts)
    assert method.layers == ("stage1", "stage2", "stage3")
    assert method.taps == method.layers
    for key, value in opts.items():
        assert getattr(method, key) == value
    # stage maps of halving size, student's larger than the teacher's at stage 3 (pooled)
    student = {"stage1": torch.randn(2, 4, 8, 8), "stage2": torch.randn(2, 6, 4, 4),
               "stage3": torch.randn(2, 8, 4, 4)}
    teacher = {"stage1": torch.randn(2, 5, 8, 8), "stage2": torch.randn(2, 7, 4, 4),
               "stage3": torch.randn(2, 9, 2, 2)}
    got = method.loss_terms(student, teacher, BATCH)[method.name]
    want = sum(nst_loss(student[k], teacher[k], kernel=kernel, **opts).item() for k in layers)
    assert got.item() == pytest.approx(want, rel=1e-5)
    assert got.item() > 0


def test_nst_keeps_its_other_options():
    poly = NSTPoly(weight=10.0, layers=("feat_pre",), align="interpolate", degree=3, c=0.5)
    assert (poly.weight, poly.layers, poly.align, poly.degree, poly.c) == (
        10.0, ("feat_pre",), "interpolate", 3, 0.5)
    gauss = NSTGauss(sigma2=0.25)
    assert gauss.sigma2 == 0.25 and gauss.weight == 50.0


@pytest.mark.parametrize("name", ["nst_linear", "nst_poly", "nst_gauss"])
def test_nst_option_tap_is_gone(name):
    with pytest.raises(ConfigError, match="unknown option 'tap'.*layers"):
        build_method(name, {name: {"tap": "feat"}})
    method = build_method(name, {name: {"layers": ["stage2", "stage3"]}})
    assert method.taps == ("stage2", "stage3")


def test_nst_layers_must_be_a_list_of_names():
    with pytest.raises(ValueError, match="list of tap names"):
        NSTPoly(layers="feat")
    with pytest.raises(ValueError, match="at least one"):
        NSTPoly(layers=())


# ---- composition: the cell vs RepDistiller ----------------------------------------------------

@pytest.mark.parametrize("teacher_name,student_name", PAIRS)
def test_cell_loss_equals_repdistillers(teacher_name, student_name):
    check_cell_loss_equals_repdistillers("nst_poly", teacher_name, student_name)


def test_vgg_cells_use_all_four_stage_outputs():
    check_vgg_cells_use_all_four_stage_outputs("nst_poly")
