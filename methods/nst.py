"""``nst_linear``, ``nst_poly``, ``nst_gauss``: Neuron Selectivity Transfer (Huang & Wang 2017).

Each channel's spatial activation map (flattened over H·W, L2-normalised) is one sample of the
layer's distribution of neuron selectivity patterns; the loss is the squared Maximum Mean
Discrepancy between the teacher's and the student's samples, per image, averaged over the batch,
and summed over the method's ``layers`` (default: the last feature map only).
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F

from kt_bench.api.align import align_spatial
from kt_bench.api.method import Batch, Method, Taps, register_method

KERNELS = ("linear", "poly", "gaussian")
FORMS = ("auto", "kernel", "gram")


def _kernel_mean(
    x: torch.Tensor, y: torch.Tensor, kernel: str, degree: int, c: float,
    s2: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per sample, the mean of k(x_i, y_j) over all pairs: x (B, N, D), y (B, M, D) -> (B,).

    ``s2``: the Gaussian kernel's bandwidth σ², shape (B, 1, 1) (one per image) or a scalar.
    """
    g = torch.bmm(x, y.transpose(1, 2))
    if kernel == "linear":
        k = g
    elif kernel == "poly":
        k = (g + c).pow(degree)
    else:
        assert s2 is not None, "the Gaussian kernel needs its bandwidth"
        d2 = (x.pow(2).sum(-1)[:, :, None] + y.pow(2).sum(-1)[:, None, :] - 2 * g).clamp_min(0)
        k = torch.exp(-d2 / (2 * s2))
    return k.mean(dim=(1, 2))


