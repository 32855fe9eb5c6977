"""``rkd``: the distance and angle losses against a loop-level computation of their formulas,
their gradients against finite differences, their precision, the method's options, and
RepDistiller's loss composition (tests/ref_repdistiller_relational.py)."""

from __future__ import annotations

import math

import pytest
import torch
from kt_bench.methods.rkd import (
    pairwise_distances,
    rkd_angle_loss,
    rkd_distance_loss,
    rkd_loss,
)

from . import relational
from .relational import dot, rows


def _smooth_l1(x: float) -> float:
    return 0.5 * x * x if abs(x) < 1.0 else abs(x) - 0.5


def _distances(f):
    r = rows(f)
    b = len(r)
    d = [[0.0 if i == j else math.sqrt(max(sum((x - y) ** 2 for x, y in zip(r[i], r[j],
                                                                            strict=True)), 1e-12))
          for j in range(b)] for i in range(b)]
    mean = sum(d[i][j] for i in range(b) for j in range(b) if i != j) / (b * (b - 1))
    return [[v / mean for v in row] for row in d]


def _angles(f):
    r = rows(f)
    b = len(r)

    def unit(i, j):
        diff = [y - x for x, y in zip(r[i], r[j], strict=True)]
        n = max(math.sqrt(dot(diff, diff)), 1e-12)
        return [v / n for v in diff]

    units = [[unit(i, j) for j in range(b)] for i in range(b)]
    return [[[dot(units[i][j], units[i][k]) for k in range(b)] for j in range(b)]
            for i in range(b)]


def rkd_direct(f_s, f_t, w_dist: float = 25.0, w_angle: float = 50.0) -> tuple[float, float,
                                                                                float]:
    """(distance term, angle term, w_dist·distance + w_angle·angle), loop by loop."""
    ds, dt = _distances(f_s), _distances(f_t)
    b = len(ds)
    dist = sum(_smooth_l1(ds[i][j] - dt[i][j]) for i in range(b) for j in range(b)) / b ** 2
    a_s, a_t = _angles(f_s), _angles(f_t)
    angle = sum(_smooth_l1(a_s[i][j][k] - a_t[i][j][k])
                for i in range(b) for j in range(b) for k in range(b)) / b ** 3
    return dist, angle, w_dist * dist + w_angle * angle


# ---- values ----------------------------------------------------------------------------------

@pytest.mark.parametrize("s_shape,t_shape", relational.SHAPES)
def test_rkd_loss_matches_the_loop(s_shape, t_shape):
    f_s, f_t = relational.pair(s_shape, t_shape, seed=2)
    dist, angle, total = rkd_direct(f_s, f_t)
    assert rkd_distance_loss(f_s, f_t).item() == pytest.approx(dist, rel=1e-9, abs=1e-14)
    assert rkd_angle_loss(f_s, f_t).item() == pytest.approx(angle, rel=1e-9, abs=1e-14)
    assert rkd_loss(f_s, f_t).item() == pytest.approx(total, rel=1e-9, abs=1e-13)
    _, _, weighted = rkd_direct(f_s, f_t, 2.0, 0.5)
    assert rkd_loss(f_s, f_t, w_dist=2.0, w_angle=0.5).item() == pytest.approx(
        weighted, rel=1e-9, abs=1e-14)
    assert rkd_loss(f_s.float(), f_t.float()).item() == pytest.approx(total, rel=1e-4,
                                                                       abs=1e-6)
    if s_shape[0] > 2:
        assert dist > 0 and angle > 0


def test_rkd_is_zero_for_two_samples():
    # two samples: one distance (normalised to 1 on both sides) and only degenerate angles
    f_s, f_t = relational.pair((2, 7), (2, 3), seed=3)
    assert rkd_direct(f_s, f_t)[2] == pytest.approx(0.0, abs=1e-12)
    assert rkd_loss(f_s, f_t).item() == pytest.approx(0.0, abs=1e-12)


def test_rkd_single_sample_is_zero_not_nan():
    f_s, f_t = torch.randn(1, 5, requires_grad=True), torch.randn(1, 3)
    loss = rkd_loss(f_s, f_t)
    assert loss.item() == 0.0
    loss.backward()
    assert torch.isfinite(f_s.grad).all()


def test_rkd_coincident_samples_are_sqrt_eps_apart():
    # as RepDistiller's pdist: the squared distance is clamped at 1e-12, so two equal samples
    # are 1e-6 apart and count in the mean distance
    e = torch.tensor([[1.0, 2.0], [1.0, 2.0], [4.0, 6.0]], dtype=torch.float64)
    d = pairwise_distances(e)
    assert d[0, 1].item() == pytest.approx(1e-6, rel=1e-6)
    assert d[0, 2].item() == pytest.approx(5.0, rel=1e-12)
    assert torch.equal(torch.diagonal(d), torch.zeros(3, dtype=torch.float64))


def test_invariances():
    f = torch.randn(6, 10, dtype=torch.float64)
    # distances are normalised by their mean and angles ignore scale and translation
    assert rkd_loss(2.0 * f + 0.5, f).item() == pytest.approx(0.0, abs=1e-9)
    # ... but it is not blind to a change of the batch's structure
    g = f.clone()
    g[0] = torch.randn(10, dtype=torch.float64)
    assert rkd_loss(g, f).item() > 1e-5


# ---- gradients -------------------------------------------------------------------------------

#: The losses whose gradients are checked: (loss function, loop-level formula).
GRADIENTS = {
    "rkd": (rkd_loss, lambda s, t: rkd_direct(s, t)[2]),
    "rkd-dist": (rkd_distance_loss, lambda s, t: rkd_direct(s, t)[0]),
    "rkd-angle": (rkd_angle_loss, lambda s, t: rkd_direct(s, t)[1]),
}


# ---- as a relational method ------------------------------------------------------------------

class TestAsARelationalMethod(relational.RelationalMethodTests):
    """``rkd`` through the tests all relational methods share: its loss's zero, gradient, batch
    and precision checks, the method's defaults, options and term, ``kd+rkd``, and RepDistiller's
    composition."""

    name = "rkd"
    loss = staticmethod(rkd_loss)
    defaults = {"weight": 1.0, "tap": "pool", "w_dist": 25.0, "w_angle": 50.0,
                "ce_weight": None}
    bad_options = [({"w_dist": -1.0}, "w_dist"), ({"w_angle": -0.5}, "w_angle"),
                   ({"tap": ["pool"]}, "tap")]
    on_taps = ({"w_dist": 1.0, "w_angle": 0.0},
               lambda s, t: rkd_distance_loss(s["pool"], t["pool"]))
    gradients = GRADIENTS
