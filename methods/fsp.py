"""``fsp``: flow-of-solution-procedure matrices (Yim et al., CVPR 2017), in RepDistiller's form.

In an initialisation stage the student learns to reproduce the teacher's FSP matrices, the
Gram matrices between consecutive feature maps; then it trains on its labels alone. Facts from
RepDistiller (R = HobbitLong/RepDistiller): ``FSP`` in distiller_zoo/FSP.py (it refuses
feature lists of unequal channel counts, which R's README table prints as N/A);
train_student.py (``--distill fsp``) runs helper/pretrain.py ``init`` for ``--init_epochs`` 30
on ``feat[:-1]`` (the stem output f0 and every stage output), training the student's feature
modules; the main stage (helper/loops.py) adds nothing to the cross-entropy (``loss_kd = 0``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import torch
from kt_bench.methods.ab import check_layers
from kt_bench.methods.sp import at_least_float32

from kt_bench.api.align import align_spatial
from kt_bench.api.method import (
    INIT,
    Batch,
    Method,
    NotApplicable,
    Shapes,
    Taps,
    init_stage,
    register_method,
)


def fsp_matrix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(B, C_a, H, W), (B, C_b, H', W') -> (B, C_a, C_b): G[n, i, j] = mean over positions of
    a[n, i] · b[n, j], after the larger map is adaptive-average-pooled to the smaller's size.

    Computed in float32 or wider. (R's ``compute_fsp`` lays the matrix out as (C_b, C_a); the
    loss is the same.)
    """
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"fsp_matrix needs maps of one batch, got batch sizes {a.shape[0]} "
                         f"and {b.shape[0]}")
    a, b = align_spatial(at_least_float32(a), at_least_float32(b), "pool")
    a, b = a.flatten(2), b.flatten(2).to(a.dtype)
    return torch.bmm(a, b.transpose(1, 2)) / a.shape[2]


def fsp_loss(feats_s: Sequence[torch.Tensor], feats_t: Sequence[torch.Tensor]) -> torch.Tensor:
    """Σ over consecutive pairs k of the mean squared difference between the student's and the
    teacher's FSP matrices (:func:`fsp_matrix` of maps k and k+1); the teacher is detached.
    Needs lists of equal length (at least 2) whose maps have equal channel counts."""
    if len(feats_s) != len(feats_t) or len(feats_s) < 2:
        raise ValueError(f"fsp_loss needs two lists of one length >= 2, got {len(feats_s)} "
                         f"and {len(feats_t)}")
    total = 0.0
    for k in range(len(feats_s) - 1):
        g_s = fsp_matrix(feats_s[k], feats_s[k + 1])
        g_t = fsp_matrix(feats_t[k].detach(), feats_t[k + 1].detach())
        if g_s.shape != g_t.shape:
            raise ValueError(f"fsp_loss needs equal channel counts; FSP matrices of pair {k} "
                             f"are {tuple(g_s.shape)} (student) and {tuple(g_t.shape)}")
        total = total + (g_s - g_t.to(g_s.dtype)).pow(2).mean()
    return total


@register_method("fsp")
class FSP(Method):
    """FSP matrices between consecutive ``layers`` in an initialisation stage, then
    cross-entropy alone.

    ``layers`` default ``stage0..stage3``: R's ``feat[:-1]``, the stem output and every stage
    output (VGG: ``stage0..stage4``). Initialisation stage (``init_epochs``, default R's 30; no
    labels): the term ``fsp`` = :func:`fsp_loss` times ``weight``; the student's features
    train, at ``init_lr`` (None: the recipe's lr; R: 0.05, the learning rate). Default weight
    1: R's init stage sums the FSP losses unweighted (its ``-b 50`` multiplies a main-stage term
    that is 0). Main stage: no term (R's ``loss_kd = 0``). A pair whose layers differ in
    channel count raises :class:`~kt_bench.api.method.NotApplicable` in ``setup`` (a row with
    status ``n/a``, as R's table prints N/A). The whole student runs in train mode in the
    initialisation stage (R: its feature modules only, so a WRN's final BN, which FSP does not
    read, keeps its running statistics there).
    """

    default_weight = 1.0

    def __init__(
        self,
        weight: float | None = None,
        layers: tuple[str, ...] = ("stage0", "stage1", "stage2", "stage3"),
        init_epochs: int = 30,
        init_lr: float | None = None,
    ) -> None:
        super().__init__(weight)
        self.layers = check_layers(layers, 2)
        self.needs = replace(self.needs, taps=self.layers, init=init_stage(init_epochs, init_lr))

    def setup(self, student_shapes: Shapes, teacher_shapes: Shapes) -> None:
        """Check that every layer has the teacher's channel count (else NotApplicable)."""
        unequal = [f"{k} ({student_shapes[k][1]} vs {teacher_shapes[k][1]})"
                   for k in self.layers if student_shapes[k][1] != teacher_shapes[k][1]]
        if unequal:
            raise NotApplicable("FSP needs equal student and teacher channel counts; "
                                f"unequal at {', '.join(unequal)} (student vs teacher)")

    def loss_terms(self, student: Taps, teacher: Taps, batch: Batch) -> dict[str, torch.Tensor]:
        """Initialisation stage: ``{"fsp": fsp_loss}``; main stage: none."""
        if batch.stage != INIT:
            return {}
        return {self.name: fsp_loss([student[k] for k in self.layers],
                                    [teacher[k] for k in self.layers])}

    def term_weights(self, epoch: int, epochs: int) -> dict[str, float]:
        """No term in the main stage."""
        return {}

    def init_term_weights(self, epoch: int, epochs: int) -> dict[str, float]:
        """``weight`` on ``fsp`` in every initialisation epoch."""
        return {self.name: self.weight}
