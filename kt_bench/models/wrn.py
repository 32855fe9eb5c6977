"""Wide residual networks for 32x32 inputs (Zagoruyko & Komodakis 2016): WRN-depth-k.

Pre-activation basic blocks, depth 6n+4, stage widths 16k/32k/64k, a 1x1 convolution on the
shortcut where the shape changes, final BatchNorm + ReLU before pooling; no dropout (as the
CIFAR-100 distillation benchmark trains them).
"""

from __future__ import annotations

from torch import nn

from kt_bench.models.zoo import register_model


class PreActBlock(nn.Module):
    """BN-ReLU-conv3x3-BN-ReLU-conv3x3 plus the (projected) input."""

    def __init__(self, in_ch: int, out_ch: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_ch)
        self.relu1 = nn.ReLU()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.relu2 = nn.ReLU()
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, 1, 1, bias=False)
        self.shortcut = None
        if stride != 1 or in_ch != out_ch:
            self.shortcut = nn.Conv2d(in_ch, out_ch, 1, stride, bias=False)

    def forward(self, x):
        act = self.relu1(self.bn1(x))
        out = self.conv2(self.relu2(self.bn2(self.conv1(act))))
        # a projected shortcut takes the activated input, an identity one the raw input
        return out + (x if self.shortcut is None else self.shortcut(act))


class WideResNet(nn.Module):
    """WRN with taps ``stage1..3`` (the raw stage outputs), ``stage1_pre..stage3_pre`` (those
    outputs through the BN that comes next), ``feat_pre``, ``feat``, ``pool``, ``logits``;
    ``bn_before_relu`` names those BNs."""

    #: How RepDistiller's checkpoints name this family's weights
    #: (kt_bench.training.reference_checkpoints).
    reference_layout = "repdistiller_wrn"

    def __init__(self, depth: int, widen: int, num_classes: int, in_channels: int = 3):
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"WRN depth must be 6n+4, got {depth}")
        n = (depth - 4) // 6
        chans = [16, 16 * widen, 32 * widen, 64 * widen]
        self.conv1 = nn.Conv2d(in_channels, chans[0], 3, 1, 1, bias=False)
        stages = []
        for i in range(3):
            blocks = [PreActBlock(chans[i] if b == 0 else chans[i + 1], chans[i + 1],
                                  (1 if i == 0 else 2) if b == 0 else 1) for b in range(n)]
            stages.append(nn.Sequential(*blocks))
        self.block1, self.block2, self.block3 = stages
        self.bn = nn.BatchNorm2d(chans[3])
        self.relu = nn.ReLU()
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(chans[3], num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        # A stage's pre-activation value (R's and M's preact=True list) is its output passed
        # through the BN that opens the next stage (or the final BN): that BN's output.
        self.bn_before_relu = {"stage1": "block2.0.bn1", "stage2": "block3.0.bn1",
                               "stage3": "bn"}
        self.tap_map = {"stage0": "block1:input", "stage1": "block1", "stage2": "block2",
                        "stage3": "block3", "feat_pre": "bn", "feat": "relu", "pool": "pool",
                        **{f"{stage}_pre": bn for stage, bn in self.bn_before_relu.items()}}

    def forward(self, x):
        x = self.block3(self.block2(self.block1(self.conv1(x))))
        return self.fc(self.pool(self.relu(self.bn(x))))


def _register(depth: int, widen: int) -> None:
    def build(num_classes: int, in_channels: int = 3) -> nn.Module:
        return WideResNet(depth, widen, num_classes, in_channels)

    name = f"wrn_{depth}_{widen}"
    build.__doc__ = f"Wide ResNet WRN-{depth}-{widen} for 32x32 inputs."
    build.__qualname__ = name
    register_model(name)(build)


for _d, _k in ((16, 1), (16, 2), (40, 1), (40, 2), (28, 10)):
    _register(_d, _k)