def shared_bandwidth(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Per image, the mean squared distance over all ordered pairs of the union of samples.

    ``s`` (B, C_s, D), ``t`` (B, C_t, D) -> σ² of shape (B, 1, 1), detached, at least 1e-12.
    Diagonal pairs included (a V-statistic, like the MMD² itself): with u the C_s + C_t samples,
    mean_ij ‖u_i − u_j‖² = 2·mean_i ‖u_i‖² − 2·‖mean_i u_i‖², i.e. 2·(1 − ‖mean u‖²) for
    unit-norm samples; the general form also covers an all-zero channel (normalised to 0).
    """
    u = torch.cat([t, s], dim=1).detach()
    s2 = 2 * u.pow(2).sum(-1).mean(1) - 2 * u.mean(1).pow(2).sum(-1)
    return s2.clamp_min(1e-12)[:, None, None]


def gaussian_mmd2(
    s: torch.Tensor, t: torch.Tensor, sigma2: float | None = None
) -> torch.Tensor:
    """Per image, MMD² with one Gaussian kernel exp(−‖x−y‖²/(2σ²)) for all three terms: (B,).

    ``sigma2=None``: σ² per image from :func:`shared_bandwidth` (detached). Not clamped: the
    value may fall a rounding error below 0.
    """
    if sigma2 is None:
        s2 = shared_bandwidth(s, t)
    else:
        s2 = torch.as_tensor(float(sigma2), dtype=s.dtype, device=s.device)
    k_tt = _kernel_mean(t, t, "gaussian", 0, 0.0, s2)
    k_ss = _kernel_mean(s, s, "gaussian", 0, 0.0, s2)
    k_st = _kernel_mean(s, t, "gaussian", 0, 0.0, s2)
    return k_tt + k_ss - 2 * k_st


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
    exp(−‖x−y‖²/(2·σ²)) with ONE bandwidth per image shared by the three terms (else it is no
    MMD, and a student whose channels collapse onto one pattern is barely penalised):
    ``sigma2=None`` takes σ² = the mean squared distance over all ordered pairs, diagonal
    included, of the union of the image's teacher and student samples (after alignment),
    detached (:func:`shared_bandwidth`); a number fixes σ² for every image. The Gaussian value
    is clamped at 0 per image (rounding only). Channel counts may differ; maps of
    different spatial size are first aligned by :func:`kt_bench.api.align.align_spatial` (default
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
    if kernel == "gaussian":
        # MMD² with a positive-definite kernel (one bandwidth for all three terms) is >= 0; a
        # negative value is rounding only, so each image's value is clamped at 0.
        return gaussian_mmd2(s, t, sigma2).clamp_min(0).mean()
    k_tt = _kernel_mean(t, t, kernel, degree, c)
    k_ss = _kernel_mean(s, s, kernel, degree, c)
    k_st = _kernel_mean(s, t, kernel, degree, c)
    return (k_tt + k_ss - 2 * k_st).mean()


class _NST(Method):
    """Shared body of the three NST kernels: the layers, the alignment and the loss term.

    The loss term is the SUM of :func:`nst_loss` over ``layers``. Default ``("feat",)``: the NST
    paper's single map, the last one before global pooling (post-activation here, as in the
    public PyTorch ports; ``feat_pre`` gives the authors' pre-activation map,
    TuSimple/neuron-selectivity-transfer). RepDistiller and mdistiller instead sum NST over
    every stage output (RepDistiller ``feat[1:-1]``, mdistiller ``feats[1:]``), which a grid
    gives as ``layers = [...]`` naming the model's stage taps, e.g. ``["stage1", "stage2",
    "stage3"]`` for the CIFAR ResNets and WRNs (VGG has ``stage1``..``stage4``). Default weight 50:
    the authors' NST-poly gradient scale (and RepDistiller's ``-b 50``) on MMD². ``form``: how
    :func:`nst_loss` computes it (``auto``: the cheaper exact form for the shapes).
    """

    kernel: ClassVar[str] = "poly"
    default_weight = 50.0

    def __init__(
        self,
        weight: float | None = None,
        layers: tuple[str, ...] = ("feat",),
        align: str = "pool",
        form: str = "auto",
    ) -> None:
        super().__init__(weight)
        if form not in FORMS:
            raise ValueError(f"unknown NST form '{form}'; accepted: {', '.join(FORMS)}")
        self.form = form
        if isinstance(layers, str):
            raise ValueError(f"layers must be a list of tap names, got the string '{layers}'")
        self.layers = tuple(layers)
        if not self.layers:
            raise ValueError("layers must name at least one tap")
        self.align = align
        self.taps = self.layers

    def kernel_options(self) -> dict:
        """The kernel's own parameters passed to :func:`nst_loss`."""
        return {}

    def loss_terms(self, student: Taps, teacher: Taps, batch: Batch) -> dict[str, torch.Tensor]:
        """``{name: Σ_layers nst_loss}``."""
        opts = self.kernel_options()
        total = sum(nst_loss(student[k], teacher[k], kernel=self.kernel, align=self.align,
                             form=self.form, **opts)
                    for k in self.layers)
        return {self.name: total}


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

    def __init__(
        self,
        weight: float | None = None,
        layers: tuple[str, ...] = ("feat",),
        align: str = "pool",
        degree: int = 2,
        c: float = 0.0,
        form: str = "auto",
    ) -> None:
        super().__init__(weight, layers, align, form)
        self.degree = int(degree)
        self.c = float(c)

    def kernel_options(self) -> dict:
        """``degree`` and ``c``."""
        return {"degree": self.degree, "c": self.c}


@register_method("nst_gauss")
class NSTGauss(_NST):
    """NST with the Gaussian kernel exp(−‖x−y‖²/(2σ²)), one σ² per image for all three terms.

    ``sigma2=None`` (default): per image, σ² is the mean squared distance over all ordered pairs
    (diagonal included) of the union of the teacher's and the student's normalised channel maps,
    detached — one bandwidth shared by k_tt, k_ss and k_st, so the loss is a true MMD² (>= 0).
    A number fixes σ². Weight 50 as for the polynomial kernel: the paper's λ for this kernel is
    *to confirm*.
    """

    kernel = "gaussian"

    def __init__(
        self,
        weight: float | None = None,
        layers: tuple[str, ...] = ("feat",),
        align: str = "pool",
        sigma2: float | None = None,
        form: str = "auto",
    ) -> None:
        super().__init__(weight, layers, align, form)
        self.sigma2 = sigma2

    def kernel_options(self) -> dict:
        """``sigma2``."""
        return {"sigma2": self.sigma2}
