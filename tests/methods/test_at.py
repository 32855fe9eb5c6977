"""``at``: the loss against a loop-level computation of its formula, the pooling of the
larger map, its gradient, and the crd-cifar100 cell's loss against RepDistiller's
(tests/repdistiller_ref.py)."""

from __future__ import annotations

import math

import pytest
import torch
from kt_bench.methods.at import at_loss

from .composition import (
    PAIRS,
    check_cell_loss_equals_repdistillers,
    check_vgg_cells_use_all_four_stage_outputs,
)
from .loops import check_feature_gradient

torch.manual_seed(0)


def _attention_direct(f, p):
    b, c, h, w = f.shape
    maps = []
    for n in range(b):
        q = [sum(abs(f[n, k, y, x].item()) ** p for k in range(c))
             for y in range(h) for x in range(w)]
        norm = math.sqrt(sum(v * v for v in q))
        maps.append([v / norm for v in q])
    return maps


@pytest.mark.parametrize("p", [2.0, 1.0])
def test_at_loss_matches_formula(p):
    s, t = torch.randn(2, 3, 4, 4), torch.randn(2, 5, 4, 4)
    qs, qt = _attention_direct(s, p), _attention_direct(t, p)
    expected = sum((a - b) ** 2 for n in range(2)
                   for a, b in zip(qs[n], qt[n], strict=True)) / (2 * 16)
    assert at_loss(s, t, p).item() == pytest.approx(expected, rel=1e-5)


def test_at_loss_pools_the_larger_map():
    s, t = torch.randn(2, 3, 8, 8), torch.randn(2, 5, 4, 4)
    pooled = s.reshape(2, 3, 4, 2, 4, 2).mean(dim=(3, 5))  # 2x2 average = adaptive pool 8 -> 4
    assert at_loss(s, t).item() == pytest.approx(at_loss(pooled, t).item(), rel=1e-6)


def test_gradient_reaches_the_student_only_and_matches_finite_differences():
    check_feature_gradient(at_loss)


# ---- composition: the cell vs RepDistiller ----------------------------------------------------

@pytest.mark.parametrize("teacher_name,student_name", PAIRS)
def test_cell_loss_equals_repdistillers(teacher_name, student_name):
    check_cell_loss_equals_repdistillers("at", teacher_name, student_name)


def test_vgg_cells_use_all_four_stage_outputs():
    check_vgg_cells_use_all_four_stage_outputs("at")
