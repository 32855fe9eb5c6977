"""``pkt``: probabilistic knowledge transfer (Passalis & Tefas 2018).

Each sample's cosine similarities to the batch, mapped to [0, 1] and normalised per row, form a
conditional distribution over the batch; the student matches the teacher's distributions by a
KL divergence. Only the batch size must agree (student and teacher dimensions may differ).
"""

from __future__ import annotations

import torch
from kt_bench.methods.sp import at_least_float32, check_batches

from kt_bench.api.method import Batch, Method, Taps, register_method


def unit_rows(f: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """(B, ...) -> (B, D): flattened samples divided by (‖row‖ + eps), NaNs set to 0, in float32
    (float64 for float64 input)."""
    a = at_least_float32(f).flatten(1)
    a = a / (a.pow(2).sum(dim=1, keepdim=True).sqrt() + eps)
    return torch.where(torch.isnan(a), torch.zeros_like(a), a)


def pkt_probabilities(f: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """(B, ...) -> (B, B): cosine similarities (of :func:`unit_rows`) mapped to [0, 1] by
    (x + 1) / 2, each row divided by its sum."""
    u = unit_rows(f, eps)
    sim = (u @ u.t() + 1.0) / 2.0
    return sim / sim.sum(dim=1, keepdim=True)


def pkt_loss(f_s: torch.Tensor, f_t: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Mean over all B×B entries of P_t · log((P_t + eps) / (P_s + eps)).

    P the row-normalised similarities of :func:`pkt_probabilities` (a mean, not a per-row sum:
    the KL of each row divided by B). Computed in float32 (float64 for float64 inputs) even
    under autocast; the teacher is detached. Zero for identical inputs.
    """
    check_batches(f_s, f_t, "PKT")
    if eps <= 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    with torch.autocast(f_s.device.type, enabled=False):
        p_s = pkt_probabilities(f_s, eps)
        p_t = pkt_probabilities(f_t.detach(), eps)
        return (p_t * torch.log((p_t + eps) / (p_s + eps))).mean()


@register_method("pkt")
class PKT(Method):
    """Probabilistic knowledge transfer on one tap (``tap``, default ``pool``: the pooled
    features, RepDistiller's ``feat[-1]``).

    Default weight 30000 and eps 1e-7: the CIFAR-100 benchmark's (RepDistiller
    scripts/run_cifar_distill.sh ``--distill pkt -a 0 -b 30000``; distiller_zoo/PKT.py
    ``eps=0.0000001``).
    """

    default_weight = 30000.0

    def __init__(self, weight: float | None = None, tap: str = "pool", eps: float = 1e-7) -> None:
        super().__init__(weight)
        if not isinstance(tap, str) or not tap:
            raise ValueError(f"tap must name one tap (a non-empty string), got {tap!r}")
        if eps <= 0:
            raise ValueError(f"eps must be > 0, got {eps}")
        self.tap = tap
        self.eps = float(eps)
        self.taps = (tap,)

    def loss_terms(self, student: Taps, teacher: Taps, batch: Batch) -> dict[str, torch.Tensor]:
        """``{"pkt": pkt_loss}`` on ``tap``."""
        return {self.name: pkt_loss(student[self.tap], teacher[self.tap], self.eps)}
