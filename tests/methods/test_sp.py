"""``sp``: the similarity-preserving loss against a loop-level computation of its formula, its
gradient against finite differences, its precision, the method's options, and RepDistiller's
loss composition (tests/ref_repdistiller_relational.py)."""

from __future__ import annotations

import math

import pytest
import torch
from kt_bench.methods.sp import sp_loss

from . import relational
from .relational import dot, rows


def sp_direct(f_s: torch.Tensor, f_t: torch.Tensor) -> float:
    """Σ_ij (Ĝ_t − Ĝ_s)²_ij / B², Ĝ the Gram matrix with each row divided by max(‖row‖, 1e-12)."""
    def gram(f):
        r = rows(f)
        g = [[dot(a, b) for b in r] for a in r]
        return [[v / max(math.sqrt(dot(row, row)), 1e-12) for v in row] for row in g]

    gs, gt = gram(f_s), gram(f_t)
    b = len(gs)
    return sum((gt[i][j] - gs[i][j]) ** 2 for i in range(b) for j in range(b)) / b ** 2


# ---- values ----------------------------------------------------------------------------------

@pytest.mark.parametrize("s_shape,t_shape", relational.SHAPES)
def test_sp_loss_matches_the_loop(s_shape, t_shape):
    f_s, f_t = relational.pair(s_shape, t_shape)
    got = sp_loss(f_s, f_t)
    assert got.dtype == torch.float64  # float64 in, float64 math
    assert got.item() == pytest.approx(sp_direct(f_s, f_t), rel=1e-10)
    assert got.item() > 0
    assert sp_loss(f_s.float(), f_t.float()).item() == pytest.approx(got.item(), rel=1e-4)


def test_invariances():
    f = torch.randn(6, 10, dtype=torch.float64)
    # rows of the Gram matrix are normalised, so a global scale does not matter
    assert sp_loss(3.0 * f, f).item() == pytest.approx(0.0, abs=1e-12)
    # ... but it is not blind to a change of the batch's structure
    g = f.clone()
    g[0] = torch.randn(10, dtype=torch.float64)
    assert sp_loss(g, f).item() > 1e-5


# ---- as a relational method ------------------------------------------------------------------

class TestAsARelationalMethod(relational.RelationalMethodTests):
    """``sp`` through the tests all relational methods share: its loss's zero, gradient, batch
    and precision checks, the method's defaults, options and term, ``kd+sp``, and RepDistiller's
    composition."""

    name = "sp"
    loss = staticmethod(sp_loss)
    defaults = {"weight": 3000.0, "tap": "feat", "ce_weight": None}
    bad_options = [({"tap": ""}, "tap")]
    on_taps = ({"tap": "stage3"}, lambda s, t: sp_loss(s["stage3"], t["stage3"]))
    gradients = {"sp": (sp_loss, sp_direct)}
