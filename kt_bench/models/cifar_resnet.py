"""ResNets for 32x32 inputs (He et al. 2016, section 4.2): depth 6n+2, three stages of n blocks.

Shortcuts that change shape are 1x1 convolutions with BatchNorm (option B), as in the CIFAR-100
distillation benchmark (RepDistiller); ``width`` multiplies every channel count. ``resnet8x4``
and ``resnet32x4`` are that benchmark's 4x-wide variants (stem 32, stages 64/128/256).
"""

from __future__ import annotations

from torch import nn

from kt_bench.models.zoo import register_model


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with BatchNorm and a residual connection; ReLU after the sum."""

    def __init__(self, in_ch: int, out_ch: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.shortcut = nn.Identity()
        if stride != 1 or in_ch != out_ch:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_ch, out_ch, 1, stride, bias=False), nn.BatchNorm2d(out_ch)
            )
        # A module of its own (not in-place) so the pre-activation sum can be tapped.
        self.relu_out = nn.ReLU()

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu_out(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """A CIFAR ResNet with taps ``stage1..3``, ``stage1_pre..stage3_pre``, ``feat``,
    ``feat_pre``, ``pool``, ``logits``; ``bn_before_relu`` names each stage's last ``bn2``."""

    #: How RepDistiller's checkpoints name this family's weights
    #: (kt_bench.training.reference_checkpoints).
    reference_layout = "repdistiller_resnet"

    def __init__(self, blocks: int, num_classes: int, in_channels: int = 3, width: float = 1.0,
                 channels: tuple[int, int, int, int] = (16, 16, 32, 64)):
        super().__init__()
        if blocks < 1 or width <= 0:
            raise ValueError("blocks must be >= 1 and width > 0")
        stem, *chans = [max(1, round(c * width)) for c in channels]
        self.conv1 = nn.Conv2d(in_channels, stem, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(stem)
        self.relu = nn.ReLU()
        stages, in_ch = [], stem
        for i, ch in enumerate(chans):
            layers = []
            for b in range(blocks):
                layers.append(BasicBlock(in_ch, ch, 2 if (i > 0 and b == 0) else 1))
                in_ch = ch
            stages.append(nn.Sequential(*layers))
        self.layer1, self.layer2, self.layer3 = stages
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(in_ch, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        last = blocks - 1
        self.tap_map = {
            "stage0": "layer1:input",
            "stage1": "layer1",
            "stage2": "layer2",
            "stage3": "layer3",
            "feat": "layer3",
            "feat_pre": f"layer3.{last}.relu_out:input",
            "pool": "pool",
        }
        # R's preact=True list: each stage's last residual sum, before its final ReLU
        for k in (1, 2, 3):
            self.tap_map[f"stage{k}_pre"] = f"layer{k}.{last}.relu_out:input"
        # M's get_bn_before_relu: the last block's second BN (its output plus the shortcut
        # feeds the stage's final ReLU)
        self.bn_before_relu = {f"stage{k}": f"layer{k}.{last}.bn2" for k in (1, 2, 3)}

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.pool(x))


def _register(depth: int, channels: tuple[int, int, int, int], suffix: str = "") -> None:
    blocks = (depth - 2) // 6

    def build(num_classes: int, in_channels: int = 3, width: float = 1.0) -> nn.Module:
        return CifarResNet(blocks, num_classes, in_channels, width, channels)

    name = f"resnet{depth}{suffix}"
    build.__doc__ = (f"ResNet-{depth}{suffix} for 32x32 inputs (blocks per stage: {blocks}, "
                     f"channels {'/'.join(map(str, channels))}).")
    build.__qualname__ = name
    register_model(name)(build)


for _depth in (8, 14, 20, 32, 44, 56, 110):
    _register(_depth, (16, 16, 32, 64))
for _depth in (8, 32):
    _register(_depth, (32, 64, 128, 256), "x4")
