"""``pkt``: the probabilistic knowledge-transfer loss against a loop-level computation of its
formula, its gradient against finite differences, its precision, the method's options, and
RepDistiller's loss composition (tests/ref_repdistiller_relational.py)."""

from __future__ import annotations

import math

import pytest
import torch
from kt_bench.methods.pkt import pkt_loss

from . import relational
from .relational import dot, rows


def pkt_direct(f_s: torch.Tensor, f_t: torch.Tensor, eps: float = 1e-7) -> float:
    """mean_ij P_t·log((P_t + eps)/(P_s + eps)), P the row-normalised (cos + 1)/2, rows of the
    features divided by (‖row‖ + eps)."""
    def probs(f):
        unit = [[v / (math.sqrt(dot(a, a)) + eps) for v in a] for a in rows(f)]
        sim = [[(dot(a, c) + 1.0) / 2.0 for c in unit] for a in unit]
        return [[v / sum(row) for v in row] for row in sim]

    ps, pt = probs(f_s), probs(f_t)
    b = len(ps)
    return sum(pt[i][j] * math.log((pt[i][j] + eps) / (ps[i][j] + eps))
               for i in range(b) for j in range(b)) / b ** 2


# ---- values ----------------------------------------------------------------------------------

@pytest.mark.parametrize("s_shape,t_shape", relational.SHAPES)
def test_pkt_loss_matches_the_loop(s_shape, t_shape):
    f_s, f_t = relational.pair(s_shape, t_shape, seed=1)
    got = pkt_loss(f_s, f_t)
    assert got.dtype == torch.float64
    assert got.item() == pytest.approx(pkt_direct(f_s, f_t), rel=1e-9)
    assert got.item() > 0
    # in float32 a small KL of probabilities rounded at ~1e-7 each
    assert pkt_loss(f_s.float(), f_t.float()).item() == pytest.approx(got.item(), rel=1e-3)
    # a large eps shows where it enters (added to the norms and inside the log-ratio)
    big = pkt_loss(f_s, f_t, eps=0.1).item()
    assert big == pytest.approx(pkt_direct(f_s, f_t, eps=0.1), rel=1e-9)
    assert abs(big - got.item()) > 1e-2 * got.item()


def test_invariances():
    f = torch.randn(6, 10, dtype=torch.float64)
    # cosine similarities ignore each sample's own positive scale
    per_sample = torch.rand(6, 1, dtype=torch.float64) + 0.5
    assert pkt_loss(per_sample * f, f).item() == pytest.approx(0.0, abs=1e-12)
    # ... but it is not blind to a change of the batch's structure
    g = f.clone()
    g[0] = torch.randn(10, dtype=torch.float64)
    assert pkt_loss(g, f).item() > 1e-5


def test_pkt_zeros_nan_rows_as_repdistiller_does():
    f_s, f_t = torch.randn(4, 5), torch.randn(4, 5)
    f_nan = f_s.clone()
    f_nan[1] = float("nan")
    zero = f_s.clone()
    zero[1] = 0.0
    assert pkt_loss(f_nan, f_t).item() == pytest.approx(pkt_loss(zero, f_t).item(), rel=1e-6)


# ---- as a relational method ------------------------------------------------------------------

class TestAsARelationalMethod(relational.RelationalMethodTests):
    """``pkt`` through the tests all relational methods share: its loss's zero, gradient, batch
    and precision checks, the method's defaults, options and term, ``kd+pkt``, and RepDistiller's
    composition."""

    name = "pkt"
    loss = staticmethod(pkt_loss)
    defaults = {"weight": 30000.0, "tap": "pool", "eps": 1e-7, "ce_weight": None}
    bad_options = [({"tap": ""}, "tap"), ({"eps": 0.0}, "eps")]
    on_taps = ({"eps": 1e-3}, lambda s, t: pkt_loss(s["pool"], t["pool"], 1e-3))
    gradients = {"pkt": (pkt_loss, pkt_direct)}
