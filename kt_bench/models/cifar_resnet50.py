"""ResNet-50 for 32x32 inputs, the CIFAR-100 distillation benchmark's ``ResNet50`` teacher.

RepDistiller's ``ResNet50`` (R:models/resnetv2.py): the ImageNet ResNet-50's four stages of
3/4/6/3 bottleneck blocks (expansion 4, 256/512/1024/2048 output channels, stride 2 at the
start of stages 2-4) behind a 3x3 stride-1 stem with 64 channels and no max-pooling, so a
32x32 image leaves stage 4 as a 4x4 map; global average pooling, one linear layer. Shortcuts
that change shape are a 1x1 convolution with BatchNorm. Submodules carry RepDistiller's names
(``conv1``, ``bn1``, ``layerK.i.{conv,bn}{1,2,3}``, ``layerK.i.shortcut.{0,1}``, ``linear``),
so its ``{'model': state_dict}`` checkpoints load without renaming keys.
"""

from __future__ import annotations

from torch import Tensor, nn

from kt_bench.models.zoo import register_model

EXPANSION = 4


class Bottleneck(nn.Module):
    """1x1, 3x3 (carrying the stride), 1x1 to 4x the width, each with BatchNorm; the
    (projected) input is added before the final ReLU."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        out_planes = EXPANSION * planes
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out_planes, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != out_planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, out_planes, 1, stride, bias=False),
                nn.BatchNorm2d(out_planes),
            )
        self.relu = nn.ReLU()
        # its own module, so a tap can read its input: the block's pre-activation sum
        self.relu_out = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu_out(out + self.shortcut(x))


class BottleneckResNet(nn.Module):
    """Four-stage bottleneck ResNet with taps ``stage1..4`` (stage outputs, R's f1..f4),
    ``stage1_pre..stage4_pre`` (each stage's last residual sum before its ReLU, R's and M's
    preact list), ``feat`` / ``feat_pre`` (stage 4 after / before that ReLU), ``pool``,
    ``logits``; ``bn_before_relu`` names each stage's last ``bn3``, as M's
    ``get_bn_before_relu``."""

    def __init__(self, num_blocks: tuple[int, int, int, int], num_classes: int,
                 in_channels: int = 3) -> None:
        super().__init__()
        self.in_planes = 64
        self.conv1 = nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU()
        self.layer1 = self._make_layer(64, num_blocks[0], 1)
        self.layer2 = self._make_layer(128, num_blocks[1], 2)
        self.layer3 = self._make_layer(256, num_blocks[2], 2)
        self.layer4 = self._make_layer(512, num_blocks[3], 2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(512 * EXPANSION, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        last = {k: n - 1 for k, n in enumerate(num_blocks, 1)}
        self.bn_before_relu = {f"stage{k}": f"layer{k}.{i}.bn3" for k, i in last.items()}
        pre = {f"stage{k}_pre": f"layer{k}.{i}.relu_out:input" for k, i in last.items()}
        self.tap_map = {"stage0": "layer1:input", **{f"stage{k}": f"layer{k}" for k in last}, **pre,
                        "feat": "layer4", "feat_pre": pre["stage4_pre"], "pool": "linear:input"}

    def _make_layer(self, planes: int, num_blocks: int, stride: int) -> nn.Sequential:
        blocks = []
        for i in range(num_blocks):
            blocks.append(Bottleneck(self.in_planes, planes, stride if i == 0 else 1))
            self.in_planes = planes * EXPANSION
        return nn.Sequential(*blocks)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.linear(self.avgpool(x).flatten(1))


@register_model("resnet50")
def resnet50(num_classes: int, in_channels: int = 3) -> nn.Module:
    """ResNet-50 (bottlenecks 3/4/6/3, 3x3 stem, no max-pool) for 32x32 inputs:
    RepDistiller's ResNet50."""
    return BottleneckResNet((3, 4, 6, 3), num_classes, in_channels)
