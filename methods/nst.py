"""``nst_linear``, ``nst_poly``, ``nst_gauss``: Neuron Selectivity Transfer (Huang & Wang 2017).

Each channel's spatial activation map (flattened over H·W, L2-normalised) is one sample of the
layer's distribution of neuron selectivity patterns; the loss is the squared Maximum Mean
Discrepancy between the teacher's and the student's samples, per image, averaged over the batch.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F

from kt_bench.align import align_spatial
from kt_bench.method import Method, Taps, register_method

KERNELS = ("linear", "poly", "gaussian")
FORMS = ("auto", "kernel", "gram")


def _kernel_mean(
    x: torch.Tensor, y: torch.Tensor, kernel: str, degree: int, c: float, sigma2: float | None
) -> torch.Tensor:
    """Per sample, the mean of k(x_i, y_j) over all pairs: x (B, N, D), y (B, M, D) -> (B,)."""
    g = torch.bmm(x, y.transpose(1, 2))
    if kernel == "linear":
        k = g
    elif kernel == "poly":
        k = (g + c).pow(degree)
    else:
        d2 = (x.pow(2).sum(-1)[:, :, None] + y.pow(2).sum(-1)[:, None, :] - 2 * g).clamp_min(0)
        if sigma2 is None:
            s2 = d2.mean(dim=(1, 2), keepdim=True).detach().clamp_min(1e-12)
        else:
            s2 = torch.as_tensor(sigma2, dtype=d2.dtype, device=d2.device)
        k = torch.exp(-d2 / (2 * s2))
    return k.mean(dim=(1, 2))


def _gram_form_applies(kernel: str, degree: int, c: float) -> bool:
    return kernel == "linear" or (kernel == "poly" and degree == 2 and c == 0)


def _gram_is_cheaper(c_s: int, c_t: int, hw: int) -> bool:
    # multiply-adds: kernel form (C_s² + C_t² + C_s·C_t)·HW, Gram form (C_s + C_t)·HW²
    return hw * (c_s + c_t) < c_s * c_s + c_t * c_t + c_s * c_t


def _mmd2_gram(s: torch.Tensor, t: torch.Tensor, kernel: str) -> torch.Tensor:
    """MMD² by the closed forms: linear ‖mean_t − mean_s‖², poly(2, 0) ‖TᵀT/C_t − SᵀS/C_s‖²_F."""
    if kernel == "linear":
        return (t.mean(1) - s.mean(1)).pow(2).sum(1)
    gram_s = torch.bmm(s.transpose(1, 2), s) / s.shape[1]
    gram_t = torch.bmm(t.transpose(1, 2), t) / t.shape[1]
    return (gram_t - gram_s).pow(2).sum(dim=(1, 2))


def selectivity_samples(f: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, C, H·W) in float32, each channel's map L2-normalised."""
    return F.normalize(f.float().flatten(2), dim=2)


