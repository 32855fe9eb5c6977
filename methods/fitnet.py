"""``fitnet``: hints through a trainable regressor (Romero et al. 2015)."""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from kt_bench.methods.kd import kd_loss
from torch import nn

from kt_bench.api.align import align_spatial
from kt_bench.api.method import Batch, Method, Shapes, Taps, register_method


def fitnet_loss(f_s: torch.Tensor, f_t: torch.Tensor) -> torch.Tensor:
    """Mean squared error over all elements; ``f_s`` is the regressor's output."""
    return F.mse_loss(f_s.float(), f_t.detach().float())


#: Accepted values of FitNet's ``regressor`` option.
REGRESSORS = ("conv3x3", "convreg")


def build_regressor(form: str, s_shape: torch.Size, t_shape: torch.Size) -> nn.Sequential:
    """The hint regressor: a conv from the student's (B, C, H, W) map to the teacher's channels,
    then BatchNorm + ReLU.

    ``conv3x3``: 3x3 conv, padding 1, no bias (keeps the student's size; the loss aligns sizes).
    ``convreg``: RepDistiller's ``ConvReg``, whose conv (with bias) maps the student's size to
    the teacher's: a 3x3 stride-2 conv, padding 1, when the student's H is twice the teacher's; a
    4x4 stride-2 transposed conv, padding 1, when it is half; otherwise (student H >= teacher H)
    a conv with kernel (1 + s_H − t_H, 1 + s_W − t_W), no padding — 1x1 for equal sizes; its
    children are named ``conv``, ``bn``, ``relu`` as ConvReg's attributes.
    """
    if form not in REGRESSORS:
        raise ValueError(f"unknown FitNet regressor '{form}'; accepted: {', '.join(REGRESSORS)}")
    _, c_s, h_s, w_s = s_shape
    _, c_t, h_t, w_t = t_shape
    conv: nn.Module
    if form == "conv3x3":
        conv = nn.Conv2d(c_s, c_t, 3, padding=1, bias=False)
    elif h_s == 2 * h_t:
        conv = nn.Conv2d(c_s, c_t, 3, stride=2, padding=1)
    elif 2 * h_s == h_t:
        conv = nn.ConvTranspose2d(c_s, c_t, 4, stride=2, padding=1)
    elif h_s >= h_t and w_s >= w_t:
        conv = nn.Conv2d(c_s, c_t, (1 + h_s - h_t, 1 + w_s - w_t))
    else:
        raise ValueError(f"regressor 'convreg' cannot map a {h_s}x{w_s} student map to a "
                         f"{h_t}x{w_t} teacher map (student smaller, not half); "
                         "use regressor='conv3x3' with align")
    if form == "conv3x3":
        return nn.Sequential(conv, nn.BatchNorm2d(c_t), nn.ReLU())
    # named like ConvReg's attributes, so state-dict keys match RepDistiller's (conv.weight, ...)
    return nn.Sequential(OrderedDict(conv=conv, bn=nn.BatchNorm2d(c_t), relu=nn.ReLU()))


@register_method("fitnet")
class FitNet(Method):
    """The student's hint layer, through a conv regressor, regresses the teacher's guided layer.

    Regressor (``regressor``), trained with the student, then BatchNorm + ReLU: ``conv3x3``
    (default) a 3x3 conv, padding 1, no bias (student channels -> teacher channels), whose
    output is resized to the teacher's map when sizes differ (``align``); ``convreg`` the form
    RepDistiller uses (``ConvReg`` in its ``models/util.py``): a conv with bias that maps the
    student's size to the teacher's itself — 1x1 for equal sizes, 3x3 stride 2 when the
    student's map is twice the teacher's, 4x4 stride-2 transposed conv when half (see
    :func:`build_regressor`).
    Default: the one-stage form of the CIFAR-100 benchmark (RepDistiller ``-b 100``: CE + 100 ·
    hint loss, hint at ``stage2``), with the ``conv3x3`` regressor unless ``regressor =
    "convreg"`` is given for RepDistiller's own. ``hint_epochs > 0`` gives the paper's two
    stages: hint training alone (no labels) for ``hint_epochs`` epochs, then KD (``kd_weight``,
    ``T``).
    """

    default_weight = 100.0

    def __init__(
        self,
        weight: float | None = None,
        tap: str = "stage2",
        hint_epochs: int = 0,
        kd_weight: float = 1.0,
        T: float = 4.0,
        align: str = "interpolate",
        regressor: str = "conv3x3",
    ) -> None:
        super().__init__(weight)
        if hint_epochs < 0:
            raise ValueError(f"hint_epochs must be >= 0, got {hint_epochs}")
        if regressor not in REGRESSORS:
            raise ValueError(
                f"unknown FitNet regressor '{regressor}'; accepted: {', '.join(REGRESSORS)}")
        self.tap = tap
        self.hint_epochs = int(hint_epochs)
        self.kd_weight = float(kd_weight)
        self.T = float(T)
        self.align = align
        self.taps = (tap, "logits") if self.hint_epochs else (tap,)
        #: The ``regressor`` option's value; ``self.regressor`` is the module setup() builds.
        self.regressor_form = regressor
        self.regressor: nn.Module | None = None

    def setup(self, student_shapes: Shapes, teacher_shapes: Shapes) -> None:
        """Build the regressor from the hint and guided layers' (B, C, H, W) shapes."""
        self.regressor = build_regressor(self.regressor_form, student_shapes[self.tap],
                                         teacher_shapes[self.tap])

    def _in_hint_stage(self, epoch: int) -> bool:
        return epoch < self.hint_epochs

    def loss_terms(self, student: Taps, teacher: Taps, batch: Batch) -> dict[str, torch.Tensor]:
        """``{"fitnet": hint loss}``, plus ``"fitnet.kd"`` in the two-stage form."""
        assert self.regressor is not None, "setup() builds the regressor before training"
        hint = self.regressor(student[self.tap])
        hint, guided = align_spatial(hint, teacher[self.tap], self.align)
        terms = {self.name: fitnet_loss(hint, guided)}
        if self.hint_epochs:
            terms[f"{self.name}.kd"] = kd_loss(student["logits"], teacher["logits"], self.T)
        return terms

    def term_weights(self, epoch: int, epochs: int) -> dict[str, float]:
        """One-stage: the hint always. Two-stage: the hint, then KD after ``hint_epochs``."""
        if not self.hint_epochs:
            return {self.name: self.weight}
        hint = self._in_hint_stage(epoch)
        return {self.name: self.weight if hint else 0.0,
                f"{self.name}.kd": 0.0 if hint else self.kd_weight}

    def ce_scale(self, epoch: int, epochs: int) -> float:
        """No labels during the hint stage."""
        return 0.0 if self._in_hint_stage(epoch) else 1.0
