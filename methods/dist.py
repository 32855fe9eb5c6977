"""``dist``: DIST, knowledge distillation from a stronger teacher (Huang et al., NeurIPS 2022).

Matches relations instead of distributions: the Pearson correlation between the student's and
the teacher's softened predictions, per sample over the classes (inter-class relation) and per
class over the batch (intra-class relation). Follows the authors' code
(hunto/image_classification_sota and its copies, ``lib/models/losses/dist_kd.py``):
``1 − mean correlation`` for each relation, ×τ², the correlation's denominator offset by 1e-8.
"""

from __future__ import annotations

import torch

from kt_bench.api.method import Batch, Method, Taps, register_method

#: Added to the product of norms in the correlation's denominator (the authors' ``eps``).
PEARSON_EPS = 1e-8


def pearson_rows(a: torch.Tensor, b: torch.Tensor, eps: float = PEARSON_EPS) -> torch.Tensor:
    """Pearson correlation of each row of ``a`` with the same row of ``b``: (N,).

    Rows are centred; the correlation is ⟨a_c, b_c⟩ / (‖a_c‖·‖b_c‖ + eps).
    """
    a_c = a - a.mean(dim=1, keepdim=True)
    b_c = b - b.mean(dim=1, keepdim=True)
    return (a_c * b_c).sum(dim=1) / (a_c.norm(dim=1) * b_c.norm(dim=1) + eps)


def inter_class_relation(y_s: torch.Tensor, y_t: torch.Tensor) -> torch.Tensor:
    """1 − mean over samples of the correlation across classes."""
    return 1.0 - pearson_rows(y_s, y_t).mean()


def intra_class_relation(y_s: torch.Tensor, y_t: torch.Tensor) -> torch.Tensor:
    """1 − mean over classes of the correlation across the batch."""
    return inter_class_relation(y_s.t(), y_t.t())


def dist_loss(logits_s: torch.Tensor, logits_t: torch.Tensor, beta: float = 1.0,
              gamma: float = 1.0, tau: float = 1.0) -> torch.Tensor:
    """τ² · (β·inter + γ·intra) on softmax(z/τ) of both networks (computed in float32)."""
    y_s = torch.softmax(logits_s.float() / tau, dim=1)
    y_t = torch.softmax(logits_t.detach().float() / tau, dim=1)
    relations = beta * inter_class_relation(y_s, y_t) + gamma * intra_class_relation(y_s, y_t)
    return relations * (tau * tau)


@register_method("dist")
class DIST(Method):
    """DIST on the logits.

    Defaults are the authors' CIFAR-100 configuration (``configs/strategies/distill/
    dist_cifar.yaml`` of their classification toolbox, read from hunto/LocalMamba's copy):
    ``kd: dist_t4`` (β = γ = 1, τ = 4), ``kd_loss_weight: 2`` (weight 2 here),
    ``ori_loss_weight: 1`` (cross-entropy weight 1).
    """

    default_weight = 2.0

    def __init__(self, weight: float | None = None, beta: float = 1.0, gamma: float = 1.0,
                 tau: float = 4.0) -> None:
        super().__init__(weight)
        if tau <= 0:
            raise ValueError(f"tau must be > 0, got {tau}")
        if beta < 0 or gamma < 0:
            raise ValueError(f"beta and gamma must be >= 0, got beta={beta}, gamma={gamma}")
        self.beta, self.gamma, self.tau = float(beta), float(gamma), float(tau)
        self.taps = ("logits",)

    def loss_terms(self, student: Taps, teacher: Taps, batch: Batch) -> dict[str, torch.Tensor]:
        """``{"dist": dist_loss}``."""
        loss = dist_loss(student["logits"], teacher["logits"], self.beta, self.gamma, self.tau)
        return {self.name: loss}
