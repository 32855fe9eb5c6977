"""``ofd``: overhaul of feature distillation (Heo et al., ICCV 2019), in mdistiller's form.

Each of the student's pre-ReLU stage outputs goes through a trainable connector (conv + BN) to
the teacher's channel count and is compared with the teacher's pre-ReLU map by a partial L2
distance: where the teacher's value is negative (the ReLU would zero it) the student is only
penalised for exceeding it, and teacher values below a per-channel margin are raised to that
margin. Facts from mdistiller (M = megvii-research/mdistiller), ``mdistiller/distillers/OFD.py``:

* features: ``preact_feats[1:]`` of both networks (every stage's pre-ReLU output); margins from
  the teacher's ``get_bn_before_relu()`` BNs, computed once from their affine weight (as the
  standard deviation, absolute value) and bias (as the mean): E[x | x < 0] for x ~ N(mean,
  std²) where P(x < 0) > 0.001, else −3·std;
* connector (``ConnectorConvBN``): conv k×k (padding (k−1)/2, no bias; weights
  N(0, 2/(k·k·out))) + BN (weight 1, bias 0), student channels -> teacher channels;
* ``feat_loss``: (s−m)²·[s>m ∧ t≤m] + (s−t)²·[s>t ∧ m<t≤0] + (s−t)²·[t>0], averaged over
  the batch, summed over channels and positions; the teacher's map is adaptive-average-pooled
  to the connector output's size; level i of n is divided by 2^(n−1−i) (the deepest counts 1);
* cfg.py: OFD.LOSS.CE_WEIGHT 1, OFD.LOSS.FEAT_WEIGHT 0.001, OFD.CONNECTOR.KERNEL_SIZE 1;
  ``configs/cifar100/ofd.yaml`` (resnet32x4 -> resnet8x4) changes none of them.

M's ``OFD.train`` puts the teacher in training mode too (its BNs normalise with the batch's
statistics): the method declares ``Needs(teacher_mode="batch_statistics")``, and the engine
gives it the maps of a private train-mode copy of the teacher (the cohort's shared teacher
stays in eval mode).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from kt_bench.methods.ab import check_layers
from kt_bench.methods.sp import at_least_float32
from torch import nn

from kt_bench.api.method import (
    TEACHER_BATCH_STATISTICS,
    Batch,
    Method,
    Needs,
    NotApplicable,
    Shapes,
    Taps,
    register_method,
)

#: M's floor on P(x < 0) below which the margin is −3·std.
MIN_NEGATIVE_MASS = 0.001


def ofd_margin(weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Per channel, the margin of a BN's output: E[x | x < 0] for x ~ N(bias, weight²) where
    P(x < 0) > 0.001, else −3·|weight| (M's ``get_margin_from_BN``), in float32. A channel of
    weight 0 (a point mass at ``bias``) gets the limit min(bias, 0)."""
    std = weight.detach().double().abs()
    mean = bias.detach().double()
    safe = torch.where(std > 0, std, torch.ones_like(std))
    z = -mean / safe
    mass = torch.special.ndtr(z)  # P(x < 0)
    density = torch.exp(-0.5 * z * z) / math.sqrt(2.0 * math.pi)
    truncated = mean - safe * density / mass.clamp_min(torch.finfo(torch.float64).tiny)
    margin = torch.where(mass > MIN_NEGATIVE_MASS, truncated, -3.0 * std)
    return torch.where(std > 0, margin, mean.clamp_max(0.0)).float()


def partial_l2(source: torch.Tensor, target: torch.Tensor, margin: torch.Tensor) -> torch.Tensor:
    """M's ``feat_loss``: per element (s−m)² where s > m ≥ t, (s−t)² where s > t > m and
    t ≤ 0, (s−t)² where t > 0 (0 elsewhere); summed over all but the batch dimension and
    averaged over the batch. ``margin`` broadcasts against the maps (e.g. (1, C, 1, 1));
    float32 (or wider, for float64 inputs); the teacher's map is detached."""
    if source.shape != target.shape:
        raise ValueError(f"partial_l2 needs maps of one shape, got {tuple(source.shape)} and "
                         f"{tuple(target.shape)}")
    s = at_least_float32(source)
    t = target.detach().to(s.dtype)
    m = margin.detach().to(device=s.device, dtype=s.dtype)
    below = (s > m) & (t <= m)
    negative = (s > t) & (t > m) & (t <= 0)
    loss = (s - m).pow(2) * below + (s - t).pow(2) * (negative | (t > 0))
    return loss.sum() / s.shape[0]


def ofd_loss(f_s: Sequence[torch.Tensor], f_t: Sequence[torch.Tensor],
             margins: Sequence[torch.Tensor]) -> torch.Tensor:
    """Σ_i partial_l2(f_s[i], f_t[i] pooled to f_s[i]'s size, margins[i]) / 2^(n−1−i) over the
    n levels (``f_s``: the connectors' outputs, shallow to deep)."""
    n = len(f_s)
    if not n or len(f_t) != n or len(margins) != n:
        raise ValueError(f"ofd_loss needs non-empty lists of one length, got {len(f_s)}, "
                         f"{len(f_t)} and {len(margins)}")
    total = 0.0
    for i, (s, t, m) in enumerate(zip(f_s, f_t, margins, strict=True)):
        t = nn.functional.adaptive_avg_pool2d(at_least_float32(t.detach()), tuple(s.shape[-2:]))
        total = total + partial_l2(s, t, m) / 2 ** (n - 1 - i)
    return total


