"""What a method transferred: how closely a trained student follows its teacher.

Pure functions on tensors, each with a per-batch form whose sums add up over batches and
processes: top-1 agreement, KL(p_teacher ‖ p_student), the student's expected calibration
error, linear CKA between two sets of feature maps, and NST's polynomial-kernel MMD² between
them. :func:`stage_taps` and :func:`pair_stages` say which teacher map is compared with which
student map.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F

from kt_bench.core.errors import KtBenchError
from kt_bench.methods.nst import NSTPoly, nst_loss

#: Equal-width confidence bins of the expected calibration error (Guo et al. 2017).
ECE_BINS = 15
#: Columns of a flattened map turned into float32 at once while a Gram matrix is built.
GRAM_CHUNK = 16384

_STAGE = re.compile(r"stage([1-9][0-9]*)")


# ---- predictions -----------------------------------------------------------------------------

def agreement_count(logits_t: torch.Tensor, logits_s: torch.Tensor) -> torch.Tensor:
    """How many images (rows) the teacher and the student give the same top-1 class."""
    return (logits_t.argmax(1) == logits_s.argmax(1)).sum()


def top1_agreement(logits_t: torch.Tensor, logits_s: torch.Tensor) -> float:
    """Percent of images whose top-1 class is the same for teacher and student (0-100)."""
    return 100.0 * agreement_count(logits_t, logits_s).item() / logits_t.shape[0]


def kl_per_image(logits_t: torch.Tensor, logits_s: torch.Tensor) -> torch.Tensor:
    """KL(p_t ‖ p_s) = Σ_c p_t,c (log p_t,c − log p_s,c) of each image at temperature 1, in
    nats: (B, classes) logits -> (B,), computed in float32 and clamped at 0 (a value below is
    rounding)."""
    log_t = F.log_softmax(logits_t.float(), dim=1)
    log_s = F.log_softmax(logits_s.float(), dim=1)
    return (log_t.exp() * (log_t - log_s)).sum(1).clamp_min(0)


def kl_teacher_student(logits_t: torch.Tensor, logits_s: torch.Tensor) -> float:
    """Mean over images of KL(p_teacher ‖ p_student) at temperature 1, in nats."""
    return kl_per_image(logits_t, logits_s).mean().item()


def calibration_bins(logits: torch.Tensor, labels: torch.Tensor,
                     bins: int = ECE_BINS) -> torch.Tensor:
    """Per confidence bin, (images, summed confidence, correct predictions): (3, bins), float64.

    Confidence is the top softmax probability; bin b holds confidences in (b/bins, (b+1)/bins]
    (the first bin closed at 0)."""
    probs = F.softmax(logits.float(), dim=1)
    conf, pred = probs.max(1)
    which = (conf * bins).ceil().long().sub(1).clamp(0, bins - 1)
    out = torch.zeros(3, bins, dtype=torch.float64, device=logits.device)
    out[0].index_add_(0, which, torch.ones_like(conf, dtype=torch.float64))
    out[1].index_add_(0, which, conf.double())
    out[2].index_add_(0, which, (pred == labels).double())
    return out


def ece_from_bins(sums: torch.Tensor) -> float:
    """Expected calibration error in percent from :func:`calibration_bins` sums:
    100 · Σ_b |B_b|/n · |acc(B_b) − conf(B_b)| = 100 · Σ_b |correct_b − confidence_b| / n."""
    n = sums[0].sum().item()
    if n == 0:
        raise KtBenchError("the expected calibration error needs at least one image")
    return 100.0 * (sums[2] - sums[1]).abs().sum().item() / n


def expected_calibration_error(logits: torch.Tensor, labels: torch.Tensor,
                               bins: int = ECE_BINS) -> float:
    """The classifier's expected calibration error with ``bins`` equal-width confidence bins,
    in percent (0-100)."""
    return ece_from_bins(calibration_bins(logits, labels, bins))


# ---- representations -------------------------------------------------------------------------

def centred_gram(x: torch.Tensor) -> torch.Tensor:
    """The n×n Gram matrix of the centred features, X_c X_cᵀ, in float64.

    ``x`` is (n, ...): each sample's map is flattened to one vector and the mean vector over
    the n samples subtracted; built over column chunks, so a wide map needs no float32 copy
    of itself."""
    flat = x.reshape(x.shape[0], -1)
    gram = torch.zeros(flat.shape[0], flat.shape[0], dtype=torch.float32, device=x.device)
    for start in range(0, flat.shape[1], GRAM_CHUNK):
        part = flat[:, start:start + GRAM_CHUNK].float()
        part = part - part.mean(0, keepdim=True)
        gram.addmm_(part, part.T)
    return gram.double()


def cka_from_grams(gram_x: torch.Tensor, gram_y: torch.Tensor) -> float:
    """Linear CKA from two centred Gram matrices (:func:`centred_gram`) of the same samples:
    ⟨K, L⟩_F / (‖K‖_F ‖L‖_F), which equals ‖Y_cᵀX_c‖²_F / (‖X_cᵀX_c‖_F ‖Y_cᵀY_c‖_F).
    NaN when either set of features does not vary over the samples."""
    if gram_x.shape != gram_y.shape:
        raise KtBenchError(f"CKA needs the same samples on both sides, got Gram matrices "
                           f"{tuple(gram_x.shape)} and {tuple(gram_y.shape)}")
    norms = gram_x.norm() * gram_y.norm()
    if norms.item() == 0:
        return math.nan
    return ((gram_x * gram_y).sum() / norms).item()


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear centred kernel alignment (Kornblith et al. 2019) between two representations of
    the same n samples, ``x`` (n, ...) and ``y`` (n, ...), each sample's map flattened to one
    vector: ‖Y_cᵀX_c‖²_F / (‖X_cᵀX_c‖_F ‖Y_cᵀY_c‖_F), X_c and Y_c centred over the samples.

    1 for identical maps, unchanged by an orthogonal transform or an isotropic scaling of
    either side; the sizes of the two maps may differ. Computed from n×n Gram matrices."""
    if x.shape[0] != y.shape[0]:
        raise KtBenchError(f"CKA needs the same samples on both sides, got {x.shape[0]} and "
                           f"{y.shape[0]}")
    return cka_from_grams(centred_gram(x), centred_gram(y))


