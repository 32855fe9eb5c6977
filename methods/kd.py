"""``kd``: knowledge distillation with soft targets (Hinton, Vinyals & Dean 2015), and
``kd_ls``: the same on standardised logits (Sun et al., "Logit Standardization in Knowledge
Distillation", CVPR 2024)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kt_bench.api.method import Batch, Method, Taps, register_method

#: Added to the standard deviation when standardising logits (the reference code's 1e-7).
STANDARDIZE_EPS = 1e-7


def standardize_logits(z: torch.Tensor, eps: float = STANDARDIZE_EPS) -> torch.Tensor:
    """Each row z-scored: (z − mean) / (std + eps), std the unbiased one over the classes.

    As sunshangquan/logit-standardization-KD ``mdistiller/distillers/KD.py`` ``normalize``
    (``Tensor.std``, unbiased by default).
    """
    return (z - z.mean(dim=1, keepdim=True)) / (z.std(dim=1, keepdim=True) + eps)


def kd_loss(logits_s: torch.Tensor, logits_t: torch.Tensor, T: float = 4.0,
            standardize: bool = False) -> torch.Tensor:
    """T² · KL(softmax(z_t/T) ‖ softmax(z_s/T)), averaged over the batch (computed in float32).

    With ``standardize`` both networks' logits are first z-scored per sample
    (:func:`standardize_logits`); T is then the base temperature.
    """
    z_s, z_t = logits_s.float(), logits_t.detach().float()
    if standardize:
        z_s, z_t = standardize_logits(z_s), standardize_logits(z_t)
    log_p_s = F.log_softmax(z_s / T, dim=1)
    log_p_t = F.log_softmax(z_t / T, dim=1)
    return F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True) * (T * T)


@register_method("kd")
class KD(Method):
    """Soft-target distillation on the logits.

    Defaults follow the NST paper's authors' code (TuSimple/neuron-selectivity-transfer): T=4,
    KD gradient scale 16 = T², which is weight 1 here since ``kd_loss`` already carries the T²;
    cross-entropy weight 1. RepDistiller's form is ``ce_weight = 0.1`` in the recipe and
    ``weight = 0.9``. ``standardize`` z-scores the logits first (logit standardization).
    """

    default_weight = 1.0

    def __init__(self, weight: float | None = None, T: float = 4.0,
                 standardize: bool = False) -> None:
        super().__init__(weight)
        if T <= 0:
            raise ValueError(f"T must be > 0, got {T}")
        self.T = float(T)
        self.standardize = bool(standardize)
        self.taps = ("logits",)

    def loss_terms(self, student: Taps, teacher: Taps, batch: Batch) -> dict[str, torch.Tensor]:
        """``{name: kd_loss}``."""
        loss = kd_loss(student["logits"], teacher["logits"], self.T, self.standardize)
        return {self.name: loss}


@register_method("kd_ls")
class KDLogitStandardization(KD):
    """KD on z-scored logits (logit standardization, Sun et al. 2024).

    Defaults are the reference code's CIFAR-100 "KD+Ours" setting
    (sunshangquan/logit-standardization-KD: ``tools/train.py --logit-stand --base-temp 2
    --kd-weight 9``, ``mdistiller/distillers/KD.py``): base temperature T=2, KD weight 9 (on
    a loss that carries T², as here) and cross-entropy weight 0.1 (``CFG.KD.LOSS.CE_WEIGHT``,
    kept from mdistiller's KD).
    """

    default_weight = 9.0
    default_ce_weight = 0.1

    def __init__(self, weight: float | None = None, T: float = 2.0) -> None:
        super().__init__(weight, T, standardize=True)
