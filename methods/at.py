"""``at``: attention transfer (Zagoruyko & Komodakis 2017)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kt_bench.api.align import align_spatial
from kt_bench.api.method import Batch, Method, Taps, register_method


def attention_map(f: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """Σ_c |F_c|^p over channels, flattened and L2-normalised per sample: (B, H·W)."""
    f = f.float()
    # |x|² is x·x: the usual p = 2 skips the absolute value and its backward
    powered = f.square() if p == 2 else f.abs().pow(p)
    return F.normalize(powered.sum(dim=1).flatten(1), dim=1)


def at_loss(
    f_s: torch.Tensor, f_t: torch.Tensor, p: float = 2.0, align: str = "pool"
) -> torch.Tensor:
    """Mean over batch and positions of (Q_s − Q_t)², Q the attention maps.

    Maps of different spatial size are first aligned by :func:`kt_bench.api.align.align_spatial`
    (default: the larger is average-pooled to the smaller).
    """
    f_s, f_t = align_spatial(f_s, f_t.detach(), align)
    return (attention_map(f_s, p) - attention_map(f_t, p)).pow(2).mean()


@register_method("at")
class AT(Method):
    """Attention transfer at the end of every stage, summed over the ``layers``.

    Default weight β = 1000 on the sum of the per-layer losses, as the CIFAR-100 benchmark
    (RepDistiller ``-b 1000``); the authors' own code uses β/2 per layer (weight 500 here).
    """

    default_weight = 1000.0

    def __init__(
        self,
        weight: float | None = None,
        p: float = 2.0,
        layers: tuple[str, ...] = ("stage1", "stage2", "stage3"),
        align: str = "pool",
    ) -> None:
        super().__init__(weight)
        self.p = float(p)
        self.layers = tuple(layers)
        self.align = align
        self.taps = self.layers

    def loss_terms(self, student: Taps, teacher: Taps, batch: Batch) -> dict[str, torch.Tensor]:
        """``{"at": Σ_layers at_loss}``."""
        total = sum(at_loss(student[k], teacher[k], self.p, self.align) for k in self.layers)
        return {self.name: total}
