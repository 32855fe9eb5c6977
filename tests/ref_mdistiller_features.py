"""An independent re-statement of mdistiller's ReviewKD and OFD training losses, for cross-checks.

mdistiller (M = megvii-research/mdistiller) trains each distiller through its
``forward_train(image, target, epoch=...)``, which returns ``loss_ce`` and ``loss_kd``; the
trainer (M:mdistiller/engine/trainer.py) adds them, counting epochs from 1. This module
re-states both distillers' computation in its own code, using neither kt-bench's taps nor its
method plugins: M's feature dicts are recomputed by walking kt-bench's module objects the way
M's ``forward`` walks its own (identical) layers. Facts and their M paths:

* Feature dicts, M:mdistiller/models/cifar/{resnet,wrn,vgg}.py, each ``(logits, {"feats",
  "preact_feats", "pooled_feat"})``:

  - ResNet: feats [f0, f1, f2, f3] (f0 = ReLU(BN(conv(x))), fk = layer k's output, after its
    last block's ReLU), preact_feats [f0, f1_pre, f2_pre, f3_pre] (each last block's residual
    sum before that ReLU), pooled = 8x8 average pool of f3. ``get_bn_before_relu``: each
    layer's last block's bn2. ``get_stage_channels``: [stem, c1, c2, c3].
  - WRN: feats [conv1(x), block1..3 raw outputs], preact_feats [f0, block2[0].bn1(f1),
    block3[0].bn1(f2), bn1(f3)] (the next BN applied again to the stage output), pooled = 8x8
    average pool of ReLU(bn1(f3)). ``get_bn_before_relu``: those three BNs.
  - VGG-BN (``vgg8``/``vgg13`` are ``vgg8_bn``/``vgg13_bn``, M:mdistiller/models/cifar/
    __init__.py): each block is conv-BN-ReLU triples with the block's last ReLU dropped;
    f0 = ReLU(block0(x)); fk_pre = block k's output on the max-pooled f(k-1) (no pool before
    block4 at 32x32), fk = ReLU(fk_pre); pooled = global average of f4. ``get_bn_before_relu``:
    each of block1..4's last BN; ``get_stage_channels``: each block's last width.

* ReviewKD, M:mdistiller/distillers/ReviewKD.py (see ``m_reviewkd_loss``); defaults
  M:mdistiller/engine/cfg.py (SHAPES = OUT_SHAPES = [1, 8, 16, 32], IN_CHANNELS =
  OUT_CHANNELS = [64, 128, 256, 256], CE_WEIGHT 1, REVIEWKD_WEIGHT 1, WARMUP_EPOCHS 20,
  STU_PREACT False); M:configs/cifar100/reviewkd.yaml (resnet32x4 -> resnet8x4) sets
  REVIEWKD_WEIGHT 5.
* OFD, M:mdistiller/distillers/OFD.py (see ``m_ofd_loss``); cfg.py: OFD.LOSS.CE_WEIGHT 1,
  FEAT_WEIGHT 0.001, CONNECTOR.KERNEL_SIZE 1. ``OFD.train`` overrides the base distiller's
  ``train`` and leaves the teacher in training mode.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from scipy.stats import norm
from torch import Tensor, nn

from kt_bench.models.cifar_resnet import CifarResNet
from kt_bench.models.vgg import VGG
from kt_bench.models.wrn import WideResNet

Feats = dict[str, list[Tensor] | Tensor]

# (SHAPES, OUT_SHAPES, IN_CHANNELS, OUT_CHANNELS) per (teacher, student), as M's REVIEWKD config
# lists them: SHAPES/OUT_SHAPES deepest level (the pooled 1x1) first, channels shallowest
# first. resnet32x4 -> resnet8x4 is M's cfg.py default (the pair of configs/cifar100/
# reviewkd.yaml). M ships no other CIFAR ReviewKD config: the others are what a user of M must
# set for the pair (M's models' stage channels and sizes at 32x32), and agree with the authors'
# ``build_review_kd`` (dvlab-research/ReviewKD, CIFAR-100/model/reviewkd.py: resnet
# [16,32,64,64], wrn in 16r,32r,64r,64r out [32,64,128,128], vgg [128,256,512,512,512] with
# shapes [1,4,4,8,16]).
_RESNET = ([1, 8, 16, 32], [1, 8, 16, 32], [16, 32, 64, 64], [16, 32, 64, 64])
M_REVIEWKD_CONFIGS: dict[tuple[str, str], tuple[list[int], list[int], list[int], list[int]]] = {
    ("resnet32x4", "resnet8x4"): ([1, 8, 16, 32], [1, 8, 16, 32], [64, 128, 256, 256],
                                  [64, 128, 256, 256]),
    ("resnet56", "resnet20"): _RESNET,
    ("resnet110", "resnet20"): _RESNET,
    ("resnet110", "resnet32"): _RESNET,
    ("wrn_40_2", "wrn_16_2"): ([1, 8, 16, 32], [1, 8, 16, 32], [32, 64, 128, 128],
                               [32, 64, 128, 128]),
    ("wrn_40_2", "wrn_40_1"): ([1, 8, 16, 32], [1, 8, 16, 32], [16, 32, 64, 64],
                               [32, 64, 128, 128]),
    ("vgg13", "vgg8"): ([1, 4, 4, 8, 16], [1, 4, 4, 8, 16], [128, 256, 512, 512, 512],
                        [128, 256, 512, 512, 512]),
    ("resnet20", "resnet8"): _RESNET,  # no benchmark pair: a small one for cheap tests
}
#: M's ReviewKD.__init__: ``mid_channel = min(512, in_channels[-1])``.
M_MAX_MID_CHANNEL = 512


# --------------------------------------------------------------------------------------------
# M's feature dicts
# --------------------------------------------------------------------------------------------

def _avg8(x: Tensor) -> Tensor:
    """M's ResNet/WRN ``avg_pool2d(x, 8)``, flattened (global at 32x32 inputs)."""
    assert x.shape[-2:] == (8, 8), "M's CIFAR ResNet/WRN pool an 8x8 map: use 32x32 inputs"
    return F.avg_pool2d(x, 8).reshape(x.shape[0], -1)


