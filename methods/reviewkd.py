"""``reviewkd``: knowledge review (Chen et al., CVPR 2021), in mdistiller's form.

The student's stage outputs and its pooled feature are fused top-down by attention-based fusion
(ABF) modules, deepest first; each fused map is compared with the teacher's pre-ReLU map of the
same level by the hierarchical context loss (HCL). Facts from mdistiller (M =
megvii-research/mdistiller), ``mdistiller/distillers/ReviewKD.py``:

* levels: the student's ``feats[1:]`` (post-activation; ``preact_feats`` with ``STU_PREACT``)
  plus its pooled feature as a 1x1 map, against the teacher's ``preact_feats[1:]`` plus its
  pooled feature (the stem output f0 is dropped: M's ``zip`` with one ABF per level);
* one ABF per level, built from ``IN_CHANNELS`` (student), ``OUT_CHANNELS`` (teacher), ``SHAPES``
  (student sizes) and ``OUT_SHAPES`` (teacher sizes), all with ``min(512, IN_CHANNELS[-1])``
  middle channels; the deepest (pooled) level does not fuse. Here the same numbers come from the
  taps' shapes, so no per-pair configuration is needed;
* ``hcl_loss``: per level, the MSE at full size plus the MSEs of both maps adaptive-average-
  pooled to 4x4, 2x2 and 1x1 (only sizes below the map's height), weighted 1, 1/2, 1/4, 1/8,
  divided by the sum of the weights used; summed over the levels;
* ``loss = CE_WEIGHT·CE + REVIEWKD_WEIGHT·min(epoch / WARMUP_EPOCHS, 1)·hcl`` with M's epochs
  counted from 1; ``mdistiller/engine/cfg.py``: CE_WEIGHT 1, REVIEWKD_WEIGHT 1,
  WARMUP_EPOCHS 20, MAX_MID_CHANNEL 512 (``ReviewKD.__init__`` writes 512 itself), STU_PREACT
  False; ``configs/cifar100/reviewkd.yaml`` (resnet32x4 -> resnet8x4, M's one CIFAR config):
  REVIEWKD_WEIGHT 5.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from kt_bench.methods.ab import check_layers
from kt_bench.methods.dkd import warmup_factor
from kt_bench.methods.sp import at_least_float32
from torch import nn

from kt_bench.api.method import Batch, Method, Shapes, Taps, register_method

#: The pooled sizes of HCL's context levels (M's ``[4, 2, 1]``).
HCL_LEVELS = (4, 2, 1)
#: The tap whose feature is the deepest level (a (B, C) vector used as a 1x1 map).
POOL = "pool"


def hcl_level_loss(f_s: torch.Tensor, f_t: torch.Tensor,
                   levels: Sequence[int] = HCL_LEVELS) -> torch.Tensor:
    """HCL of one pair of (B, C, H, W) maps of one shape: MSE at full size plus, for each
    ``l`` in ``levels`` below H, weight 2^-k times the MSE of both maps adaptive-average-pooled
    to l x l (k counts the levels used), all divided by the total weight. In float32 (or
    wider, for float64 inputs); the teacher's map is detached."""
    if f_s.shape != f_t.shape:
        raise ValueError(f"hcl_loss needs maps of one shape, got {tuple(f_s.shape)} and "
                         f"{tuple(f_t.shape)}")
    s = at_least_float32(f_s)
    t = f_t.detach().to(s.dtype)
    loss, weight, total = F.mse_loss(s, t), 1.0, 1.0
    for size in levels:
        if size >= s.shape[2]:
            continue
        weight /= 2.0
        pooled = F.mse_loss(F.adaptive_avg_pool2d(s, size), F.adaptive_avg_pool2d(t, size))
        loss = loss + weight * pooled
        total += weight
    return loss / total


def hcl_loss(f_s: Sequence[torch.Tensor], f_t: Sequence[torch.Tensor],
             levels: Sequence[int] = HCL_LEVELS) -> torch.Tensor:
    """Σ over paired maps of :func:`hcl_level_loss` (M's ``hcl_loss``); lists of one length."""
    if len(f_s) != len(f_t) or not f_s:
        raise ValueError(f"hcl_loss needs two non-empty lists of one length, got {len(f_s)} "
                         f"and {len(f_t)}")
    return sum(hcl_level_loss(s, t, levels) for s, t in zip(f_s, f_t, strict=True))


class ABF(nn.Module):
    """Attention-based fusion of one level, laid out as M's ``ABF`` (state-dict keys
    ``conv1.0.weight``, ``conv1.1.*`` (BN), ``conv2.0.weight``, ``conv2.1.*``,
    ``att_conv.0.weight``, ``att_conv.0.bias``): a 1x1 conv + BN to ``mid`` channels; where
    ``fuse``, a sigmoid attention (1x1 conv with bias to 2 maps) mixes it with the deeper
    level's residual, nearest-upsampled; the result, nearest-resized to the teacher's size,
    is the next residual and, through a 3x3 conv + BN, the output."""

    def __init__(self, c_in: int, mid: int, c_out: int, fuse: bool) -> None:
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv2d(c_in, mid, 1, bias=False), nn.BatchNorm2d(mid))
        self.conv2 = nn.Sequential(nn.Conv2d(mid, c_out, 3, padding=1, bias=False),
                                   nn.BatchNorm2d(c_out))
        self.att_conv = None
        if fuse:
            self.att_conv = nn.Sequential(nn.Conv2d(2 * mid, 2, 1), nn.Sigmoid())
        # M's initialisation of the two convolutions (the attention conv keeps PyTorch's)
        nn.init.kaiming_uniform_(self.conv1[0].weight, a=1)
        nn.init.kaiming_uniform_(self.conv2[0].weight, a=1)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None,
                out_size: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(output, residual)`` of student map ``x`` given the deeper level's residual
        (None for the deepest level); ``out_size`` is the teacher's (H, W)."""
        x = self.conv1(x)
        if self.att_conv is not None:
            if residual is None:
                raise ValueError("a fusing ABF needs the deeper level's residual")
            residual = F.interpolate(residual, size=tuple(x.shape[-2:]), mode="nearest")
            att = self.att_conv(torch.cat([x, residual], dim=1))
            x = x * att[:, 0:1] + residual * att[:, 1:2]
        if tuple(x.shape[-2:]) != tuple(out_size):
            x = F.interpolate(x, size=tuple(out_size), mode="nearest")
        return self.conv2(x), x


