"""``sp``: similarity-preserving distillation (Tung & Mori 2019).

The student learns to reproduce the teacher's batch similarity structure: the B×B Gram matrix
of the batch's flattened activations, each row L2-normalised. Only the batch size must agree,
so the student's and the teacher's features may differ in every other dimension.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kt_bench.api.method import Batch, Method, Taps, register_method


def check_batches(f_s: torch.Tensor, f_t: torch.Tensor, what: str) -> None:
    """Raise ValueError unless ``f_s`` and ``f_t`` hold the same number of samples."""
    if f_s.shape[0] != f_t.shape[0]:
        raise ValueError(f"{what} needs the student's and the teacher's features of the same "
                         f"batch; got batch sizes {f_s.shape[0]} and {f_t.shape[0]}")


def at_least_float32(f: torch.Tensor) -> torch.Tensor:
    """``f`` in float32 if it is of a narrower type (bf16, fp16), else unchanged (float32, or
    float64, in which tests check these ill-conditioned losses against float64 references)."""
    return f.to(torch.promote_types(f.dtype, torch.float32))


def similarity_matrix(f: torch.Tensor) -> torch.Tensor:
    """(B, ...) -> (B, B): the Gram matrix A·Aᵀ of the flattened samples, rows L2-normalised
    (each row divided by max(‖row‖, 1e-12), as ``F.normalize`` does), in float32 or wider."""
    a = at_least_float32(f).flatten(1)
    return F.normalize(a @ a.t(), p=2.0, dim=1, eps=1e-12)


def sp_loss(f_s: torch.Tensor, f_t: torch.Tensor) -> torch.Tensor:
    """‖G_t − G_s‖²_F / B², G the row-normalised batch Gram matrices (:func:`similarity_matrix`).

    Computed in float32 (float64 for float64 inputs) even under autocast; the teacher is
    detached. Zero when the two batches' Gram matrices agree up to a positive scale per row.
    """
    check_batches(f_s, f_t, "SP")
    b = f_s.shape[0]
    with torch.autocast(f_s.device.type, enabled=False):
        g_s = similarity_matrix(f_s)
        g_t = similarity_matrix(f_t.detach())
        return (g_t - g_s).pow(2).sum() / (b * b)


@register_method("sp")
class SP(Method):
    """Similarity preservation on one tap (``tap``, default ``feat``: the last feature map).

    Default weight 3000: the CIFAR-100 benchmark's (RepDistiller
    scripts/run_cifar_distill.sh ``--distill similarity -a 0 -b 3000``). RepDistiller applies
    SP to its ``feat[-2]``, the last stage's output: ``stage3`` for the CIFAR ResNets and WRNs
    (for the WRNs that is block3's raw output, before the final BN-ReLU that ``feat`` includes)
    and ``stage4`` (= ``feat``) for VGG.
    """

    default_weight = 3000.0

    def __init__(self, weight: float | None = None, tap: str = "feat") -> None:
        super().__init__(weight)
        if not isinstance(tap, str) or not tap:
            raise ValueError(f"tap must name one tap (a non-empty string), got {tap!r}")
        self.tap = tap
        self.taps = (tap,)

    def loss_terms(self, student: Taps, teacher: Taps, batch: Batch) -> dict[str, torch.Tensor]:
        """``{"sp": sp_loss}`` on ``tap``."""
        return {self.name: sp_loss(student[self.tap], teacher[self.tap])}
