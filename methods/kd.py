"""``kd``: knowledge distillation with soft targets (Hinton, Vinyals & Dean 2015)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kt_bench.method import Method, Taps, register_method


def kd_loss(logits_s: torch.Tensor, logits_t: torch.Tensor, T: float = 4.0) -> torch.Tensor:
    """T² · KL(softmax(z_t/T) ‖ softmax(z_s/T)), averaged over the batch (computed in float32)."""
    log_p_s = F.log_softmax(logits_s.float() / T, dim=1)
    log_p_t = F.log_softmax(logits_t.detach().float() / T, dim=1)
    return F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True) * (T * T)


@register_method("kd")
class KD(Method):
    """Soft-target distillation on the logits.

    Defaults follow the NST paper's authors' code (TuSimple/neuron-selectivity-transfer): T=4,
    KD gradient scale 16 = T², which is weight 1 here since ``kd_loss`` already carries the T²;
    cross-entropy weight 1. RepDistiller's form is ``ce_weight = 0.1`` in the recipe and
    ``weight = 0.9``.
    """

    default_weight = 1.0

    def __init__(self, weight: float | None = None, T: float = 4.0) -> None:
        super().__init__(weight)
        if T <= 0:
            raise ValueError(f"T must be > 0, got {T}")
        self.T = float(T)
        self.taps = ("logits",)

    def loss_terms(self, student: Taps, teacher: Taps) -> dict[str, torch.Tensor]:
        """``{"kd": kd_loss}``."""
        return {self.name: kd_loss(student["logits"], teacher["logits"], self.T)}
