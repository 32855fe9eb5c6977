"""Pre-activation taps (``stage<k>_pre``) and ``bn_before_relu`` of the CIFAR ResNet, WRN and
VGG, checked against an independent re-statement of RepDistiller's ``preact=True`` feature
lists and mdistiller's ``get_bn_before_relu()``.

Facts (R = HobbitLong/RepDistiller, M = megvii-research/mdistiller):

* R:models/resnet.py and M:mdistiller/models/cifar/resnet.py: every stage's last BasicBlock
  returns ``preact = bn2(conv2(...)) + residual`` beside ``relu(preact)``; the preact list is
  ``[f0, f1_pre, f2_pre, f3_pre, f4]``. ``get_bn_before_relu`` = ``layer<k>[-1].bn2``.
* R:models/wrn.py and M:mdistiller/models/cifar/wrn.py: ``f1_pre = block2.layer[0].bn1(f1)``,
  ``f2_pre = block3.layer[0].bn1(f2)``, ``f3_pre = bn1(f3)`` (the final BN);
  ``get_bn_before_relu`` = ``[block2.layer[0].bn1, block3.layer[0].bn1, bn1]``.
* R:models/vgg.py and M:mdistiller/models/cifar/vgg.py: each block is conv-BN-ReLU triples
  with the last ReLU dropped, so ``f<k>_pre = block<k>(x)`` is the last BN's output and
  ``f<k> = relu(f<k>_pre)``; ``get_bn_before_relu`` = ``block<k>[-1]`` for k = 1..4 (the BN).

The re-statement walks kt-bench's module objects (conv, BN, linear layers) the way R's forward
walks its identical layers; it uses no tap, no ``forward`` and no hook.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kt_bench.models import build_model
from kt_bench.models.cifar_resnet import CifarResNet
from kt_bench.models.taps import TapRecorder
from kt_bench.models.vgg import VGG
from kt_bench.models.wrn import WideResNet

MODELS = ["resnet20", "resnet8x4", "wrn_16_2", "wrn_40_1", "vgg8", "vgg13"]


def _randomise_bn(model: nn.Module, seed: int = 0) -> None:
    """Non-trivial BN affine parameters and running statistics, so no BN is the identity."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            c = m.num_features
            with torch.no_grad():
                m.weight.copy_(torch.rand(c, generator=g) + 0.5)
                m.bias.copy_(torch.randn(c, generator=g) * 0.3)
                m.running_mean.copy_(torch.randn(c, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(c, generator=g) + 0.5)


# --- R's forward(is_feat=True, preact=True), re-stated -------------------------------------

def _r_resnet_block(block: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
    """(out, preact) of R's BasicBlock; R has a downsample exactly where stride or width
    changes."""
    out = F.relu(block.bn1(block.conv1(x)))
    out = block.bn2(block.conv2(out))
    changes = block.conv1.stride != (1, 1) or block.conv1.in_channels != block.conv1.out_channels
    residual = block.shortcut[1](block.shortcut[0](x)) if changes else x
    pre = out + residual
    return F.relu(pre), pre


def _r_resnet(model: CifarResNet, x: Tensor) -> tuple[list[Tensor], list[Tensor], Tensor]:
    h = F.relu(model.bn1(model.conv1(x)))
    post, pre = [], []
    for layer in (model.layer1, model.layer2, model.layer3):
        for block in layer:
            h, p = _r_resnet_block(block, h)
        post.append(h)
        pre.append(p)
    return post, pre, model.fc(F.avg_pool2d(h, 8).flatten(1))


def _r_wrn_block(block: nn.Module, x: Tensor) -> Tensor:
    act = F.relu(block.bn1(x))
    out = block.conv2(F.relu(block.bn2(block.conv1(act))))
    if block.conv1.in_channels != block.conv1.out_channels:  # R's convShortcut on the act
        return out + block.shortcut(act)
    return out + x


def _r_wrn(model: WideResNet, x: Tensor) -> tuple[list[Tensor], list[Tensor], Tensor]:
    h = model.conv1(x)
    post = []
    for group in (model.block1, model.block2, model.block3):
        for block in group:
            h = _r_wrn_block(block, h)
        post.append(h)
    logits = model.fc(F.avg_pool2d(F.relu(model.bn(h)), 8).flatten(1))
    # R recomputes the BNs on the stage outputs after the forward
    pre = [model.block2[0].bn1(post[0]), model.block3[0].bn1(post[1]), model.bn(post[2])]
    return post, pre, logits


def _r_vgg_block(block: nn.Sequential, x: Tensor) -> Tensor:
    """R's block (conv-BN pairs with a ReLU between them, none after the last BN)."""
    layers = list(block)
    pairs = [(layers[i], layers[i + 1]) for i in range(0, len(layers), 3)]
    for i, (conv, bn) in enumerate(pairs):
        x = bn(conv(x))
        if i < len(pairs) - 1:
            x = F.relu(x)
    return x


def _r_vgg(model: VGG, x: Tensor) -> tuple[list[Tensor], list[Tensor], Tensor]:
    blocks = (model.block0, model.block1, model.block2, model.block3, model.block4)
    h = F.relu(_r_vgg_block(blocks[0], x))
    post, pre = [], []
    for k in (1, 2, 3, 4):
        if k < 4:  # pool0..pool2; pool3 only runs on 64x64 inputs
            h = F.max_pool2d(h, 2, 2)
        p = _r_vgg_block(blocks[k], h)
        h = F.relu(p)
        pre.append(p)
        post.append(h)
    return post, pre, model.classifier(F.adaptive_avg_pool2d(h, 1).flatten(1))


def r_preact(model: nn.Module, x: Tensor) -> tuple[list[Tensor], list[Tensor], Tensor]:
    """(stage outputs f1.., their preact=True versions f1_pre.., logits) as R computes them."""
    if isinstance(model, CifarResNet):
        return _r_resnet(model, x)
    if isinstance(model, WideResNet):
        return _r_wrn(model, x)
    if isinstance(model, VGG):
        return _r_vgg(model, x)
    raise TypeError(type(model).__name__)


def m_bn_before_relu(model: nn.Module) -> list[nn.Module]:
    """M's ``get_bn_before_relu()`` on kt-bench's objects (kt's VGG blocks keep their last
    ReLU, so R's ``block[-1]`` is kt's ``block[-2]``)."""
    if isinstance(model, CifarResNet):
        return [model.layer1[-1].bn2, model.layer2[-1].bn2, model.layer3[-1].bn2]
    if isinstance(model, WideResNet):
        return [model.block2[0].bn1, model.block3[0].bn1, model.bn]
    if isinstance(model, VGG):
        return [model.block1[-2], model.block2[-2], model.block3[-2], model.block4[-2]]
    raise TypeError(type(model).__name__)


def _taps(model: nn.Module, x: Tensor, names: list[str]) -> dict[str, Tensor]:
    rec = TapRecorder(model, model.tap_map, names)
    try:
        return rec.collect(model(x))
    finally:
        rec.remove()


def _stages(model: nn.Module) -> list[str]:
    return [f"stage{k}" for k in range(1, len(m_bn_before_relu(model)) + 1)]


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name", MODELS)
def test_pre_taps_equal_repdistillers_preact_feature_list(name, train):
    torch.manual_seed(0)
    model = build_model(name, num_classes=100)
    _randomise_bn(model)
    model.train(train)
    stages = _stages(model)
    x = torch.randn(4, 3, 32, 32)
    taps = _taps(model, x, [*stages, *(f"{s}_pre" for s in stages)])
    with torch.no_grad():
        post, pre, logits = r_preact(model, x)
    assert len(pre) == len(stages) == (4 if isinstance(model, VGG) else 3)
    # the same forward (R's avg_pool2d(8) and kt's adaptive pool sum in another order)
    scale = float(logits.abs().max())
    torch.testing.assert_close(taps["logits"], logits, rtol=1e-5, atol=1e-6 * scale)
    for k, stage in enumerate(stages):
        torch.testing.assert_close(taps[stage], post[k], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(taps[f"{stage}_pre"], pre[k], rtol=1e-5, atol=1e-5)
        assert (pre[k] < 0).any()  # a pre-activation map, not a ReLU'd one
        assert not torch.allclose(taps[f"{stage}_pre"], taps[stage])


@pytest.mark.parametrize("name", MODELS)
def test_bn_before_relu_names_mdistillers_batchnorms(name):
    model = build_model(name, num_classes=100)
    modules = dict(model.named_modules())
    stages = _stages(model)
    assert list(model.bn_before_relu) == stages
    x = torch.randn(2, 3, 32, 32)
    shapes = {k: v.shape for k, v in _taps(model.eval(), x, stages).items()}
    for stage, expected in zip(stages, m_bn_before_relu(model), strict=True):
        bn = modules[model.bn_before_relu[stage]]
        assert bn is expected
        assert isinstance(bn, nn.BatchNorm2d)
        assert bn.num_features == shapes[stage][1]


def _hook_io(model: nn.Module, names: list[str]) -> tuple[dict, list]:
    """Record (input, output) of the named modules during the next forward."""
    seen: dict[str, tuple[Tensor, Tensor]] = {}
    modules = dict(model.named_modules())

    def hook(name):
        return lambda mod, inputs, output: seen.__setitem__(name, (inputs[0], output))

    handles = [modules[n].register_forward_hook(hook(n)) for n in names]
    return seen, handles


@pytest.mark.parametrize("name", MODELS)
def test_bn_before_relu_feeds_the_stage_activation(name):
    """VGG: ReLU(bn output) is the stage; ResNet: bn output + shortcut is the stage's pre map
    and its ReLU the stage; WRN: the BN reads the stage and gives its pre map."""
    torch.manual_seed(1)
    model = build_model(name, num_classes=100)
    _randomise_bn(model)
    model.eval()
    stages = _stages(model)
    last_blocks = {}
    if isinstance(model, CifarResNet):
        last_blocks = {s: f"layer{k}.{len(model.layer1) - 1}" for k, s in enumerate(stages, 1)}
    bn_names = [model.bn_before_relu[s] for s in stages]
    seen, handles = _hook_io(model, [*bn_names, *last_blocks.values()])
    x = torch.randn(2, 3, 32, 32)
    taps = _taps(model, x, [*stages, *(f"{s}_pre" for s in stages)])
    for h in handles:
        h.remove()
    for stage in stages:
        bn_in, bn_out = seen[model.bn_before_relu[stage]]
        if isinstance(model, VGG):
            torch.testing.assert_close(F.relu(bn_out), taps[stage])
        elif isinstance(model, CifarResNet):
            block = dict(model.named_modules())[last_blocks[stage]]
            residual = block.shortcut(seen[last_blocks[stage]][0])
            torch.testing.assert_close(bn_out + residual, taps[f"{stage}_pre"])
            torch.testing.assert_close(F.relu(taps[f"{stage}_pre"]), taps[stage])
        else:
            torch.testing.assert_close(bn_in, taps[stage])
            torch.testing.assert_close(bn_out, taps[f"{stage}_pre"])