def _resnet_block(block: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
    """M's BasicBlock: (ReLU(sum), sum), sum = bn2(conv2(ReLU(bn1(conv1(x))))) + residual."""
    out = block.bn2(block.conv2(F.relu(block.bn1(block.conv1(x)))))
    # M downsamples (1x1 conv + BN) exactly when the stride or the channel count changes
    changes = block.conv1.stride != (1, 1) or block.conv1.in_channels != block.conv1.out_channels
    if changes:
        residual = block.shortcut[1](block.shortcut[0](x))
    else:
        assert isinstance(block.shortcut, nn.Identity), "M's block has no downsample here"
        residual = x
    preact = out + residual
    return F.relu(preact), preact


def _resnet(model: CifarResNet, x: Tensor) -> tuple[Tensor, Feats]:
    f0 = F.relu(model.bn1(model.conv1(x)))
    feats, pre, h = [f0], [f0], f0
    for layer in (model.layer1, model.layer2, model.layer3):
        for block in layer:
            h, preact = _resnet_block(block, h)
        feats.append(h)
        pre.append(preact)
    pooled = _avg8(h)
    return model.fc(pooled), {"feats": feats, "preact_feats": pre, "pooled_feat": pooled}


def _wrn_block(block: nn.Module, x: Tensor) -> Tensor:
    """M's WRN BasicBlock (no dropout): the shortcut adds the raw input when in == out
    channels, else a 1x1 conv of the BN-ReLU'd input."""
    equal = block.conv1.in_channels == block.conv1.out_channels
    act = F.relu(block.bn1(x))
    out = block.conv2(F.relu(block.bn2(block.conv1(act))))
    if equal:
        assert block.shortcut is None, "M's block has no shortcut conv here"
        return x + out
    return block.shortcut(act) + out


def _wrn(model: WideResNet, x: Tensor) -> tuple[Tensor, Feats]:
    f0 = model.conv1(x)
    feats, h = [f0], f0
    for group in (model.block1, model.block2, model.block3):
        for block in group:
            h = _wrn_block(block, h)
        feats.append(h)
    pooled = _avg8(F.relu(model.bn(h)))
    f1, f2, f3 = feats[1:]
    # M recomputes these after the forward pass, with the BNs that open the next stage
    pre = [f0, model.block2[0].bn1(f1), model.block3[0].bn1(f2), model.bn(f3)]
    return model.fc(pooled), {"feats": feats, "preact_feats": pre, "pooled_feat": pooled}


def _vgg_block(block: nn.Sequential, x: Tensor) -> Tensor:
    """conv-BN-ReLU triples with the block's last ReLU left out (M's ``layers[:-1]``)."""
    layers = list(block)
    assert len(layers) % 3 == 0, "a VGG-BN block is (conv, BN, ReLU) triples"
    for i in range(0, len(layers), 3):
        x = layers[i + 1](layers[i](x))
        if i + 3 < len(layers):
            x = F.relu(x)
    return x


def _vgg(model: VGG, x: Tensor) -> tuple[Tensor, Feats]:
    height = x.shape[2]
    f0 = F.relu(_vgg_block(model.block0, x))
    feats, pre, h = [f0], [f0], f0
    for k, block in enumerate((model.block1, model.block2, model.block3, model.block4), 1):
        if k < 4 or height == 64:  # pool0..pool2; pool3 only at 64x64
            h = F.max_pool2d(h, kernel_size=2, stride=2)
        preact = _vgg_block(block, h)
        h = F.relu(preact)
        pre.append(preact)
        feats.append(h)
    pooled = F.adaptive_avg_pool2d(h, 1).reshape(h.shape[0], -1)
    return model.classifier(pooled), {"feats": feats, "preact_feats": pre,
                                       "pooled_feat": pooled}


def mdistiller_feats(model: nn.Module, x: Tensor) -> tuple[Tensor, Feats]:
    """M's ``model(x)`` recomputed on a kt-bench model object: ``(logits, feats)`` with
    ``feats["feats"]``, ``feats["preact_feats"]`` (lists starting with f0) and
    ``feats["pooled_feat"]``. Uses the model's own layers (its train/eval mode applies) but
    none of its ``forward`` methods or hooks."""
    if isinstance(model, CifarResNet):
        return _resnet(model, x)
    if isinstance(model, WideResNet):
        return _wrn(model, x)
    if isinstance(model, VGG):
        return _vgg(model, x)
    raise TypeError(f"no mdistiller feature dict for {type(model).__name__}")


def m_bn_before_relu(model: nn.Module) -> list[nn.BatchNorm2d]:
    """M's ``get_bn_before_relu()`` on a kt-bench model object."""
    if isinstance(model, CifarResNet):
        return [layer[-1].bn2 for layer in (model.layer1, model.layer2, model.layer3)]
    if isinstance(model, WideResNet):
        return [model.block2[0].bn1, model.block3[0].bn1, model.bn]
    if isinstance(model, VGG):
        # M's block ends in its last BN (the ReLU dropped); kt-bench's keeps that ReLU last
        return [block[-2] for block in (model.block1, model.block2, model.block3, model.block4)]
    raise TypeError(f"no get_bn_before_relu for {type(model).__name__}")


def m_stage_channels(model: nn.Module) -> list[int]:
    """M's ``get_stage_channels()`` on a kt-bench model object."""
    if isinstance(model, CifarResNet):
        return [model.conv1.out_channels] + [layer[-1].conv2.out_channels
                                             for layer in (model.layer1, model.layer2,
                                                           model.layer3)]
    if isinstance(model, WideResNet):
        return [model.conv1.out_channels] + [group[-1].conv2.out_channels
                                             for group in (model.block1, model.block2,
                                                           model.block3)]
    if isinstance(model, VGG):
        blocks = (model.block0, model.block1, model.block2, model.block3, model.block4)
        return [block[-3].out_channels for block in blocks]
    raise TypeError(f"no get_stage_channels for {type(model).__name__}")


# --------------------------------------------------------------------------------------------
# ReviewKD
# --------------------------------------------------------------------------------------------

class MABF(nn.Module):
    """M's ``ABF(in_channel, mid_channel, out_channel, fuse)``."""

    def __init__(self, in_channel: int, mid_channel: int, out_channel: int, fuse: bool):
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv2d(in_channel, mid_channel, kernel_size=1, bias=False),
                                   nn.BatchNorm2d(mid_channel))
        self.conv2 = nn.Sequential(
            nn.Conv2d(mid_channel, out_channel, kernel_size=3, stride=1, padding=1, bias=False),
            nn.BatchNorm2d(out_channel))
        self.att_conv = (nn.Sequential(nn.Conv2d(mid_channel * 2, 2, kernel_size=1),
                                       nn.Sigmoid()) if fuse else None)

    def forward(self, x: Tensor, y: Tensor | None = None, shape: int | None = None,
                out_shape: int | None = None) -> tuple[Tensor, Tensor]:
        n, _, h, w = x.shape
        x = self.conv1(x)
        if self.att_conv is not None:
            y = F.interpolate(y, (shape, shape), mode="nearest")
            z = self.att_conv(torch.cat([x, y], dim=1))
            x = x * z[:, 0].view(n, 1, h, w) + y * z[:, 1].view(n, 1, h, w)
        if x.shape[-1] != out_shape:
            x = F.interpolate(x, (out_shape, out_shape), mode="nearest")
        return self.conv2(x), x


