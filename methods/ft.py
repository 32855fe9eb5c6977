"""``ft``: factor transfer (Kim et al., NeurIPS 2018), in RepDistiller's form.

A paraphraser (a convolutional autoencoder) is first trained, in an initialisation stage, to
reconstruct the teacher's last stage output; its encoder's output is the teacher's factor.
Then a translator maps the student's last stage output to a factor of the same shape, and the
student learns (with its labels) to match the teacher's factor. Facts from RepDistiller
(R = HobbitLong/RepDistiller): ``Paraphraser`` and ``Translator`` in models/util.py
(``k=0.5``; no BatchNorm in the paraphraser, BatchNorm in the translator, LeakyReLU 0.1),
``FactorTransfer`` in distiller_zoo/FT.py (``p1=2``, ``p2=1``); train_student.py (``--distill
factor``) builds both from ``feat[-2]``'s shapes and runs helper/pretrain.py ``init`` for
``--init_epochs`` 30 (``nn.MSELoss`` of the reconstruction, the paraphraser alone trained, the
student in eval mode, lr 0.01 for CIFAR ResNet and WRN students, else the learning rate);
helper/loops.py then adds ``FactorTransfer(translator(feat_s[-2]), paraphraser(feat_t[-2],
is_factor=True))`` with the paraphraser frozen; scripts/run_cifar_distill.sh: ``-a 0 -b 200``.
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F
from kt_bench.methods.sp import at_least_float32
from torch import nn

from kt_bench.api.align import align_spatial
from kt_bench.api.method import INIT, Batch, Method, Shapes, Taps, init_stage, register_method

#: The slope of the paraphraser's and the translator's LeakyReLUs (R's 0.1).
LEAKY_SLOPE = 0.1


def factor_map(factor: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H·W): the channel mean of factor², flattened, L2-normalised per
    sample (R's ``FactorTransfer.factor`` with p1 = 2), in float32 or wider."""
    f = at_least_float32(factor)
    return F.normalize(f.pow(2).mean(dim=1).flatten(1), p=2.0, dim=1, eps=1e-12)


def ft_loss(factor_s: torch.Tensor, factor_t: torch.Tensor) -> torch.Tensor:
    """Mean over batch and positions of |φ(factor_s) − φ(factor_t)|, φ = :func:`factor_map`
    (R's ``FactorTransfer`` with p2 = 1), after the larger map is adaptive-average-pooled to
    the smaller's size; the teacher's factor is detached."""
    if factor_s.shape[0] != factor_t.shape[0]:
        raise ValueError(f"ft_loss needs factors of one batch, got batch sizes "
                         f"{factor_s.shape[0]} and {factor_t.shape[0]}")
    f_s, f_t = align_spatial(factor_s, factor_t.detach(), "pool")
    return (factor_map(f_s) - factor_map(f_t)).abs().mean()