def make_connector(c_s: int, c_t: int, kernel_size: int = 1) -> nn.Sequential:
    """M's connector: conv k×k (padding (k−1)//2, no bias, weights N(0, 2/(k·k·c_t))) then BN
    (weight 1, bias 0), ``c_s`` -> ``c_t`` channels."""
    conv = nn.Conv2d(c_s, c_t, kernel_size, padding=(kernel_size - 1) // 2, bias=False)
    nn.init.normal_(conv.weight, 0.0, math.sqrt(2.0 / (kernel_size * kernel_size * c_t)))
    bn = nn.BatchNorm2d(c_t)
    nn.init.ones_(bn.weight)
    nn.init.zeros_(bn.bias)
    return nn.Sequential(conv, bn)


@register_method("ofd")
class OFD(Method):
    """Partial L2 between connected student and teacher pre-ReLU maps (``<layer>_pre`` for each
    of ``layers``), with margins from the teacher's ``bn_before_relu``.

    ``setup_teacher`` computes the margins (buffers ``margin<i>``, shape (1, C, 1, 1));
    ``setup`` builds one connector per layer (``connectors``), trained with the student.
    Options: ``kernel_size`` of the connectors' conv (M 1); ``layers`` stage1..3 (VGG:
    stage1..4). Default weight 0.001 (M's FEAT_WEIGHT). A teacher without a BN before some
    layer's ReLU (e.g. ShuffleNets, as in M) makes the method not applicable. The teacher's
    maps come with its BatchNorm on the batch's statistics, as M's ``OFD.train`` leaves the
    teacher in train mode (``Needs.teacher_mode``: the engine runs a private copy).
    """

    default_weight = 0.001
    needs = Needs(teacher_mode=TEACHER_BATCH_STATISTICS)

    def __init__(
        self,
        weight: float | None = None,
        kernel_size: int = 1,
        layers: tuple[str, ...] = ("stage1", "stage2", "stage3"),
    ) -> None:
        super().__init__(weight)
        if isinstance(kernel_size, bool) or int(kernel_size) != kernel_size or kernel_size < 1:
            raise ValueError(f"kernel_size must be an integer >= 1, got {kernel_size}")
        self.kernel_size = int(kernel_size)
        self.layers = check_layers(layers, 1)
        self.taps = tuple(f"{k}_pre" for k in self.layers)
        self.connectors = nn.ModuleList()

    def setup_teacher(self, teacher: nn.Module) -> None:
        """The margins of the teacher's BN before each layer's final ReLU."""
        bns = getattr(teacher, "bn_before_relu", {})
        missing = [k for k in self.layers if k not in bns]
        if missing:
            raise NotApplicable(f"ofd needs the BN before the ReLU of {missing} in teacher "
                                f"{type(teacher).__name__}, which names none there")
        modules = dict(teacher.named_modules())
        margins = []
        for k in self.layers:
            bn = modules[bns[k]]
            if not isinstance(bn, nn.BatchNorm2d) or not bn.affine:
                raise NotApplicable(f"ofd: teacher module '{bns[k]}' before {k}'s ReLU is no "
                                    "affine BatchNorm2d")
            margins.append(ofd_margin(bn.weight, bn.bias).view(1, -1, 1, 1))
        # buffers: constants that move with the method and are checkpointed with it
        for i, margin in enumerate(margins):
            self.register_buffer(f"margin{i}", margin)

    @property
    def margins(self) -> list[torch.Tensor]:
        """The margins of the layers, in order (empty before :meth:`setup_teacher`)."""
        return [getattr(self, f"margin{i}") for i in range(len(self.layers))
                if hasattr(self, f"margin{i}")]

    def setup(self, student_shapes: Shapes, teacher_shapes: Shapes) -> None:
        """One connector per layer, student channels -> teacher channels."""
        tap = [f"{k}_pre" for k in self.layers]
        c_t = [int(teacher_shapes[k][1]) for k in tap]
        if len(self.margins) != len(tap) or [m.shape[1] for m in self.margins] != c_t:
            raise ValueError("ofd: setup_teacher() must read the teacher whose taps these are")
        self.connectors = nn.ModuleList(
            make_connector(int(student_shapes[k][1]), c, self.kernel_size)
            for k, c in zip(tap, c_t, strict=True))

    def loss_terms(self, student: Taps, teacher: Taps, batch: Batch) -> dict[str, torch.Tensor]:
        """``{"ofd": ofd_loss(connected student maps, teacher maps, margins)}``."""
        assert len(self.connectors) == len(self.taps), "setup() builds the connectors"
        f_s = [c(student[k]) for c, k in zip(self.connectors, self.taps, strict=True)]
        f_t = [teacher[k] for k in self.taps]
        return {self.name: ofd_loss(f_s, f_t, self.margins)}