def as_map(f: torch.Tensor) -> torch.Tensor:
    """A (B, C) pooled feature as a (B, C, 1, 1) map; maps unchanged."""
    return f.view(*f.shape, 1, 1) if f.dim() == 2 else f


def _size(shape: torch.Size) -> tuple[int, int]:
    """The (H, W) of a (B, C, H, W) shape, (1, 1) of a (B, C) one."""
    return (int(shape[2]), int(shape[3])) if len(shape) == 4 else (1, 1)


@register_method("reviewkd")
class ReviewKD(Method):
    """ReviewKD on the student's ``layers`` plus ``pool``, against the teacher's pre-ReLU maps
    (``<layer>_pre``) plus ``pool``.

    ``setup`` builds one :class:`ABF` per level (``abfs``, shallow to deep, ``pool`` last) from
    the taps' channel counts and sizes; they train with the student. Options (M's cfg.py
    defaults): ``warmup`` 20 epochs (the weight ramps as (epoch+1)/warmup, epoch 0-based);
    ``stu_preact`` False (True: the student's ``<layer>_pre`` maps); ``max_mid_channel`` 512
    (ABF middle channels: min(this, the student's pooled channels)); ``layers`` stage1..3
    (VGG: stage1..4). Default weight 1 (REVIEWKD_WEIGHT); M's CIFAR config uses 5.
    """

    default_weight = 1.0

    def __init__(
        self,
        weight: float | None = None,
        warmup: int = 20,
        layers: tuple[str, ...] = ("stage1", "stage2", "stage3"),
        stu_preact: bool = False,
        max_mid_channel: int = 512,
    ) -> None:
        super().__init__(weight)
        if isinstance(warmup, bool) or int(warmup) != warmup or warmup < 0:
            raise ValueError(f"warmup must be a whole number of epochs >= 0, got {warmup}")
        if isinstance(max_mid_channel, bool) or int(max_mid_channel) != max_mid_channel \
                or max_mid_channel < 1:
            raise ValueError(f"max_mid_channel must be an integer >= 1, got {max_mid_channel}")
        self.layers = check_layers(layers, 1)
        if POOL in self.layers:
            raise ValueError(f"layers must not name '{POOL}': it is always the deepest level")
        self.warmup, self.stu_preact = int(warmup), bool(stu_preact)
        self.max_mid_channel = int(max_mid_channel)
        suffix = "_pre" if self.stu_preact else ""
        self.student_levels = tuple(f"{k}{suffix}" for k in self.layers) + (POOL,)
        self.teacher_levels = tuple(f"{k}_pre" for k in self.layers) + (POOL,)
        self.taps = tuple(dict.fromkeys(self.student_levels + self.teacher_levels))
        self.abfs = nn.ModuleList()
        self.out_sizes: list[tuple[int, int]] = []

    def setup(self, student_shapes: Shapes, teacher_shapes: Shapes) -> None:
        """One ABF per level: student channels in, teacher channels out, middle channels
        min(max_mid_channel, student pooled channels); all but the deepest fuse."""
        c_in = [int(student_shapes[k][1]) for k in self.student_levels]
        c_out = [int(teacher_shapes[k][1]) for k in self.teacher_levels]
        mid = min(self.max_mid_channel, c_in[-1])
        last = len(c_in) - 1
        self.abfs = nn.ModuleList(ABF(c_in[i], mid, c_out[i], i < last) for i in range(last + 1))
        self.out_sizes = [_size(teacher_shapes[k]) for k in self.teacher_levels]

    def fuse(self, student: Taps) -> list[torch.Tensor]:
        """The ABF outputs of every level, shallow to deep (fused deepest first)."""
        assert len(self.abfs) == len(self.student_levels), "setup() builds the ABFs"
        outputs: list[torch.Tensor] = []
        residual = None
        for i in reversed(range(len(self.abfs))):
            x = as_map(student[self.student_levels[i]])
            out, residual = self.abfs[i](x, residual, self.out_sizes[i])
            outputs.insert(0, out)
        return outputs

    def loss_terms(self, student: Taps, teacher: Taps, batch: Batch) -> dict[str, torch.Tensor]:
        """``{"reviewkd": hcl_loss(fused student levels, teacher levels)}``."""
        targets = [as_map(teacher[k]) for k in self.teacher_levels]
        return {self.name: hcl_loss(self.fuse(student), targets)}

    def term_weights(self, epoch: int, epochs: int) -> dict[str, float]:
        """``weight`` × M's warm-up ramp min((epoch+1)/warmup, 1)."""
        return {self.name: self.weight * warmup_factor(epoch, self.warmup)}
