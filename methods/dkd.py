"""``dkd``: decoupled knowledge distillation (Zhao et al., CVPR 2022).

The KD loss split into a target-class part (TCKD: the binary distribution target vs. all other
classes) and a non-target part (NCKD: the distribution over the other classes), weighted
separately. Follows mdistiller (megvii-research/mdistiller, ``mdistiller/distillers/DKD.py``):
the non-target distribution is the softmax of ``z/T − 1000·onehot(target)``, both KL terms are
summed over the batch then ×T²/B, and the loss is ramped in over the first ``warmup`` epochs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kt_bench.api.method import Batch, Method, Needs, Taps, register_method

#: What mdistiller subtracts from the target class's scaled logit to drop it from the
#: non-target softmax (its probability underflows to 0 in float32).
TARGET_MASK_OFFSET = 1000.0


def target_mask(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """A (B, C) float mask: 1 at each sample's target class, 0 elsewhere."""
    mask = torch.zeros_like(logits)
    return mask.scatter_(1, target.reshape(-1, 1).long(), 1.0)


def binary_probs(probs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per sample ``[p(target), p(not target)]`` from class probabilities: (B, 2)."""
    p_target = (probs * mask).sum(dim=1, keepdim=True)
    p_other = (probs * (1.0 - mask)).sum(dim=1, keepdim=True)
    return torch.cat([p_target, p_other], dim=1)


def _kl_sum_per_batch(log_p_s: torch.Tensor, p_t: torch.Tensor, T: float) -> torch.Tensor:
    """Σ KL(p_t ‖ p_s) over the batch, ×T²/B (mdistiller's ``size_average=False`` form)."""
    return F.kl_div(log_p_s, p_t, reduction="sum") * (T * T) / p_t.shape[0]


def tckd_loss(logits_s: torch.Tensor, logits_t: torch.Tensor, target: torch.Tensor,
              T: float = 4.0) -> torch.Tensor:
    """Target-class KD: T² · KL of the binary (target, rest) distributions, averaged over B."""
    z_s, z_t = logits_s.float(), logits_t.detach().float()
    mask = target_mask(z_s, target)
    b_s = binary_probs(F.softmax(z_s / T, dim=1), mask)
    b_t = binary_probs(F.softmax(z_t / T, dim=1), mask)
    return _kl_sum_per_batch(torch.log(b_s), b_t, T)


def nckd_loss(logits_s: torch.Tensor, logits_t: torch.Tensor, target: torch.Tensor,
              T: float = 4.0) -> torch.Tensor:
    """Non-target-class KD: T² · KL of the distributions over the non-target classes."""
    z_s, z_t = logits_s.float(), logits_t.detach().float()
    offset = TARGET_MASK_OFFSET * target_mask(z_s, target)
    p_t = F.softmax(z_t / T - offset, dim=1)
    log_p_s = F.log_softmax(z_s / T - offset, dim=1)
    return _kl_sum_per_batch(log_p_s, p_t, T)


def dkd_loss(logits_s: torch.Tensor, logits_t: torch.Tensor, target: torch.Tensor,
             alpha: float = 1.0, beta: float = 8.0, T: float = 4.0) -> torch.Tensor:
    """α·TCKD + β·NCKD (each a KL ×T² averaged over the batch; computed in float32)."""
    return (alpha * tckd_loss(logits_s, logits_t, target, T)
            + beta * nckd_loss(logits_s, logits_t, target, T))


def warmup_factor(epoch: int, warmup: int) -> float:
    """mdistiller's ramp ``min(e / warmup, 1)`` at kt-bench's 0-based ``epoch``.

    mdistiller counts epochs from 1 (``mdistiller/engine/trainer.py``: ``epoch = 1``), so
    kt-bench's epoch ``e`` is its ``e + 1``; ``warmup = 0`` means no ramp.
    """
    if warmup <= 0:
        return 1.0
    return min((epoch + 1) / warmup, 1.0)


@register_method("dkd")
class DKD(Method):
    """Decoupled KD on the logits, with the batch's labels.

    Defaults are mdistiller's (``mdistiller/engine/cfg.py``): CE weight 1, α 1, β 8, T 4,
    warm-up 20 epochs; its CIFAR-100 configs (``configs/cifar100/dkd/*.yaml``) set β per pair
    (2 for ResNet-56→20 and ResNet-110→32, 6 for the WRN pairs, VGG-13→8 and VGG-13→MobileNetV2,
    the default 8 otherwise). ``weight`` scales the DKD term; during the first ``warmup``
    epochs it is multiplied by (epoch+1)/warmup (epoch 0-based).
    """

    default_weight = 1.0

    def __init__(self, weight: float | None = None, alpha: float = 1.0, beta: float = 8.0,
                 T: float = 4.0, warmup: int = 20) -> None:
        super().__init__(weight)
        if T <= 0:
            raise ValueError(f"T must be > 0, got {T}")
        if alpha < 0 or beta < 0:
            raise ValueError(f"alpha and beta must be >= 0, got alpha={alpha}, beta={beta}")
        if isinstance(warmup, bool) or int(warmup) != warmup or warmup < 0:
            raise ValueError(f"warmup must be a whole number of epochs >= 0, got {warmup}")
        self.alpha, self.beta, self.T = float(alpha), float(beta), float(T)
        self.warmup = int(warmup)
        self.needs = Needs(taps=("logits",), labels=True)

    def loss_terms(self, student: Taps, teacher: Taps, batch: Batch
                   ) -> dict[str, torch.Tensor]:
        """``{"dkd": dkd_loss}`` on the batch's labels."""
        loss = dkd_loss(student["logits"], teacher["logits"], batch.labels,
                        self.alpha, self.beta, self.T)
        return {self.name: loss}

    def term_weights(self, epoch: int, epochs: int) -> dict[str, float]:
        """``weight`` × mdistiller's warm-up ramp."""
        return {self.name: self.weight * warmup_factor(epoch, self.warmup)}