def make_m_abfs(in_channels: Sequence[int], out_channels: Sequence[int]) -> nn.ModuleList:
    """M's ``self.abfs``: built shallowest first, fusing all but the last (pooled) level, with
    min(512, in_channels[-1]) middle channels; then reversed (deepest first)."""
    mid = min(M_MAX_MID_CHANNEL, in_channels[-1])
    last = len(in_channels) - 1
    abfs = nn.ModuleList(MABF(c, mid, out_channels[i], i < last)
                         for i, c in enumerate(in_channels))
    return abfs[::-1]


def m_hcl_loss(fstudent: Sequence[Tensor], fteacher: Sequence[Tensor]) -> Tensor:
    """M's ``hcl_loss``."""
    loss_all: Tensor | float = 0.0
    for fs, ft in zip(fstudent, fteacher, strict=False):
        h = fs.shape[2]
        loss = F.mse_loss(fs, ft, reduction="mean")
        cnt, tot = 1.0, 1.0
        for size in (4, 2, 1):
            if size >= h:
                continue
            cnt /= 2.0
            loss = loss + cnt * F.mse_loss(F.adaptive_avg_pool2d(fs, (size, size)),
                                           F.adaptive_avg_pool2d(ft, (size, size)),
                                           reduction="mean")
            tot += cnt
        loss_all = loss_all + loss / tot
    return loss_all