def nst_loss(
    f_s: torch.Tensor,
    f_t: torch.Tensor,
    kernel: str = "poly",
    degree: int = 2,
    c: float = 0.0,
    sigma2: float | None = None,
    align: str = "pool",
    form: str = "auto",
) -> torch.Tensor:
    """Squared MMD between the teacher's and the student's selectivity patterns, batch mean.

    MMD² = mean k(t, t') + mean k(s, s') − 2 mean k(s, t) over the C_t teacher and C_s student
    channels of each image. Kernels: ``linear`` xᵀy; ``poly`` (xᵀy + c)^degree; ``gaussian``
    exp(−‖x−y‖²/(2·sigma2)), where ``sigma2=None`` takes, per image and per term, the mean
    squared distance of that term's pairs (detached). Channel counts may differ; maps of
    different spatial size are first aligned by :func:`kt_bench.align.align_spatial` (default
    ``pool``: the larger map is average-pooled to the smaller). Zero when the maps are equal;
    the teacher is detached, so the gradient reaches the student only.

    ``form``: ``kernel`` builds the C×C kernel matrices with batched matrix products; ``gram``
    uses the exact closed forms of the linear and the (degree 2, c 0) polynomial kernel, with
    H·W×H·W Gram matrices; ``auto`` takes the cheaper valid one for these shapes.
    """
    if kernel not in KERNELS:
        raise ValueError(f"unknown NST kernel '{kernel}'; accepted: {', '.join(KERNELS)}")
    if form not in FORMS:
        raise ValueError(f"unknown NST form '{form}'; accepted: {', '.join(FORMS)}")
    f_s, f_t = align_spatial(f_s, f_t.detach(), align)
    s, t = selectivity_samples(f_s), selectivity_samples(f_t)
    gram_ok = _gram_form_applies(kernel, degree, c)
    if form == "gram" and not gram_ok:
        raise ValueError("form='gram' needs the linear or the (degree=2, c=0) polynomial kernel")
    cheaper = kernel == "linear" or _gram_is_cheaper(s.shape[1], t.shape[1], s.shape[2])
    use_gram = form == "gram" or (form == "auto" and gram_ok and cheaper)
    if use_gram:
        return _mmd2_gram(s, t, kernel).mean()
    k_tt = _kernel_mean(t, t, kernel, degree, c, sigma2)
    k_ss = _kernel_mean(s, s, kernel, degree, c, sigma2)
    k_st = _kernel_mean(s, t, kernel, degree, c, sigma2)
    return (k_tt + k_ss - 2 * k_st).mean()


class _NST(Method):
    """Shared body of the three NST kernels: the tap, the alignment and the loss term.

    Tap default ``feat``: the last feature map before global pooling, post-activation, as in the
    public PyTorch ports; ``feat_pre`` gives the authors' pre-activation map
    (TuSimple/neuron-selectivity-transfer). Default weight 50: the authors' NST-poly gradient
    scale (and RepDistiller's ``-b 50``) on MMD².
    """

    kernel: ClassVar[str] = "poly"
    default_weight = 50.0

    def __init__(self, weight: float | None = None, tap: str = "feat", align: str = "pool") -> None:
        super().__init__(weight)
        self.tap = tap
        self.align = align
        self.taps = (tap,)

    def kernel_options(self) -> dict:
        """The kernel's own parameters passed to :func:`nst_loss`."""
        return {}

    def loss_terms(self, student: Taps, teacher: Taps) -> dict[str, torch.Tensor]:
        """``{name: nst_loss}``."""
        loss = nst_loss(student[self.tap], teacher[self.tap], kernel=self.kernel,
                        align=self.align, **self.kernel_options())
        return {self.name: loss}


@register_method("nst_linear")
class NSTLinear(_NST):
    """NST with the linear kernel (matches the mean normalised map; close to AT).

    Weight 50 as for the polynomial kernel: the paper's λ for this kernel is *to confirm*.
    """

    kernel = "linear"


@register_method("nst_poly")
class NSTPoly(_NST):
    """NST with the polynomial kernel (xᵀy + c)^degree; paper: degree 2, c 0; weight 50."""

    kernel = "poly"

    def __init__(self, weight: float | None = None, tap: str = "feat", align: str = "pool",
                 degree: int = 2, c: float = 0.0) -> None:
        super().__init__(weight, tap, align)
        self.degree = int(degree)
        self.c = float(c)

    def kernel_options(self) -> dict:
        """``degree`` and ``c``."""
        return {"degree": self.degree, "c": self.c}


@register_method("nst_gauss")
class NSTGauss(_NST):
    """NST with the Gaussian kernel; ``sigma2=None`` is the mean squared pair distance.

    Weight 50 as for the polynomial kernel: the paper's λ for this kernel is *to confirm*.
    """

    kernel = "gaussian"

    def __init__(self, weight: float | None = None, tap: str = "feat", align: str = "pool",
                 sigma2: float | None = None) -> None:
        super().__init__(weight, tap, align)
        self.sigma2 = sigma2

    def kernel_options(self) -> dict:
        """``sigma2``."""
        return {"sigma2": self.sigma2}
