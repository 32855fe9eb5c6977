"""ShuffleNet (v1) for 32x32 inputs, as the CIFAR-100 distillation benchmark trains it.

RepDistiller's ``ShuffleV1`` (R:models/ShuffleNetv1.py): a 1x1 stem to 24 channels (no
down-sampling), three stages of 4/8/4 bottlenecks with 240/480/960 output channels and 3
groups, global average pooling, one linear layer. A stage's first block has stride 2 and
concatenates its branch with a 3x3 average-pooled shortcut; the other blocks add the input.
Submodules carry RepDistiller's names (``conv1``, ``bn1``, ``layerK.i.conv1`` ...,
``linear``), so its ``{'model': state_dict}`` checkpoints load without renaming keys; the
weights keep PyTorch's default initialisation, as R's do.

R pools with a fixed 4x4 window (global at 32x32 inputs); here the pooling is adaptive, the
same at 32x32 and usable at other input sizes.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from kt_bench.models.zoo import register_model

#: Channels of the stem, which the first bottleneck reads with an ungrouped 1x1 convolution.
STEM_CHANNELS = 24


class ShuffleBlock(nn.Module):
    """Channel shuffle: (N, g*c, H, W) -> view as (N, g, c) -> swap -> (N, c*g, H, W)."""

    def __init__(self, groups: int) -> None:
        super().__init__()
        self.groups = groups

    def forward(self, x: Tensor) -> Tensor:
        n, c, h, w = x.shape
        g = self.groups
        # reshape, not view: the engine feeds channels-last tensors
        return x.reshape(n, g, c // g, h, w).transpose(1, 2).reshape(n, c, h, w)


class Bottleneck(nn.Module):
    """Grouped 1x1, shuffle, 3x3 depthwise, grouped 1x1; added to the input (stride 1) or
    concatenated with its 3x3 average pool (stride 2); ReLU at the end."""

    def __init__(self, in_planes: int, out_planes: int, stride: int, groups: int) -> None:
        super().__init__()
        self.stride = stride
        mid = out_planes // 4
        # R: the block reading the 24-channel stem has too few channels to group its first conv
        g = 1 if in_planes == STEM_CHANNELS else groups
        self.conv1 = nn.Conv2d(in_planes, mid, 1, groups=g, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.shuffle1 = ShuffleBlock(g)
        self.conv2 = nn.Conv2d(mid, mid, 3, stride, 1, groups=mid, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(mid, out_planes, 1, groups=groups, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.shortcut = nn.AvgPool2d(3, 2, 1) if stride == 2 else nn.Identity()
        self.relu = nn.ReLU()
        # its own module, so a tap can read its input: the block's pre-activation value
        self.relu_out = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        out = self.shuffle1(self.relu(self.bn1(self.conv1(x))))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        res = self.shortcut(x)
        preact = torch.cat([out, res], 1) if self.stride == 2 else out + res
        return self.relu_out(preact)


class ShuffleNetV1(nn.Module):
    """ShuffleNet with taps ``stage1..3`` (stage outputs, R's f1..f3), ``stage1_pre..stage3_pre``
    (each stage's last block before its final ReLU, R's and M's preact list), ``feat`` /
    ``feat_pre`` (stage 3 after / before that ReLU), ``pool``, ``logits``. ``bn_before_relu``
    is empty: R and M do not support ShuffleNet as an OFD teacher."""

    def __init__(self, num_classes: int, in_channels: int = 3,
                 out_planes: tuple[int, int, int] = (240, 480, 960),
                 num_blocks: tuple[int, int, int] = (4, 8, 4), groups: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, STEM_CHANNELS, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(STEM_CHANNELS)
        self.relu = nn.ReLU()
        self.in_planes = STEM_CHANNELS
        self.layer1 = self._make_layer(out_planes[0], num_blocks[0], groups)
        self.layer2 = self._make_layer(out_planes[1], num_blocks[1], groups)
        self.layer3 = self._make_layer(out_planes[2], num_blocks[2], groups)
        self.linear = nn.Linear(out_planes[2], num_classes)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.bn_before_relu: dict[str, str] = {}
        pre = {f"stage{k}_pre": f"layer{k}.{n - 1}.relu_out:input"
               for k, n in enumerate(num_blocks, 1)}
        self.tap_map = {"stage0": "layer1:input", "stage1": "layer1", "stage2": "layer2",
                        "stage3": "layer3", **pre,
                        "feat": "layer3", "feat_pre": pre["stage3_pre"],
                        "pool": "linear:input"}

    def _make_layer(self, out_planes: int, num_blocks: int, groups: int) -> nn.Sequential:
        blocks = []
        for i in range(num_blocks):
            # the first block concatenates its input, so its branch makes only the difference
            cat_planes = self.in_planes if i == 0 else 0
            blocks.append(Bottleneck(self.in_planes, out_planes - cat_planes,
                                     2 if i == 0 else 1, groups))
            self.in_planes = out_planes
        return nn.Sequential(*blocks)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.linear(self.avgpool(x).flatten(1))


@register_model("shufflev1")
def shufflev1(num_classes: int, in_channels: int = 3) -> nn.Module:
    """ShuffleNet v1 (groups 3, 240/480/960 channels) for 32x32 inputs: RepDistiller's
    ShuffleV1."""
    return ShuffleNetV1(num_classes, in_channels)
