"""VGG with BatchNorm for 32x32 inputs, as in the CIFAR-100 distillation benchmark.

Five blocks of 3x3 conv-BN-ReLU layers (64, 128, 256, 512, 512 channels), 2x2 max-pooling
after the first three (at 32x32 the fourth pooling is skipped), global average pooling and one
linear classifier.
"""

from __future__ import annotations

from torch import nn

from kt_bench.models.zoo import register_model

CONFIGS = {
    "vgg8": ((64,), (128,), (256,), (512,), (512,)),
    "vgg11": ((64,), (128,), (256, 256), (512, 512), (512, 512)),
    "vgg13": ((64, 64), (128, 128), (256, 256), (512, 512), (512, 512)),
}


class VGG(nn.Module):
    """VGG-BN with taps ``stage1..4`` (block outputs after ReLU), ``stage1_pre..stage4_pre``
    (the same before that ReLU), ``feat``, ``feat_pre``, ``pool``, ``logits``;
    ``bn_before_relu`` names each block's last BN."""

    #: How RepDistiller's checkpoints name this family's weights
    #: (kt_bench.training.reference_checkpoints).
    reference_layout = "repdistiller_vgg"

    def __init__(self, config, num_classes: int, in_channels: int = 3):
        super().__init__()
        blocks, in_ch = [], in_channels
        for widths in config:
            layers = []
            for w in widths:
                layers += [nn.Conv2d(in_ch, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU()]
                in_ch = w
            blocks.append(nn.Sequential(*layers))
        self.block0, self.block1, self.block2, self.block3, self.block4 = blocks
        self.down = nn.ModuleList(nn.MaxPool2d(2) for _ in range(3))
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.classifier = nn.Linear(in_ch, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)
        # each block is (conv, BN, ReLU) triples: its last BN sits just before its last ReLU
        self.bn_before_relu = {f"stage{k}": f"block{k}.{len(config[k]) * 3 - 2}"
                               for k in (1, 2, 3, 4)}
        self.tap_map = {"stage0": "block0", "stage1": "block1", "stage2": "block2",
                        "stage3": "block3", "stage4": "block4", "feat": "block4",
                        "feat_pre": f"block4.{len(config[4]) * 3 - 1}:input", "pool": "pool",
                        **{f"{stage}_pre": bn for stage, bn in self.bn_before_relu.items()}}

    def forward(self, x):
        x = self.down[0](self.block0(x))
        x = self.down[1](self.block1(x))
        x = self.down[2](self.block2(x))
        x = self.block4(self.block3(x))
        return self.classifier(self.pool(x))


def _register(name: str) -> None:
    def build(num_classes: int, in_channels: int = 3) -> nn.Module:
        return VGG(CONFIGS[name], num_classes, in_channels)

    build.__doc__ = f"{name.upper()} with BatchNorm for 32x32 inputs."
    build.__qualname__ = name
    register_model(name)(build)


for _name in CONFIGS:
    _register(_name)
