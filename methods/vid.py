"""``vid``: variational information distillation (Ahn et al., CVPR 2019), in RepDistiller's form.

Per layer, a trainable regressor predicts the mean of a Gaussian over the teacher's map from the
student's map, with one trainable variance per teacher channel; the loss is the Gaussian's
negative log-likelihood (without the constant), summed over the layers. Facts from RepDistiller
(R = HobbitLong/RepDistiller): ``VIDLoss`` in distiller_zoo/VID.py, built in train_student.py as
``VIDLoss(s_channels, t_channels, t_channels)`` for each of ``feat[1:-1]`` and trained with the
student (``trainable_list``); scripts/run_cifar_distill.sh runs it with ``-a 0 -b 1``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from kt_bench.api.align import align_spatial
from kt_bench.api.method import Batch, Method, Shapes, Taps, register_method


def vid_variance(log_scale: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Per-channel variance softplus(log_scale) + eps, in float32."""
    return F.softplus(log_scale.float()) + eps


def vid_loss(pred_mean: torch.Tensor, log_scale: torch.Tensor, target: torch.Tensor,
             eps: float = 1e-5) -> torch.Tensor:
    """Mean over all elements of ½·((pred_mean − target)² / var_c + log var_c), with
    var_c = softplus(log_scale_c) + eps for channel c (R's ``VIDLoss`` after its regressor).

    ``pred_mean`` and ``target`` are (B, C, H, W) maps of one shape, ``log_scale`` has C entries;
    the target (the teacher's map) is detached.
    """
    if pred_mean.shape != target.shape:
        raise ValueError(f"vid_loss needs pred_mean and target of one shape, got "
                         f"{tuple(pred_mean.shape)} and {tuple(target.shape)}")
    if log_scale.shape != (pred_mean.shape[1],):
        raise ValueError(f"log_scale must have one entry per channel ({pred_mean.shape[1]}), "
                         f"got shape {tuple(log_scale.shape)}")
    var = vid_variance(log_scale, eps).view(1, -1, *([1] * (pred_mean.dim() - 2)))
    diff = pred_mean.float() - target.detach().float()
    return (0.5 * (diff.pow(2) / var + var.log())).mean()


def initial_log_scale(init_var: float, eps: float) -> float:
    """The log_scale whose variance softplus(log_scale) + eps equals ``init_var``."""
    if eps < 0 or init_var <= eps:
        raise ValueError(f"need eps >= 0 and init_var > eps, got init_var={init_var}, eps={eps}")
    # softplus⁻¹(v) = log(exp(v) − 1) = v + log(1 − exp(−v)), stable for large v
    v = init_var - eps
    return v + math.log(-math.expm1(-v))


class VIDHead(nn.Module):
    """One layer's trainable parts: ``regressor`` (three 1x1 convs without bias, student
    channels → teacher channels → teacher channels → teacher channels, ReLU between) and
    ``log_scale`` (one entry per teacher channel). Named, and laid out, as R's ``VIDLoss``
    (state-dict keys ``log_scale``, ``regressor.0.weight``, ``regressor.2.weight``,
    ``regressor.4.weight``)."""

    def __init__(self, c_s: int, c_t: int, init_var: float = 5.0, eps: float = 1e-5) -> None:
        super().__init__()
        self.regressor = nn.Sequential(
            nn.Conv2d(c_s, c_t, 1, bias=False), nn.ReLU(),
            nn.Conv2d(c_t, c_t, 1, bias=False), nn.ReLU(),
            nn.Conv2d(c_t, c_t, 1, bias=False),
        )
        self.log_scale = nn.Parameter(torch.full((c_t,), initial_log_scale(init_var, eps)))
        self.eps = float(eps)

    def forward(self, f_s: torch.Tensor, f_t: torch.Tensor) -> torch.Tensor:
        """:func:`vid_loss` of the regressed student map against the teacher's map; maps of
        different size are first aligned by average-pooling the larger to the smaller."""
        f_s, f_t = align_spatial(f_s, f_t.detach(), "pool")
        return vid_loss(self.regressor(f_s), self.log_scale, f_t, self.eps)


@register_method("vid")
class VID(Method):
    """Variational information distillation at every stage output, summed over ``layers``.

    ``setup`` builds one :class:`VIDHead` per layer (in ``heads``, keyed by tap name); they
    train with the student. ``init_var``: the variance every channel starts at (R's
    ``init_pred_var`` 5); ``eps``: the variance floor (R 1e-5). Default layers ``stage1..3``:
    R's ``feat[1:-1]`` for CIFAR ResNets and WRNs (VGG: ``stage1..4``). Default weight 1: R's
    ``-a 0 -b 1``.
    """

    default_weight = 1.0

    def __init__(
        self,
        weight: float | None = None,
        layers: tuple[str, ...] = ("stage1", "stage2", "stage3"),
        init_var: float = 5.0,
        eps: float = 1e-5,
    ) -> None:
        super().__init__(weight)
        if isinstance(layers, str):
            raise ValueError(f"layers must be a list of tap names, got the string '{layers}'")
        self.layers = tuple(layers)
        if not self.layers:
            raise ValueError("layers must name at least one tap")
        initial_log_scale(init_var, eps)  # checks the values
        self.init_var = float(init_var)
        self.eps = float(eps)
        self.taps = self.layers
        self.heads = nn.ModuleDict()

    def setup(self, student_shapes: Shapes, teacher_shapes: Shapes) -> None:
        """One head per layer, from the channel counts of the (B, C, H, W) taps."""
        self.heads = nn.ModuleDict({
            k: VIDHead(student_shapes[k][1], teacher_shapes[k][1], self.init_var, self.eps)
            for k in self.layers})

    def loss_terms(self, student: Taps, teacher: Taps, batch: Batch) -> dict[str, torch.Tensor]:
        """``{"vid": Σ_layers head(student map, teacher map)}``."""
        assert len(self.heads) == len(self.layers), "setup() builds the heads"
        total = sum(self.heads[k](student[k], teacher[k]) for k in self.layers)
        return {self.name: total}