def _as_1x1(v: Tensor) -> Tensor:
    return v.unsqueeze(-1).unsqueeze(-1)


def m_reviewkd_loss(student: nn.Module, teacher: nn.Module, x: Tensor, y: Tensor, epoch: int,
                    abfs: nn.ModuleList, shapes: Sequence[int], out_shapes: Sequence[int],
                    ce_weight: float = 1.0, weight: float = 1.0, warmup: int = 20,
                    stu_preact: bool = False) -> Tensor:
    """M's ReviewKD ``loss_ce + loss_kd`` on ``(x, y)`` in M's ``epoch`` (counted from 1):
    student and ``abfs`` in train mode, the teacher in eval mode under ``no_grad``."""
    student.train()
    abfs.train()
    logits_s, feats_s = mdistiller_feats(student, x)
    teacher.eval()
    with torch.no_grad():
        _, feats_t = mdistiller_feats(teacher, x)
    key = "preact_feats" if stu_preact else "feats"
    levels = (feats_s[key] + [_as_1x1(feats_s["pooled_feat"])])[::-1]
    out, res = abfs[0](levels[0], out_shape=out_shapes[0])
    results = [out]
    for f, abf, shape, out_shape in zip(levels[1:], abfs[1:], shapes[1:], out_shapes[1:],
                                        strict=False):
        out, res = abf(f, res, shape, out_shape)
        results.insert(0, out)
    targets = feats_t["preact_feats"][1:] + [_as_1x1(feats_t["pooled_feat"])]
    loss_ce = ce_weight * F.cross_entropy(logits_s, y)
    loss_kd = weight * min(epoch / warmup, 1.0) * m_hcl_loss(results, targets)
    return loss_ce + loss_kd


