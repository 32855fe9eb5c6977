"""ShuffleNet V2 (1x) for 32x32 inputs, as the CIFAR-100 distillation benchmark trains it.

RepDistiller's ``ShuffleV2`` (R:models/ShuffleNetv2.py, ``net_size=1``): a 1x1 stem to 24
channels (no down-sampling), three stages of one stride-2 down-sampling block followed by
3/7/3 basic blocks (116/232/464 channels), a 1x1 convolution to 1024 channels, global
average pooling, one linear layer. A basic block splits its input in halves, transforms the
second and concatenates; every block ends in a channel shuffle of 2 groups. Submodules carry
RepDistiller's names, so its ``{'model': state_dict}`` checkpoints load without renaming
keys; the weights keep PyTorch's default initialisation, as R's do.

R pools with a fixed 4x4 window (global at 32x32 inputs); here the pooling is adaptive, the
same at 32x32 and usable at other input sizes.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from kt_bench.models.shufflenetv1 import ShuffleBlock
from kt_bench.models.zoo import register_model

STEM_CHANNELS = 24


class SplitBlock(nn.Module):
    """Split the channels into the first ``ratio`` part and the rest."""

    def __init__(self, ratio: float) -> None:
        super().__init__()
        self.ratio = ratio

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        c = int(x.shape[1] * self.ratio)
        return x[:, :c], x[:, c:]


class BasicBlock(nn.Module):
    """Keep half of the channels; 1x1, 3x3 depthwise, 1x1 on the other half; concatenate,
    shuffle. A stage's last block also passes its pre-activation value through ``preact``."""

    def __init__(self, in_channels: int, split_ratio: float = 0.5, is_last: bool = False) -> None:
        super().__init__()
        self.is_last = is_last
        self.split = SplitBlock(split_ratio)
        c = int(in_channels * split_ratio)
        self.conv1 = nn.Conv2d(c, c, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, 1, 1, groups=c, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.conv3 = nn.Conv2d(c, c, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(c)
        self.shuffle = ShuffleBlock(2)
        self.relu = nn.ReLU()
        # a no-op whose output a tap reads: R's preact, [kept half, branch before its ReLU],
        # concatenated but not shuffled
        self.preact = nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        x1, x2 = self.split(x)
        out = self.relu(self.bn1(self.conv1(x2)))
        out = self.bn2(self.conv2(out))
        pre = self.bn3(self.conv3(out))
        if self.is_last:
            self.preact(torch.cat([x1, pre], 1))
        return self.shuffle(torch.cat([x1, self.relu(pre)], 1))


class DownBlock(nn.Module):
    """Two stride-2 branches (3x3 depthwise then 1x1; 1x1, 3x3 depthwise, 1x1), each giving
    half the output channels; concatenate, shuffle."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        mid = out_channels // 2
        # left branch
        self.conv1 = nn.Conv2d(in_channels, in_channels, 3, 2, 1, groups=in_channels,
                               bias=False)
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv2 = nn.Conv2d(in_channels, mid, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        # right branch
        self.conv3 = nn.Conv2d(in_channels, mid, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(mid)
        self.conv4 = nn.Conv2d(mid, mid, 3, 2, 1, groups=mid, bias=False)
        self.bn4 = nn.BatchNorm2d(mid)
        self.conv5 = nn.Conv2d(mid, mid, 1, bias=False)
        self.bn5 = nn.BatchNorm2d(mid)
        self.shuffle = ShuffleBlock(2)
        self.relu = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        left = self.relu(self.bn2(self.conv2(self.bn1(self.conv1(x)))))
        right = self.relu(self.bn3(self.conv3(x)))
        right = self.relu(self.bn5(self.conv5(self.bn4(self.conv4(right)))))
        return self.shuffle(torch.cat([left, right], 1))


class ShuffleNetV2(nn.Module):
    """ShuffleNet V2 with taps ``stage1..3`` (stage outputs, R's f1..f3),
    ``stage1_pre..stage3_pre`` (R's and M's preact list: each stage's last block with its
    branch before the ReLU, unshuffled), ``feat`` / ``feat_pre`` (the 1024-channel map after /
    before its ReLU), ``pool``, ``logits``. ``bn_before_relu`` is empty: R and M do not support
    ShuffleNetV2 as an OFD teacher."""

    def __init__(self, num_classes: int, in_channels: int = 3,
                 out_channels: tuple[int, int, int, int] = (116, 232, 464, 1024),
                 num_blocks: tuple[int, int, int] = (3, 7, 3)) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, STEM_CHANNELS, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(STEM_CHANNELS)
        self.in_channels = STEM_CHANNELS
        self.layer1 = self._make_layer(out_channels[0], num_blocks[0])
        self.layer2 = self._make_layer(out_channels[1], num_blocks[1])
        self.layer3 = self._make_layer(out_channels[2], num_blocks[2])
        self.conv2 = nn.Conv2d(out_channels[2], out_channels[3], 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels[3])
        self.linear = nn.Linear(out_channels[3], num_classes)
        self.relu = nn.ReLU()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.bn_before_relu: dict[str, str] = {}
        # each stage: the down-sampling block, then num_blocks basic blocks
        pre = {f"stage{k}_pre": f"layer{k}.{n}.preact" for k, n in enumerate(num_blocks, 1)}
        self.tap_map = {"stage0": "layer1:input", "stage1": "layer1", "stage2": "layer2",
                        "stage3": "layer3", **pre,
                        "feat": "relu", "feat_pre": "bn2", "pool": "linear:input"}

    def _make_layer(self, out_channels: int, num_blocks: int) -> nn.Sequential:
        blocks: list[nn.Module] = [DownBlock(self.in_channels, out_channels)]
        blocks += [BasicBlock(out_channels, is_last=i == num_blocks - 1)
                   for i in range(num_blocks)]
        self.in_channels = out_channels
        return nn.Sequential(*blocks)

    def forward(self, x: Tensor) -> Tensor:
        # not self.relu: that module's output is the ``feat`` tap
        x = torch.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        x = self.relu(self.bn2(self.conv2(x)))
        return self.linear(self.avgpool(x).flatten(1))


@register_model("shufflev2")
def shufflev2(num_classes: int, in_channels: int = 3) -> nn.Module:
    """ShuffleNet V2 1x (116/232/464 channels, 1024 before pooling) for 32x32 inputs:
    RepDistiller's ShuffleV2."""
    return ShuffleNetV2(num_classes, in_channels)
