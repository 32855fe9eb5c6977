"""MobileNetV2 for 32x32 inputs, as the CIFAR-100 distillation benchmark trains it.

RepDistiller's ``mobile_half`` (R:models/mobilenetv2.py): a 3x3 stride-2 stem, seven groups of
inverted residual blocks (expansion 6, width multiplier 0.5, so 8/12/16/32/48/80/160 channels),
a 1x1 convolution to 1280 channels, global average pooling and one linear layer. Submodules
carry RepDistiller's names (``conv1``, ``blocks.i.j.conv.k``, ``conv2``, ``classifier.0``), so
its ``{'model': state_dict}`` checkpoints load without renaming keys.

R pools with a fixed 2x2 window (global at 32x32 inputs); here the pooling is adaptive, which
gives the same numbers at 32x32 and also works at other input sizes. ReLUs are not in-place,
so a tap on a BatchNorm output keeps the value before its activation.
"""

from __future__ import annotations

from torch import Tensor, nn

from kt_bench.models.zoo import register_model

#: (expansion, channels, blocks, first stride) of each block group; ``None`` stands for the
#: model's expansion ratio (R's ``T``), which the first group does not use.
SETTING: tuple[tuple[int | None, int, int, int], ...] = (
    (1, 16, 1, 1), (None, 24, 2, 1), (None, 32, 3, 2), (None, 64, 4, 2),
    (None, 96, 3, 1), (None, 160, 3, 2), (None, 320, 1, 1),
)

#: The block groups whose outputs R returns as f1..f4 (``feat[1:-1]``).
STAGE_GROUPS = (1, 2, 4, 6)


def conv_bn_relu(in_ch: int, out_ch: int, kernel: int, stride: int) -> nn.Sequential:
    """Convolution (no bias), BatchNorm, ReLU: R's ``conv_bn`` (3x3) and ``conv_1x1_bn``."""
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, kernel, stride, kernel // 2, bias=False),
        nn.BatchNorm2d(out_ch),
        nn.ReLU(),
    )


class InvertedResidual(nn.Module):
    """1x1 expansion, 3x3 depthwise, linear 1x1 projection; the input is added back when the
    block keeps both the resolution and the channel count."""

    def __init__(self, inp: int, oup: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        hidden = inp * expand_ratio
        self.use_res_connect = stride == 1 and inp == oup
        self.conv = nn.Sequential(
            nn.Conv2d(inp, hidden, 1, 1, 0, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(),
            nn.Conv2d(hidden, oup, 1, 1, 0, bias=False),
            nn.BatchNorm2d(oup),
        )

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv(x)
        return x + out if self.use_res_connect else out


class MobileNetV2(nn.Module):
    """MobileNetV2 with taps ``stage1..4`` (outputs of block groups 1, 2, 4, 6: R's f1..f4),
    ``stage1_pre..stage4_pre`` (the same maps: a block ends in a linear projection, so R and
    M return no other pre-activation value), ``feat`` / ``feat_pre`` (the 1280-channel map
    after / before its ReLU), ``pool``, ``logits``; ``bn_before_relu`` names each stage's last
    BatchNorm, as M's ``get_bn_before_relu``."""

    def __init__(self, num_classes: int, in_channels: int = 3, expansion: int = 6,
                 width: float = 0.5) -> None:
        super().__init__()
        in_ch = int(32 * width)
        self.conv1 = conv_bn_relu(in_channels, in_ch, 3, 2)
        self.blocks = nn.ModuleList()
        for t, c, n, s in SETTING:
            out_ch = int(c * width)
            group = []
            for i in range(n):
                group.append(InvertedResidual(in_ch, out_ch, s if i == 0 else 1,
                                              expansion if t is None else t))
                in_ch = out_ch
            self.blocks.append(nn.Sequential(*group))
        self.last_channel = int(1280 * width) if width > 1.0 else 1280
        self.conv2 = conv_bn_relu(in_ch, self.last_channel, 1, 1)
        self.classifier = nn.Sequential(nn.Linear(self.last_channel, num_classes))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self._init_weights()
        self.bn_before_relu = {
            f"stage{k}": f"blocks.{g}.{len(self.blocks[g]) - 1}.conv.7"
            for k, g in enumerate(STAGE_GROUPS, 1)
        }
        stages = {f"stage{k}": f"blocks.{g}" for k, g in enumerate(STAGE_GROUPS, 1)}
        self.tap_map = {"stage0": "blocks.0:input", **stages,
                        **{f"{name}_pre": mod for name, mod in stages.items()},
                        "feat": "conv2", "feat_pre": "conv2.1", "pool": "classifier:input"}

    def _init_weights(self) -> None:
        # R: conv weights N(0, 2/(k*k*out_channels)) (He, fan-out), BN 1/0, linear N(0, 0.01)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv1(x)
        for group in self.blocks:
            x = group(x)
        x = self.avgpool(self.conv2(x)).flatten(1)
        return self.classifier(x)


@register_model("mobilenetv2")
def mobilenetv2(num_classes: int, in_channels: int = 3) -> nn.Module:
    """MobileNetV2 (expansion 6, width 0.5) for 32x32 inputs: RepDistiller's mobile_half."""
    return MobileNetV2(num_classes, in_channels)