# --------------------------------------------------------------------------------------------
# OFD
# --------------------------------------------------------------------------------------------

def m_margins(bns: Sequence[nn.BatchNorm2d]) -> list[Tensor]:
    """M's margins: per BN and channel, with s = |weight|, m = bias, −s·φ(m/s)/Φ(−m/s) + m
    where Φ(−m/s) > 0.001, else −3s; each (1, C, 1, 1) float32."""
    out = []
    for bn in bns:
        values = []
        for s, m in zip(bn.weight.data.tolist(), bn.bias.data.tolist(), strict=True):
            s = abs(s)
            if norm.cdf(-m / s) > 0.001:
                values.append(-s * math.exp(-((m / s) ** 2) / 2) / math.sqrt(2 * math.pi)
                              / norm.cdf(-m / s) + m)
            else:
                values.append(-3 * s)
        out.append(torch.tensor(values, dtype=torch.float32).view(1, -1, 1, 1))
    return out


def make_m_connectors(s_channels: Sequence[int], t_channels: Sequence[int],
                      kernel_size: int = 1) -> nn.ModuleList:
    """M's ``ConnectorConvBN(...).connectors``: conv (no bias) + BN per level."""
    return nn.ModuleList(
        nn.Sequential(nn.Conv2d(s, t, kernel_size=kernel_size, stride=1,
                                padding=(kernel_size - 1) // 2, bias=False),
                      nn.BatchNorm2d(t))
        for s, t in zip(s_channels, t_channels, strict=True))


def m_feat_loss(source: Tensor, target: Tensor, margin: Tensor) -> Tensor:
    """M's OFD ``feat_loss``."""
    loss = ((source - margin) ** 2 * ((source > margin) & (target <= margin)).float()
            + (source - target) ** 2
            * ((source > target) & (target > margin) & (target <= 0)).float()
            + (source - target) ** 2 * (target > 0).float())
    return torch.abs(loss).mean(dim=0).sum()


def _align(*lists: Sequence[Tensor]) -> list[list[Tensor]]:
    """M's ``_align_list``: every list cut to its last ``min length`` entries."""
    n = min(len(items) for items in lists)
    return [list(items[-n:]) for items in lists]


def m_ofd_loss(student: nn.Module, teacher: nn.Module, x: Tensor, y: Tensor,
               connectors: nn.ModuleList, margins: Sequence[Tensor], ce_weight: float = 1.0,
               feat_weight: float = 0.001, teacher_train: bool = True) -> Tensor:
    """M's OFD ``loss_ce + loss_kd`` on ``(x, y)``: student and connectors in train mode; the
    teacher under ``no_grad`` in train mode as M's ``OFD.train`` leaves it (``teacher_train``
    False: in eval mode, as kt-bench runs it). Restores the teacher's mode and BN statistics."""
    student.train()
    connectors.train()
    logits_s, feats_s = mdistiller_feats(student, x)
    state = {k: v.clone() for k, v in teacher.state_dict().items()}
    was_training = teacher.training
    teacher.train(teacher_train)
    try:
        with torch.no_grad():
            _, feats_t = mdistiller_feats(teacher, x)
    finally:
        teacher.load_state_dict(state)
        teacher.train(was_training)
    f_s, f_t = _align(feats_s["preact_feats"][1:], feats_t["preact_feats"][1:])
    f_s = [connectors[i](f) for i, f in enumerate(f_s)]
    n = len(f_s)
    loss_distill: Tensor | float = 0.0
    for i in range(n):
        target = F.adaptive_avg_pool2d(f_t[i], f_s[i].shape[-2:]).detach()
        loss_distill = loss_distill + m_feat_loss(f_s[i], target, margins[i]) / 2 ** (n - i - 1)
    return ce_weight * F.cross_entropy(logits_s, y) + feat_weight * loss_distill
