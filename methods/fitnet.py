"""``fitnet``: hints through a trainable regressor (Romero et al. 2015)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from kt_bench.methods.kd import kd_loss
from torch import nn

from kt_bench.align import align_spatial
from kt_bench.method import Method, Shapes, Taps, register_method


def fitnet_loss(f_s: torch.Tensor, f_t: torch.Tensor) -> torch.Tensor:
    """Mean squared error over all elements; ``f_s`` is the regressor's output."""
    return F.mse_loss(f_s.float(), f_t.detach().float())


@register_method("fitnet")
class FitNet(Method):
    """The student's hint layer, through a conv regressor, regresses the teacher's guided layer.

    Regressor: 3x3 conv (student channels -> teacher channels) + BatchNorm + ReLU, trained with
    the student; its output is resized to the teacher's map when sizes differ (``align``).
    Default: the one-stage form of the CIFAR-100 benchmark (RepDistiller ``-b 100``: CE + 100 ·
    hint loss, hint at ``stage2``). ``hint_epochs > 0`` gives the paper's two stages: hint
    training alone (no labels) for ``hint_epochs`` epochs, then KD (``kd_weight``, ``T``).
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
    ) -> None:
        super().__init__(weight)
        if hint_epochs < 0:
            raise ValueError(f"hint_epochs must be >= 0, got {hint_epochs}")
        self.tap = tap
        self.hint_epochs = int(hint_epochs)
        self.kd_weight = float(kd_weight)
        self.T = float(T)
        self.align = align
        self.taps = (tap, "logits") if self.hint_epochs else (tap,)
        self.regressor: nn.Module | None = None

    def setup(self, student_shapes: Shapes, teacher_shapes: Shapes) -> None:
        """Build the regressor from the hint and guided layers' channel counts."""
        c_s, c_t = student_shapes[self.tap][1], teacher_shapes[self.tap][1]
        self.regressor = nn.Sequential(
            nn.Conv2d(c_s, c_t, 3, padding=1, bias=False), nn.BatchNorm2d(c_t), nn.ReLU()
        )

    def _in_hint_stage(self, epoch: int) -> bool:
        return epoch < self.hint_epochs

    def loss_terms(self, student: Taps, teacher: Taps) -> dict[str, torch.Tensor]:
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
