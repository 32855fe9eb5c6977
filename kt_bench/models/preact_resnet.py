"""Pre-activation bottleneck ResNets for 32x32 inputs (He et al. 2016, *Identity Mappings*).

Depth 9n+2; stages of n bottleneck blocks (BN-ReLU-conv1x1, BN-ReLU-conv3x3, BN-ReLU-conv1x1)
with 64/128/256 output channels, a 1x1 projection of the activated input where the shape
changes, and a final BN-ReLU before pooling. ``preact_resnet1001`` is the NST paper's CIFAR
teacher (10.2M parameters at 10 classes in the original).
"""

from __future__ import annotations

from torch import nn

from kt_bench.models.zoo import register_model


class PreActBottleneck(nn.Module):
    """A pre-activation bottleneck block with 4x expansion."""

    def __init__(self, in_ch: int, planes: int, stride: int) -> None:
        super().__init__()
        out_ch = planes * 4
        self.bn1, self.relu1 = nn.BatchNorm2d(in_ch), nn.ReLU()
        self.conv1 = nn.Conv2d(in_ch, planes, 1, bias=False)
        self.bn2, self.relu2 = nn.BatchNorm2d(planes), nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn3, self.relu3 = nn.BatchNorm2d(planes), nn.ReLU()
        self.conv3 = nn.Conv2d(planes, out_ch, 1, bias=False)
        self.shortcut = None
        if stride != 1 or in_ch != out_ch:
            self.shortcut = nn.Conv2d(in_ch, out_ch, 1, stride, bias=False)

    def forward(self, x):
        act = self.relu1(self.bn1(x))
        out = self.conv1(act)
        out = self.conv2(self.relu2(self.bn2(out)))
        out = self.conv3(self.relu3(self.bn3(out)))
        return out + (x if self.shortcut is None else self.shortcut(act))


class PreActResNet(nn.Module):
    """Taps ``stage1..3`` (pre-activation stage outputs), ``feat_pre``, ``feat``, ``pool``,
    ``logits``."""

    def __init__(self, depth: int, num_classes: int, in_channels: int = 3, width: float = 1.0):
        super().__init__()
        if (depth - 2) % 9:
            raise ValueError(f"pre-activation bottleneck ResNet depth must be 9n+2, got {depth}")
        n = (depth - 2) // 9
        stem = max(1, round(16 * width))
        self.conv1 = nn.Conv2d(in_channels, stem, 3, 1, 1, bias=False)
        stages, in_ch = [], stem
        for i, planes in enumerate(max(1, round(p * width)) for p in (16, 32, 64)):
            blocks = []
            for b in range(n):
                blocks.append(PreActBottleneck(in_ch, planes, 2 if (i > 0 and b == 0) else 1))
                in_ch = planes * 4
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.bn = nn.BatchNorm2d(in_ch)
        self.relu = nn.ReLU()
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(in_ch, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        self.tap_map = {"stage1": "layer1", "stage2": "layer2", "stage3": "layer3",
                        "feat_pre": "bn", "feat": "relu", "pool": "pool"}

    def forward(self, x):
        x = self.layer3(self.layer2(self.layer1(self.conv1(x))))
        return self.fc(self.pool(self.relu(self.bn(x))))


def _register(depth: int) -> None:
    def build(num_classes: int, in_channels: int = 3, width: float = 1.0) -> nn.Module:
        return PreActResNet(depth, num_classes, in_channels, width)

    name = f"preact_resnet{depth}"
    build.__doc__ = f"Pre-activation bottleneck ResNet-{depth} for 32x32 inputs."
    build.__qualname__ = name
    register_model(name)(build)


for _depth in (11, 164, 1001):
    _register(_depth)