def reconstruction_loss(rec: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error between the paraphraser's reconstruction and the teacher's map
    (detached), in float32 or wider (R's ``nn.MSELoss``)."""
    r = at_least_float32(rec)
    return F.mse_loss(r, target.detach().to(r.dtype))


def factor_channels(c_t: int, rate: float) -> int:
    """The factor's channel count: ⌊c_t · rate⌋ (R's ``int(t_shape[1] * k)``), at least 1."""
    n = int(c_t * rate)
    if n < 1:
        raise ValueError(f"rate {rate} leaves no factor channel of the teacher's {c_t}")
    return n


def _layers(widths: list[tuple[int, int]], transposed: bool, bn: bool) -> nn.Sequential:
    """3x3 stride-1 padding-1 (transposed) convs with bias, each followed by BatchNorm (or
    the identity: R's placeholder, so the state-dict keys match R's) and LeakyReLU 0.1."""
    conv = nn.ConvTranspose2d if transposed else nn.Conv2d
    out: list[nn.Module] = []
    for c_in, c_out in widths:
        out += [conv(c_in, c_out, 3, 1, 1), nn.BatchNorm2d(c_out) if bn else nn.Identity(),
                nn.LeakyReLU(LEAKY_SLOPE)]
    return nn.Sequential(*out)


class Paraphraser(nn.Module):
    """R's ``Paraphraser(t_shape, k=rate, use_bn=False)``: ``encoder`` C → C → F → F (3x3
    convs), ``decoder`` F → F → C → C (3x3 transposed convs), F = :func:`factor_channels`; a
    LeakyReLU 0.1 after every layer, the reconstruction's last one included."""

    def __init__(self, c_t: int, rate: float = 0.5) -> None:
        super().__init__()
        f = factor_channels(c_t, rate)
        self.encoder = _layers([(c_t, c_t), (c_t, f), (f, f)], transposed=False, bn=False)
        self.decoder = _layers([(f, f), (f, c_t), (c_t, c_t)], transposed=True, bn=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(factor, reconstruction) of the teacher's map ``x``."""
        factor = self.encoder(x)
        return factor, self.decoder(factor)


class Translator(nn.Module):
    """R's ``Translator(s_shape, t_shape, k=rate, use_bn=True)``: ``encoder`` C_s → C_s → F →
    F (3x3 convs, each followed by BatchNorm and LeakyReLU 0.1), F from the teacher's C_t."""

    def __init__(self, c_s: int, c_t: int, rate: float = 0.5) -> None:
        super().__init__()
        f = factor_channels(c_t, rate)
        self.encoder = _layers([(c_s, c_s), (c_s, f), (f, f)], transposed=False, bn=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The student's factor of its map ``x``."""
        return self.encoder(x)


@register_method("ft")
class FT(Method):
    """Factor transfer at the last stage output ``tap`` (default ``stage3``, R's
    ``feat[-2]``; VGG ``stage4``).

    Initialisation stage (``init_epochs``, default R's 30; no labels, the student in eval
    mode): the term ``ft.rec`` (weight 1, as R's unweighted ``MSELoss``) trains the
    :class:`Paraphraser` alone to reconstruct the teacher's map, at ``init_lr`` (None: the
    recipe's lr; R uses 0.01 for CIFAR ResNet and WRN students). Main stage: the term ``ft`` =
    :func:`ft_loss`(translator(student map), paraphraser encoder(teacher map)) times
    ``weight`` (default 200: R's ``-b 200``) beside the cross-entropy; the :class:`Translator`
    trains with the student, the paraphraser is frozen. ``rate``: factor channels per teacher
    channel (R's ``k`` 0.5).
    """

    default_weight = 200.0

    def __init__(
        self,
        weight: float | None = None,
        tap: str = "stage3",
        rate: float = 0.5,
        init_epochs: int = 30,
        init_lr: float | None = None,
    ) -> None:
        super().__init__(weight)
        if not 0 < rate:
            raise ValueError(f"rate must be > 0, got {rate}")
        self.tap = tap
        self.rate = float(rate)
        # the paraphraser alone trains in the initialisation stage, the student in eval mode
        self.needs = replace(self.needs, taps=(tap,),
                             init=init_stage(init_epochs, init_lr, trains_student=False))
        self.paraphraser: Paraphraser | None = None
        self.translator: Translator | None = None

    @property
    def rec_name(self) -> str:
        """The initialisation stage's term: the paraphraser's reconstruction loss."""
        return f"{self.name}.rec"

    def setup(self, student_shapes: Shapes, teacher_shapes: Shapes) -> None:
        """Build the paraphraser and the translator from the taps' (B, C, H, W) shapes."""
        c_s, c_t = student_shapes[self.tap][1], teacher_shapes[self.tap][1]
        self.paraphraser = Paraphraser(c_t, self.rate)
        self.translator = Translator(c_s, c_t, self.rate)

    def loss_terms(self, student: Taps, teacher: Taps, batch: Batch) -> dict[str, torch.Tensor]:
        """Initialisation stage: ``{"ft.rec": reconstruction loss}``; main stage: ``{"ft":
        ft_loss}``."""
        assert self.paraphraser is not None, "setup() builds the paraphraser"
        f_t = teacher[self.tap].detach()
        if batch.stage == INIT:
            _, rec = self.paraphraser(f_t)
            return {self.rec_name: reconstruction_loss(rec, f_t)}
        with torch.no_grad():  # frozen after its stage: no gradient, no weight decay
            factor_t = self.paraphraser.encoder(f_t)
        return {self.name: ft_loss(self.translator(student[self.tap]), factor_t)}

    def init_term_weights(self, epoch: int, epochs: int) -> dict[str, float]:
        """Weight 1 on the reconstruction (R's unweighted ``MSELoss``)."""
        return {self.rec_name: 1.0}
