"""``rkd``: relational knowledge distillation (Park et al. 2019), distance and angle terms.

The student matches the teacher's relations between the batch's samples: the pairwise
distances (normalised by their mean) and the angles formed by every triple. Only the batch size
must agree, so student and teacher dimensions may differ.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from kt_bench.methods.sp import at_least_float32, check_batches

from kt_bench.api.method import Batch, Method, Taps, register_method


def pairwise_distances(e: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """(B, D) -> (B, B) Euclidean distances, diagonal 0.

    As RepDistiller's ``RKDLoss.pdist``: the squared distance is expanded as
    ‖a‖² + ‖b‖² − 2·a·b and clamped at ``eps`` before the square root, so distinct samples are
    at least √eps apart (never 0).
    """
    sq = e.pow(2).sum(dim=1)
    d2 = (sq[:, None] + sq[None, :] - 2.0 * (e @ e.t())).clamp_min(eps)
    eye = torch.eye(e.shape[0], dtype=torch.bool, device=e.device)
    return d2.sqrt().masked_fill(eye, 0.0)


def normalised_distances(e: torch.Tensor) -> torch.Tensor:
    """:func:`pairwise_distances` divided by the mean of the off-diagonal (all positive) ones.

    A batch of one has no pairs: its single (zero) entry is returned as is.
    """
    b = e.shape[0]
    d = pairwise_distances(e)
    if b < 2:
        return d
    # every off-diagonal distance is >= sqrt(eps) > 0, so this is the mean over d > 0
    return d / (d.sum() / (b * (b - 1)))


def rkd_distance_loss(f_s: torch.Tensor, f_t: torch.Tensor) -> torch.Tensor:
    """Smooth-L1 (β = 1, mean over the B×B entries) between the student's and the teacher's
    :func:`normalised_distances` of the flattened samples; float32 (float64 for float64
    inputs), teacher detached."""
    check_batches(f_s, f_t, "RKD")
    with torch.autocast(f_s.device.type, enabled=False):
        d_s = normalised_distances(at_least_float32(f_s).flatten(1))
        d_t = normalised_distances(at_least_float32(f_t.detach()).flatten(1))
        return F.smooth_l1_loss(d_s, d_t, beta=1.0)


def triplet_angles(e: torch.Tensor) -> torch.Tensor:
    """(B, D) -> (B, B, B): entry [i, j, k] is the cosine between e_j − e_i and e_k − e_i,
    each difference divided by max(‖·‖, 1e-12) (0 where j or k equals i)."""
    diff = F.normalize(e[None, :, :] - e[:, None, :], p=2.0, dim=2, eps=1e-12)
    return diff @ diff.transpose(1, 2)


def rkd_angle_loss(f_s: torch.Tensor, f_t: torch.Tensor) -> torch.Tensor:
    """Smooth-L1 (β = 1, mean over all B³ entries) between the student's and the teacher's
    :func:`triplet_angles` of the flattened samples; float32 (float64 for float64 inputs),
    teacher detached."""
    check_batches(f_s, f_t, "RKD")
    with torch.autocast(f_s.device.type, enabled=False):
        a_s = triplet_angles(at_least_float32(f_s).flatten(1))
        a_t = triplet_angles(at_least_float32(f_t.detach()).flatten(1))
        return F.smooth_l1_loss(a_s, a_t, beta=1.0)


def rkd_loss(f_s: torch.Tensor, f_t: torch.Tensor, w_dist: float = 25.0,
             w_angle: float = 50.0) -> torch.Tensor:
    """w_dist · :func:`rkd_distance_loss` + w_angle · :func:`rkd_angle_loss`.

    A term whose weight is 0 is not computed. Zero for identical inputs.
    """
    total = f_s.new_zeros((), dtype=torch.promote_types(f_s.dtype, torch.float32))
    if w_dist:
        total = total + w_dist * rkd_distance_loss(f_s, f_t)
    if w_angle:
        total = total + w_angle * rkd_angle_loss(f_s, f_t)
    return total


@register_method("rkd")
class RKD(Method):
    """Relational knowledge distillation on one tap (``tap``, default ``pool``: the pooled
    features, RepDistiller's ``feat[-1]``).

    Defaults: weight 1 (RepDistiller scripts/run_cifar_distill.sh ``--distill rkd -a 0 -b 1``),
    distance weight 25 and angle weight 50 (distiller_zoo/RKD.py ``RKDLoss(w_d=25, w_a=50)``).
    A batch of one sample has no relations: its loss is 0 (RepDistiller's would be NaN).
    """

    default_weight = 1.0

    def __init__(self, weight: float | None = None, tap: str = "pool", w_dist: float = 25.0,
                 w_angle: float = 50.0) -> None:
        super().__init__(weight)
        if not isinstance(tap, str) or not tap:
            raise ValueError(f"tap must name one tap (a non-empty string), got {tap!r}")
        if w_dist < 0 or w_angle < 0:
            raise ValueError(f"w_dist and w_angle must be >= 0, got {w_dist} and {w_angle}")
        self.tap = tap
        self.w_dist = float(w_dist)
        self.w_angle = float(w_angle)
        self.taps = (tap,)

    def loss_terms(self, student: Taps, teacher: Taps, batch: Batch) -> dict[str, torch.Tensor]:
        """``{"rkd": rkd_loss}`` on ``tap``."""
        return {self.name: rkd_loss(student[self.tap], teacher[self.tap], self.w_dist,
                                    self.w_angle)}
