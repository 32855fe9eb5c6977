"""``ab``: activation-boundary distillation (Heo et al., AAAI 2019), in RepDistiller's form.

In an initialisation stage, the student's pre-ReLU stage outputs (through a connector where
their shape differs from the teacher's) learn to fall on the same side of zero as the teacher's,
with a margin; then the student trains on its labels alone. Facts from RepDistiller
(R = HobbitLong/RepDistiller): ``ABLoss`` in distiller_zoo/AB.py; ``Connector`` in
models/util.py; train_student.py (``--distill abound``) builds the connector from the shapes of
``feat[1:-1]`` and runs helper/pretrain.py ``init`` for ``--init_epochs`` 30 on the
``preact=True`` features, training the connector and the student's feature modules; the main
stage (helper/loops.py) adds nothing to the cross-entropy (``loss_kd = 0``).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import replace

import torch
from kt_bench.methods.fitnet import build_regressor
from kt_bench.methods.sp import at_least_float32
from torch import nn

from kt_bench.api.method import (
    INIT,
    Batch,
    Method,
    Needs,
    NotApplicable,
    Shapes,
    Taps,
    init_stage,
    register_method,
)

#: R's ABLoss scales each stage's sum by 3/1000 (after dividing by the batch size).
R_SCALE = 3.0 / 1000.0


def ab_loss(source: torch.Tensor, target: torch.Tensor, margin: float = 1.0) -> torch.Tensor:
    """Σ over all elements of (s + m)²·[s > −m ∧ t ≤ 0] + (s − m)²·[s ≤ m ∧ t > 0], with s the
    student's (connected) pre-activation ``source``, t the teacher's ``target`` (detached) and
    m the ``margin`` (R's ``criterion_alternative_l2``; a sum, not a mean).

    Computed in float32 or wider. Zero when every student value lies beyond the margin on the
    teacher's side of zero.
    """
    if source.shape != target.shape:
        raise ValueError(f"ab_loss needs source and target of one shape, got "
                         f"{tuple(source.shape)} and {tuple(target.shape)}")
    s = at_least_float32(source)
    t = target.detach().to(s.dtype)
    on = t > 0
    below = (s + margin).pow(2) * ((s > -margin) & ~on)
    above = (s - margin).pow(2) * ((s <= margin) & on)
    return (below + above).sum()


def stage_weights(n: int) -> list[float]:
    """R's ABLoss weights of ``n`` stages, shallowest first: 2^(i − n + 1), the last one 1."""
    return [2.0 ** (i - n + 1) for i in range(n)]


def build_connector(s_shape: torch.Size, t_shape: torch.Size) -> nn.Module:
    """R's ``Connector`` entry for one stage: the identity where the student's (B, C, H, W)
    map has the teacher's channels and height; else R's ``ConvReg`` without its ReLU (a conv
    with bias sized to map the student's map to the teacher's, then BatchNorm), with children
    ``conv`` and ``bn`` as R names them. Sizes ConvReg cannot map (a student map smaller than
    the teacher's but not half of it, as a ViT's 14x14 against a CNN's 56x56) make AB not
    applicable to the pair: :class:`~kt_bench.api.method.NotApplicable`."""
    if s_shape[1] == t_shape[1] and s_shape[2] == t_shape[2]:
        return nn.Identity()
    try:
        reg = build_regressor("convreg", s_shape, t_shape)
    except ValueError as exc:  # R's ConvReg maps equal, half and double sizes only
        raise NotApplicable(f"ab: its connector (RepDistiller's ConvReg) {exc}".split("; use")[0]
                            ) from None
    return nn.Sequential(OrderedDict(conv=reg.conv, bn=reg.bn))


@register_method("ab")
class AB(Method):
    """Activation-boundary transfer in an initialisation stage, then cross-entropy alone.

    Initialisation stage (``init_epochs``, default R's 30; no labels): the term ``ab`` =
    Σ_i w_i · :func:`ab_loss`(connector_i(student_i), teacher_i) · 3 / (1000 · B) over the
    ``layers`` (default the pre-ReLU stage outputs ``stage1_pre..stage3_pre``, R's
    ``preact=True`` ``feat[1:-1]``; VGG ``stage1_pre..stage4_pre``), w_i = 2^(i − n + 1)
    (R's ABLoss), times ``weight``. Default weight 1: R's init stage sums the ABLoss group
    unweighted (its ``-b 1`` multiplies a main-stage term that is 0). The connectors
    (:func:`build_connector`) and the student's features train, at ``init_lr`` (None: the
    recipe's lr; R: 0.05, the learning rate). Main stage: no term of its own (R's ``loss_kd =
    0``): the cross-entropy alone; the connectors are left alone.

    The whole student trains in the initialisation stage; R trains its ``get_feat_modules()``
    only, which is the whole student but the classifier for CIFAR ResNets and VGG, but leaves
    a WRN's final BN (the one ``stage3_pre`` passes through) in eval mode and untrained.
    """

    default_weight = 1.0
    #: Under bf16 autocast the connectors and the loss run in float32. On the demo, AB was the
    #: one method whose top-1 bf16 lowered beyond its 95% interval (-0.84 [-1.53, -0.14] over
    #: 3 seeds); with an fp32 teacher for both, bf16 terms gave -0.37 [-0.77, +0.03] and
    #: float32 terms +0.09 [-0.71, +0.89] (README, Performance).
    needs = Needs(float32_terms=True)

    def __init__(
        self,
        weight: float | None = None,
        layers: tuple[str, ...] = ("stage1_pre", "stage2_pre", "stage3_pre"),
        margin: float = 1.0,
        init_epochs: int = 30,
        init_lr: float | None = None,
    ) -> None:
        super().__init__(weight)
        self.layers = check_layers(layers, 1)
        if margin < 0:
            raise ValueError(f"margin must be >= 0, got {margin}")
        self.margin = float(margin)
        self.needs = replace(self.needs, taps=self.layers, init=init_stage(init_epochs, init_lr))
        self.connectors = nn.ModuleList()

    def setup(self, student_shapes: Shapes, teacher_shapes: Shapes) -> None:
        """One connector per layer, from the (B, C, H, W) shapes of the taps."""
        self.connectors = nn.ModuleList(
            build_connector(student_shapes[k], teacher_shapes[k]) for k in self.layers)

    def loss_terms(self, student: Taps, teacher: Taps, batch: Batch) -> dict[str, torch.Tensor]:
        """Initialisation stage: ``{"ab": Σ_i w_i · ab_loss_i · 3 / (1000 · B)}``; main: none."""
        if batch.stage != INIT:
            return {}
        assert len(self.connectors) == len(self.layers), "setup() builds the connectors"
        weights = stage_weights(len(self.layers))
        total = 0.0
        for w, k, connect in zip(weights, self.layers, self.connectors, strict=True):
            f_s = student[k]
            total = total + w * ab_loss(connect(f_s), teacher[k], self.margin) / f_s.shape[0]
        return {self.name: total * R_SCALE}

    def term_weights(self, epoch: int, epochs: int) -> dict[str, float]:
        """No term in the main stage."""
        return {}

    def init_term_weights(self, epoch: int, epochs: int) -> dict[str, float]:
        """``weight`` on ``ab`` in every initialisation epoch."""
        return {self.name: self.weight}


def check_layers(layers: tuple[str, ...], at_least: int) -> tuple[str, ...]:
    """``layers`` as a tuple of tap names, at least ``at_least`` of them (else ValueError)."""
    if isinstance(layers, str):
        raise ValueError(f"layers must be a list of tap names, got the string '{layers}'")
    layers = tuple(layers)
    if len(layers) < at_least:
        raise ValueError(f"layers must name at least {at_least} tap(s), got {list(layers)}")
    return layers
