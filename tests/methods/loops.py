"""Loop-level building blocks in float64 Python arithmetic for the logit methods' formula
tests (KD, DKD, DIST), a seeded draw of logits and labels, central differences, and the
gradient checks of the logit and the feature losses."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch


def softmax(z: list[float]) -> list[float]:
    """The softmax of ``z``, shifted by its maximum."""
    m = max(z)
    e = [math.exp(v - m) for v in z]
    return [v / sum(e) for v in e]


def kl(p: list[float], q: list[float]) -> float:
    """KL(p ‖ q), terms with p = 0 left out."""
    return sum(a * (math.log(a) - math.log(b)) for a, b in zip(p, q, strict=True) if a > 0)


def lists(x: torch.Tensor) -> list:
    """``x`` as nested float64 Python lists."""
    return x.double().tolist()


def draw(b: int, c: int, seed: int, scale: float = 2.0):
    """Student and teacher logits (``b`` × ``c``, float64, × ``scale``) and labels, seeded."""
    gen = torch.Generator().manual_seed(seed)
    s = torch.randn(b, c, dtype=torch.float64, generator=gen) * scale
    t = torch.randn(b, c, dtype=torch.float64, generator=gen) * scale
    y = torch.randint(0, c, (b,), generator=gen)
    return s, t, y


def central_differences(fn: Callable[[torch.Tensor], float], x: torch.Tensor,
                        eps: float = 1e-6) -> torch.Tensor:
    """The gradient of ``fn`` at ``x`` by central differences, element by element."""
    flat = x.detach().flatten()
    out = torch.empty_like(flat)
    for i in range(flat.numel()):
        plus, minus = flat.clone(), flat.clone()
        plus[i] += eps
        minus[i] -= eps
        out[i] = (fn(plus.view_as(x)) - fn(minus.view_as(x))) / (2 * eps)
    return out.view_as(x)


def assert_gradient_matches(grad: torch.Tensor, fn: Callable[[torch.Tensor], float],
                            x: torch.Tensor, eps: float, rel: float, abs_tol: float) -> None:
    """``grad`` (autograd's gradient at ``x``) equals :func:`central_differences` of ``fn`` at
    ``x``, element by element, to ``rel`` or ``abs_tol``."""
    num = central_differences(fn, x, eps).flatten().tolist()
    for i, value in enumerate(grad.flatten().tolist()):
        assert value == pytest.approx(num[i], rel=rel, abs=abs_tol), i


def check_logit_gradient(loss_fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor],
                                           torch.Tensor],
                         direct: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], float],
                         b: int) -> None:
    """``loss_fn(s, t, y)`` on ``b`` × 6 logits (:func:`draw`, seed ``31 + b``) gives the
    teacher's logits no gradient and the student's the one central differences of the float64
    loop-level formula ``direct(s, t, y)`` give (float32 tolerance)."""
    s, t, y = draw(b, 6, seed=31 + b)
    s.requires_grad_(True)
    t.requires_grad_(True)
    loss_fn(s, t, y).backward()
    assert t.grad is None or torch.count_nonzero(t.grad) == 0
    # the float32 loss's gradient against differences of the float64 loop-level formula
    num = central_differences(lambda v: direct(v, t.detach(), y), s)
    torch.testing.assert_close(s.grad, num, rtol=2e-3, atol=2e-5)


def check_feature_gradient(loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
                           ) -> None:
    """``loss_fn(f_s, f_t)`` on (2, 3, 3, 3) maps gives the teacher's map no gradient and the
    student's the one central differences give (every fifth element, float32 tolerance)."""
    gen = torch.Generator().manual_seed(1)  # inputs independent of the other tests' draws
    f_s = torch.randn(2, 3, 3, 3, dtype=torch.float64, generator=gen).requires_grad_(True)
    f_t = torch.randn(2, 3, 3, 3, dtype=torch.float64, generator=gen).requires_grad_(True)
    # the functions compute in float32 for mixed precision; check the gradient against central
    # finite differences at float32 tolerance (a step large enough for float32 rounding).
    loss = loss_fn(f_s, f_t)
    loss.backward()
    assert f_t.grad is None or torch.count_nonzero(f_t.grad) == 0
    grad = f_s.grad.clone()
    eps = 5e-3
    flat = f_s.detach().clone().flatten()
    for i in range(0, flat.numel(), 5):
        plus, minus = flat.clone(), flat.clone()
        plus[i] += eps
        minus[i] -= eps
        num = (loss_fn(plus.view_as(f_s), f_t.detach()) - loss_fn(minus.view_as(f_s), f_t.detach()))
        num = num.item() / (2 * eps)
        assert grad.flatten()[i].item() == pytest.approx(num, rel=2e-2, abs=2e-4), i
