"""Inception with Batch Normalization (Ioffe & Szegedy 2015): the NST paper's student.

``inception_bn``: the ImageNet network (224x224 inputs; 1024x7x7 before pooling), with the
layer table of MXNet's Inception-BN symbol that the NST authors trained. ``inception_bn_cifar``:
MXNet's 28-layer "small" Inception-BN for CIFAR (3x3 stem of 96, simple 1x1 + 3x3 modules,
conv + max-pool downsampling), the usual Inception-BN adaptation to 32x32 inputs; the paper's
exact CIFAR variant is *to confirm* (see the grid file ``paper-cifar``).

Every convolution is conv-BN; within a module the branches are concatenated and then one ReLU
is applied (equal to a ReLU per branch, as ReLU is elementwise and the max-pool branch already
holds non-negative values), so the pre-activation map of any module can be tapped. The MXNet
convolutions carry a bias before BatchNorm, which is redundant; these have none.
"""

from __future__ import annotations

import torch
from torch import nn

from kt_bench.models.zoo import register_model


def conv_bn(in_ch: int, out_ch: int, k: int, stride: int = 1) -> nn.Sequential:
    """Convolution (padding keeps the size at stride 1) followed by BatchNorm."""
    return nn.Sequential(nn.Conv2d(in_ch, out_ch, k, stride, k // 2, bias=False),
                         nn.BatchNorm2d(out_ch))


class Concat(nn.Module):
    """Branches applied to one input, concatenated on channels, then ReLU (module ``act``)."""

    def __init__(self, *branches: nn.Module, relu_branches: tuple[bool, ...] = ()) -> None:
        super().__init__()
        self.branches = nn.ModuleList(branches)
        self.act = nn.ReLU()

    def forward(self, x):
        return self.act(torch.cat([b(x) for b in self.branches], dim=1))


def _relu_between(*layers: nn.Module) -> nn.Sequential:
    """conv-BN stages with ReLUs between them (the last one's ReLU comes after the concat)."""
    out: list[nn.Module] = []
    for i, layer in enumerate(layers):
        out.append(layer)
        if i < len(layers) - 1:
            out.append(nn.ReLU())
    return nn.Sequential(*out)


def module_a(in_ch: int, c1: int, c3r: int, c3: int, d3r: int, d3: int, pool: str,
             proj: int) -> Concat:
    """A stride-1 module: 1x1 | 1x1-3x3 | 1x1-3x3-3x3 | pool-1x1."""
    pooling = (nn.AvgPool2d(3, 1, 1, count_include_pad=False) if pool == "avg"
               else nn.MaxPool2d(3, 1, 1))
    return Concat(
        conv_bn(in_ch, c1, 1),
        _relu_between(conv_bn(in_ch, c3r, 1), conv_bn(c3r, c3, 3)),
        _relu_between(conv_bn(in_ch, d3r, 1), conv_bn(d3r, d3, 3), conv_bn(d3, d3, 3)),
        nn.Sequential(pooling, conv_bn(in_ch, proj, 1)),
    )


def module_b(in_ch: int, c3r: int, c3: int, d3r: int, d3: int) -> Concat:
    """A stride-2 module: 1x1-3x3/2 | 1x1-3x3-3x3/2 | max-pool/2 (passed through)."""
    return Concat(
        _relu_between(conv_bn(in_ch, c3r, 1), conv_bn(c3r, c3, 3, 2)),
        _relu_between(conv_bn(in_ch, d3r, 1), conv_bn(d3r, d3, 3), conv_bn(d3, d3, 3, 2)),
        nn.MaxPool2d(3, 2, 1),
    )


class _Inception(nn.Module):
    """Shared head: global average pooling and a linear classifier; tap map from the body."""

    def _finish(self, out_ch: int, num_classes: int, taps: dict[str, str]) -> None:
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(out_ch, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
        self.tap_map = {**taps, "pool": "pool"}

    def forward(self, x):
        return self.fc(self.pool(self.body(x)))


class InceptionBN(_Inception):
    """ImageNet Inception-BN; taps ``stage1`` (3c, 28->14), ``stage2`` (4e, 7x7),
    ``stage3``/``feat`` (5b, 1024x7x7), ``feat_pre`` (5b before its ReLU)."""

    def __init__(self, num_classes: int, in_channels: int = 3) -> None:
        super().__init__()
        stem = nn.Sequential(
            conv_bn(in_channels, 64, 7, 2), nn.ReLU(), nn.MaxPool2d(3, 2, ceil_mode=True),
            conv_bn(64, 64, 1), nn.ReLU(), conv_bn(64, 192, 3), nn.ReLU(),
            nn.MaxPool2d(3, 2, ceil_mode=True))
        mods = {
            "in3a": module_a(192, 64, 64, 64, 64, 96, "avg", 32),
            "in3b": module_a(256, 64, 64, 96, 64, 96, "avg", 64),
            "in3c": module_b(320, 128, 160, 64, 96),
            "in4a": module_a(576, 224, 64, 96, 96, 128, "avg", 128),
            "in4b": module_a(576, 192, 96, 128, 96, 128, "avg", 128),
            "in4c": module_a(576, 160, 128, 160, 128, 160, "avg", 128),
            "in4d": module_a(608, 96, 128, 192, 160, 192, "avg", 128),
            "in4e": module_b(608, 128, 192, 192, 256),
            "in5a": module_a(1056, 352, 192, 320, 160, 224, "avg", 128),
            "in5b": module_a(1024, 352, 192, 320, 192, 224, "max", 128),
        }
        self.body = nn.Sequential()
        self.body.add_module("stem", stem)
        for name, mod in mods.items():
            self.body.add_module(name, mod)
        self._finish(1024, num_classes, {
            "stage1": "body.in3c", "stage2": "body.in4e", "stage3": "body.in5b",
            "feat": "body.in5b", "feat_pre": "body.in5b.act:input"})


class InceptionBNCifar(_Inception):
    """CIFAR Inception-BN (28 layers); taps ``stage1`` (3b, 32x32), ``stage2`` (4d, 16x16),
    ``stage3``/``feat`` (5b, 336x8x8), ``feat_pre`` (5b before its ReLU)."""

    def __init__(self, num_classes: int, in_channels: int = 3, width: float = 1.0) -> None:
        super().__init__()

        def w(c: int) -> int:
            return max(1, round(c * width))

        def simple(in_ch: int, c1: int, c3: int) -> Concat:
            return Concat(conv_bn(in_ch, w(c1), 1), conv_bn(in_ch, w(c3), 3))

        def down(in_ch: int, c3: int) -> Concat:
            return Concat(conv_bn(in_ch, w(c3), 3, 2), nn.MaxPool2d(3, 2, 1))

        self.body = nn.Sequential()
        self.body.add_module("stem", nn.Sequential(conv_bn(in_channels, w(96), 3), nn.ReLU()))
        plan = [("in3a", "s", 32, 32), ("in3b", "s", 32, 48), ("in3c", "d", 80, 0),
                ("in4a", "s", 112, 48), ("in4b", "s", 96, 64), ("in4c", "s", 80, 80),
                ("in4d", "s", 48, 96), ("in4e", "d", 96, 0), ("in5a", "s", 176, 160),
                ("in5b", "s", 176, 160)]
        ch = w(96)
        for name, kind, a, b in plan:
            mod = simple(ch, a, b) if kind == "s" else down(ch, a)
            ch = (w(a) + w(b)) if kind == "s" else (w(a) + ch)
            self.body.add_module(name, mod)
        self._finish(ch, num_classes, {
            "stage1": "body.in3b", "stage2": "body.in4d", "stage3": "body.in5b",
            "feat": "body.in5b", "feat_pre": "body.in5b.act:input"})


@register_model("inception_bn")
def inception_bn(num_classes: int, in_channels: int = 3) -> nn.Module:
    """Inception-BN for ImageNet (224x224), the NST paper's ImageNet student."""
    return InceptionBN(num_classes, in_channels)


@register_model("inception_bn_cifar")
def inception_bn_cifar(num_classes: int, in_channels: int = 3, width: float = 1.0) -> nn.Module:
    """Inception-BN (28 layers) for 32x32 inputs, the NST paper's CIFAR student."""
    return InceptionBNCifar(num_classes, in_channels, width)