@functools.lru_cache(maxsize=1)
def _nst_poly_defaults() -> tuple[int, float, str, str]:
    method = NSTPoly()
    return method.degree, method.c, method.align, method.form


def nst_poly_mmd2(f_s: torch.Tensor, f_t: torch.Tensor) -> torch.Tensor:
    """NST's polynomial-kernel MMD² between the student's and the teacher's (B, C, H, W) maps,
    mean over the B images, exactly as the method ``nst_poly`` with its defaults computes its
    loss (:func:`kt_bench.methods.nst.nst_loss`: channel maps L2-normalised, kernel
    (xᵀy + c)^degree, maps of different size aligned by ``align_spatial``)."""
    if f_s.dim() != 4 or f_t.dim() != 4:
        raise KtBenchError(f"NST's MMD² needs (B, C, H, W) maps, got {tuple(f_s.shape)} and "
                           f"{tuple(f_t.shape)}")
    degree, c, align, form = _nst_poly_defaults()
    return nst_loss(f_s, f_t, kernel="poly", degree=degree, c=c, align=align, form=form)


# ---- which maps are compared -----------------------------------------------------------------

def stage_taps(tap_map: Mapping[str, str]) -> list[str]:
    """A model's stage taps, shallow to deep: ``stage1``..``stageK`` in the order of K (the
    stem, ``stage0``, is left out); a model without any has its ``feat`` alone, if it has one."""
    stages = sorted((int(m.group(1)), name) for name in tap_map
                    if (m := _STAGE.fullmatch(name)))
    if stages:
        return [name for _, name in stages]
    return ["feat"] if "feat" in tap_map else []


def pair_stages(student: Sequence[str], teacher: Sequence[str]) -> list[tuple[str, str]]:
    """(student tap, teacher tap) for each student stage, shallow to deep.

    Stages pair by order; where the counts differ, student stage i of S (1-based) takes the
    teacher stage at the same relative depth, j = round(i·T/S) of T (halves rounded up,
    at least 1), so the deepest stages always pair and a teacher stage may serve two student
    stages. No pairs where either model has no stage."""
    s_n, t_n = len(student), len(teacher)
    if not s_n or not t_n:
        return []
    return [(name, teacher[max(1, math.floor(i * t_n / s_n + 0.5)) - 1])
            for i, name in enumerate(student, start=1)]
