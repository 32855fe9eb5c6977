"""The cross-architecture networks of RepDistiller's table: MobileNetV2 (``mobile_half``),
ShuffleV1, ShuffleV2 and its CIFAR ResNet-50, checked against independent re-statements.

Facts, from R = HobbitLong/RepDistiller and M = megvii-research/mdistiller:

* R:models/mobilenetv2.py ``mobile_half`` = MobileNetV2(T=6, width_mult=0.5): stem
  conv_bn(3, 16, stride 2) as ``conv1.{0,1,2}``; groups (t, c, n, s) = (1,16,1,1) (T,24,2,1)
  (T,32,3,2) (T,64,4,2) (T,96,3,1) (T,160,3,2) (T,320,1,1), channels int(c*0.5), each block
  ``conv`` = [1x1 expand, BN, ReLU, 3x3 depthwise (stride), BN, ReLU, 1x1 project, BN] with the
  input added when stride 1 and channels equal; ``conv2`` = 1x1 to 1280 + BN + ReLU (1280
  because width <= 1); AvgPool2d(32 // 16 = 2, ceil_mode) ; ``classifier.0`` Linear(1280, n).
  f1..f4 = outputs of groups 1, 2, 4, 6; ``preact`` is ignored (same list); M's
  get_bn_before_relu = blocks[1|2|4|6][-1].conv[-1]. Init: conv N(0, 2/(k*k*out)), linear
  N(0, 0.01).
* R:models/ShuffleNetv1.py ``ShuffleV1``: 1x1 stem 3->24 + BN (stride 1); stages of 4/8/4
  bottlenecks, out 240/480/960, groups 3; a stage's first block has stride 2, produces
  out - in channels and concatenates a 3x3 stride-2 pad-1 average pool of its input; mid =
  out/4; conv1 1x1 with groups 1 if in == 24 else 3, shuffle(g), 3x3 depthwise (stride),
  conv3 1x1 groups 3; preact = cat or sum, out = ReLU(preact); pool avg_pool2d(4); ``linear``.
  R and M raise NotImplementedError in get_bn_before_relu.
* R:models/ShuffleNetv2.py ``ShuffleV2`` (net_size 1): 1x1 stem 3->24 + BN; stages =
  DownBlock(in, out) then 3/7/3 BasicBlock(out), out 116/232/464; BasicBlock: split halves,
  branch on the second (1x1-BN-ReLU, 3x3 dw-BN, 1x1-BN), out = shuffle(cat(x1, ReLU)),
  preact = cat(x1, pre-ReLU branch) unshuffled; DownBlock: left 3x3 dw s2 + BN, 1x1 + BN +
  ReLU; right 1x1 + BN + ReLU, 3x3 dw s2 + BN, 1x1 + BN + ReLU; cat, shuffle(2); then
  ReLU(BN(conv2 1x1 464->1024)), avg_pool2d(4), ``linear``. f3 is layer3's output (not the
  1024-channel map). No get_bn_before_relu (R and M raise).
* R:models/resnetv2.py ``ResNet50``: 3x3 stride-1 stem 3->64 + BN, no max-pool; bottleneck
  stages 3/4/6/3 of planes 64/128/256/512 (expansion 4), stride 1/2/2/2; shortcut 1x1 conv +
  BN when stride != 1 or in != 4*planes; AdaptiveAvgPool2d(1); ``linear``(2048, n); preact
  = each stage's last residual sum; M's get_bn_before_relu = layerK[-1].bn3.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from accelerate.utils import set_seed
from torch import nn

from kt_bench.api.method import build_method
from kt_bench.commands.main import main
from kt_bench.core.options import Spec
from kt_bench.data import load_dataset
from kt_bench.models import build_model, count_parameters
from kt_bench.models.taps import TapRecorder
from kt_bench.sweep.teachers import load_state
from kt_bench.training.device import make_accelerator
from kt_bench.training.engine import train
from kt_bench.training.recipe import Recipe

NAMES = ("mobilenetv2", "shufflev1", "shufflev2", "resnet50")

# ---- R's state-dict layouts, re-stated from R's constructors ---------------------------------

Layout = list[tuple[str, tuple[int, ...]]]


def _conv(key: str, out_ch: int, in_per_group: int, k: int) -> Layout:
    return [(f"{key}.weight", (out_ch, in_per_group, k, k))]


def _bn(key: str, c: int) -> Layout:
    return [(f"{key}.{n}", (c,)) for n in ("weight", "bias", "running_mean", "running_var")] + [
        (f"{key}.num_batches_tracked", ())]


def _linear(key: str, out_f: int, in_f: int) -> Layout:
    return [(f"{key}.weight", (out_f, in_f)), (f"{key}.bias", (out_f,))]


def r_mobile_half_layout(nc: int) -> Layout:
    """(key, shape) of R's ``mobile_half(nc)`` state dict, in order."""
    t_ = 6
    groups = [(1, 16, 1, 1), (t_, 24, 2, 1), (t_, 32, 3, 2), (t_, 64, 4, 2), (t_, 96, 3, 1),
              (t_, 160, 3, 2), (t_, 320, 1, 1)]
    out = _conv("conv1.0", 16, 3, 3) + _bn("conv1.1", 16)
    inp = 16
    for g, (t, c, n, _s) in enumerate(groups):
        oup = int(c * 0.5)
        for i in range(n):
            p, hid = f"blocks.{g}.{i}.conv", inp * t
            out += (_conv(f"{p}.0", hid, inp, 1) + _bn(f"{p}.1", hid)
                    + _conv(f"{p}.3", hid, 1, 3) + _bn(f"{p}.4", hid)
                    + _conv(f"{p}.6", oup, hid, 1) + _bn(f"{p}.7", oup))
            inp = oup
    return out + _conv("conv2.0", 1280, inp, 1) + _bn("conv2.1", 1280) + _linear(
        "classifier.0", nc, 1280)


def r_shufflev1_layout(nc: int) -> Layout:
    """(key, shape) of R's ``ShuffleV1(num_classes=nc)`` state dict, in order."""
    out = _conv("conv1", 24, 3, 1) + _bn("bn1", 24)
    inp = 24
    for k, (planes, n) in enumerate(zip((240, 480, 960), (4, 8, 4), strict=True), 1):
        for i in range(n):
            branch = planes - inp if i == 0 else planes
            mid, g1, p = branch // 4, (1 if inp == 24 else 3), f"layer{k}.{i}"
            out += (_conv(f"{p}.conv1", mid, inp // g1, 1) + _bn(f"{p}.bn1", mid)
                    + _conv(f"{p}.conv2", mid, 1, 3) + _bn(f"{p}.bn2", mid)
                    + _conv(f"{p}.conv3", branch, mid // 3, 1) + _bn(f"{p}.bn3", branch))
            inp = planes
    return out + _linear("linear", nc, 960)


def r_shufflev2_layout(nc: int) -> Layout:
    """(key, shape) of R's ``ShuffleV2(num_classes=nc)`` state dict, in order."""
    out = _conv("conv1", 24, 3, 1) + _bn("bn1", 24)
    inp = 24
    for k, (planes, n) in enumerate(zip((116, 232, 464), (3, 7, 3), strict=True), 1):
        mid, p = planes // 2, f"layer{k}.0"
        out += (_conv(f"{p}.conv1", inp, 1, 3) + _bn(f"{p}.bn1", inp)
                + _conv(f"{p}.conv2", mid, inp, 1) + _bn(f"{p}.bn2", mid)
                + _conv(f"{p}.conv3", mid, inp, 1) + _bn(f"{p}.bn3", mid)
                + _conv(f"{p}.conv4", mid, 1, 3) + _bn(f"{p}.bn4", mid)
                + _conv(f"{p}.conv5", mid, mid, 1) + _bn(f"{p}.bn5", mid))
        for i in range(1, n + 1):
            p = f"layer{k}.{i}"
            out += (_conv(f"{p}.conv1", mid, mid, 1) + _bn(f"{p}.bn1", mid)
                    + _conv(f"{p}.conv2", mid, 1, 3) + _bn(f"{p}.bn2", mid)
                    + _conv(f"{p}.conv3", mid, mid, 1) + _bn(f"{p}.bn3", mid))
        inp = planes
    return out + _conv("conv2", 1024, 464, 1) + _bn("bn2", 1024) + _linear("linear", nc, 1024)


def r_resnet50_layout(nc: int) -> Layout:
    """(key, shape) of R's ``ResNet50(num_classes=nc)`` state dict, in order."""
    out = _conv("conv1", 64, 3, 3) + _bn("bn1", 64)
    inp = 64
    for k, (planes, n, stride) in enumerate(
            zip((64, 128, 256, 512), (3, 4, 6, 3), (1, 2, 2, 2), strict=True), 1):
        for i in range(n):
            p, wide = f"layer{k}.{i}", 4 * planes
            out += (_conv(f"{p}.conv1", planes, inp, 1) + _bn(f"{p}.bn1", planes)
                    + _conv(f"{p}.conv2", planes, planes, 3) + _bn(f"{p}.bn2", planes)
                    + _conv(f"{p}.conv3", wide, planes, 1) + _bn(f"{p}.bn3", wide))
            if (stride if i == 0 else 1) != 1 or inp != wide:
                out += _conv(f"{p}.shortcut.0", wide, inp, 1) + _bn(f"{p}.shortcut.1", wide)
            inp = wide
    return out + _linear("linear", nc, 2048)


R_LAYOUTS = {"mobilenetv2": r_mobile_half_layout, "shufflev1": r_shufflev1_layout,
             "shufflev2": r_shufflev2_layout, "resnet50": r_resnet50_layout}


def _layout_params(layout: Layout) -> int:
    return sum(math.prod(shape) for key, shape in layout
               if key.endswith(".weight") or key.endswith(".bias"))


# ---- parameter counts and state dicts --------------------------------------------------------

#: Trainable parameters at 100 classes (R's models; the re-stated layouts sum to these).
PARAMS_100 = {"mobilenetv2": 812_836, "shufflev1": 949_258, "shufflev2": 1_355_528,
              "resnet50": 23_705_252}
#: Width of the pooled feature feeding the classifier.
POOL_WIDTH = {"mobilenetv2": 1280, "shufflev1": 960, "shufflev2": 1024, "resnet50": 2048}


@pytest.mark.parametrize("name", NAMES)
def test_parameter_count_at_100_classes_equals_r(name):
    model = build_model(name, num_classes=100)
    assert _layout_params(R_LAYOUTS[name](100)) == PARAMS_100[name]
    assert count_parameters(model) == PARAMS_100[name]
    # 90 fewer classes drop 90 rows (weights + bias) of the classifier
    assert count_parameters(build_model(name, 10)) == PARAMS_100[name] - 90 * (
        POOL_WIDTH[name] + 1)


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_keys_and_shapes_equal_r_layout(name):
    model = build_model(name, num_classes=100)
    got = [(k, tuple(v.shape)) for k, v in model.state_dict().items()]
    assert got == R_LAYOUTS[name](100)


@pytest.mark.parametrize("name", NAMES)
def test_r_checkpoint_loads_without_key_mapping(name, tmp_path):
    gen = torch.Generator().manual_seed(0)
    state = {k: (torch.tensor(7) if k.endswith("num_batches_tracked")
                 else torch.rand(shape, generator=gen) + 0.5)
             for k, shape in R_LAYOUTS[name](100)}
    path = tmp_path / "ckpt.pth"
    torch.save({"model": state, "epoch": 240}, path)  # R's train_teacher.py checkpoint shape
    model = build_model(name, num_classes=100)
    load_state(model, str(path))
    loaded = model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in state.items())


# ---- taps -----------------------------------------------------------------------------------

#: Every tap's shape on a 2x3x32x32 batch, 100 classes.
TAP_SHAPES = {
    "mobilenetv2": {
        "stage1": (2, 12, 16, 16), "stage2": (2, 16, 8, 8), "stage3": (2, 48, 4, 4),
        "stage4": (2, 160, 2, 2), "stage1_pre": (2, 12, 16, 16), "stage2_pre": (2, 16, 8, 8),
        "stage3_pre": (2, 48, 4, 4), "stage4_pre": (2, 160, 2, 2), "feat": (2, 1280, 2, 2),
        "feat_pre": (2, 1280, 2, 2), "pool": (2, 1280), "logits": (2, 100),
        "stage0": (2, 16, 16, 16)},
    "shufflev1": {
        "stage1": (2, 240, 16, 16), "stage2": (2, 480, 8, 8), "stage3": (2, 960, 4, 4),
        "stage1_pre": (2, 240, 16, 16), "stage2_pre": (2, 480, 8, 8),
        "stage3_pre": (2, 960, 4, 4), "feat": (2, 960, 4, 4), "feat_pre": (2, 960, 4, 4),
        "pool": (2, 960), "logits": (2, 100),
        "stage0": (2, 24, 32, 32)},
    "shufflev2": {
        "stage1": (2, 116, 16, 16), "stage2": (2, 232, 8, 8), "stage3": (2, 464, 4, 4),
        "stage1_pre": (2, 116, 16, 16), "stage2_pre": (2, 232, 8, 8),
        "stage3_pre": (2, 464, 4, 4), "feat": (2, 1024, 4, 4), "feat_pre": (2, 1024, 4, 4),
        "pool": (2, 1024), "logits": (2, 100),
        "stage0": (2, 24, 32, 32)},
    "resnet50": {
        "stage1": (2, 256, 32, 32), "stage2": (2, 512, 16, 16), "stage3": (2, 1024, 8, 8),
        "stage4": (2, 2048, 4, 4), "stage1_pre": (2, 256, 32, 32),
        "stage2_pre": (2, 512, 16, 16), "stage3_pre": (2, 1024, 8, 8),
        "stage4_pre": (2, 2048, 4, 4), "feat": (2, 2048, 4, 4), "feat_pre": (2, 2048, 4, 4),
        "pool": (2, 2048), "logits": (2, 100),
        "stage0": (2, 64, 32, 32)},
}

#: M's get_bn_before_relu, by stage (ShuffleNets: none, R and M raise NotImplementedError).
BN_BEFORE_RELU = {
    "mobilenetv2": {"stage1": "blocks.1.1.conv.7", "stage2": "blocks.2.2.conv.7",
                    "stage3": "blocks.4.2.conv.7", "stage4": "blocks.6.0.conv.7"},
    "shufflev1": {},
    "shufflev2": {},
    "resnet50": {"stage1": "layer1.2.bn3", "stage2": "layer2.3.bn3", "stage3": "layer3.5.bn3",
                 "stage4": "layer4.2.bn3"},
}


def _taps(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    rec = TapRecorder(model, model.tap_map, [t for t in model.tap_map if t != "logits"])
    try:
        return rec.collect(model(x))
    finally:
        rec.remove()


@pytest.mark.parametrize("name", NAMES)
def test_every_tap_has_the_expected_shape(name):
    torch.manual_seed(0)
    model = build_model(name, num_classes=100)
    assert set(model.tap_map) | {"logits"} == set(TAP_SHAPES[name])
    taps = _taps(model, torch.randn(2, 3, 32, 32))
    assert {k: tuple(v.shape) for k, v in taps.items()} == TAP_SHAPES[name]


@pytest.mark.parametrize("name", NAMES)
def test_bn_before_relu_names_m_batchnorms(name):
    model = build_model(name, num_classes=100)
    assert model.bn_before_relu == BN_BEFORE_RELU[name]
    modules = dict(model.named_modules())
    assert all(isinstance(modules[m], nn.BatchNorm2d) for m in model.bn_before_relu.values())


# ---- R's forward(is_feat=True), re-stated with R's strides, paddings and groups ---------------

def _cv(x, conv, stride=1, padding=0, groups=1):
    """A convolution with the module's weights but R's hyper-parameters."""
    return F.conv2d(x, conv.weight, conv.bias, stride, padding, 1, groups)


def _shuffle(x: torch.Tensor, g: int) -> torch.Tensor:
    """Channel shuffle as an index permutation: output channel j*g + i is input i*(C/g) + j."""
    per = x.shape[1] // g
    return x[:, [i * per + j for j in range(per) for i in range(g)]]


def r_mobile_half(m, x):
    """R's mobile_half forward on ``m``'s weights: ``(feats, preact feats, map before
    pooling, that map before its ReLU, logits)``."""
    f0 = F.relu(m.conv1[1](_cv(x, m.conv1[0], 2, 1)))
    strides, h, ends = (1, 1, 2, 2, 1, 2, 1), f0, []
    for group, s in zip(m.blocks, strides, strict=True):
        for i, block in enumerate(group):
            c, stride = block.conv, s if i == 0 else 1
            hid = c[0].weight.shape[0]
            y = F.relu(c[1](_cv(h, c[0])))
            y = F.relu(c[4](_cv(y, c[3], stride, 1, hid)))
            y = c[7](_cv(y, c[6]))
            h = h + y if stride == 1 and h.shape[1] == y.shape[1] else y
        ends.append(h)
    stages = [ends[1], ends[2], ends[4], ends[6]]
    top_pre = m.conv2[1](_cv(stages[-1], m.conv2[0]))
    top = F.relu(top_pre)
    pooled = F.avg_pool2d(top, 2, ceil_mode=True).flatten(1)
    feats = [f0, *stages, pooled]
    return feats, feats, top, top_pre, m.classifier[0](pooled)


def _v1_block(b, x, stride):
    g = 1 if x.shape[1] == 24 else 3
    mid = b.conv2.weight.shape[0]
    y = _shuffle(F.relu(b.bn1(_cv(x, b.conv1, groups=g))), g)
    y = F.relu(b.bn2(_cv(y, b.conv2, stride, 1, mid)))
    y = b.bn3(_cv(y, b.conv3, groups=3))
    pre = torch.cat([y, F.avg_pool2d(x, 3, 2, 1)], 1) if stride == 2 else y + x
    return F.relu(pre), pre


def r_shufflev1(m, x):
    """R's ShuffleV1 forward, returned as in ``r_mobile_half``."""
    f0 = F.relu(m.bn1(_cv(x, m.conv1)))
    h, stages, pres = f0, [], []
    for layer in (m.layer1, m.layer2, m.layer3):
        for i, block in enumerate(layer):
            h, pre = _v1_block(block, h, 2 if i == 0 else 1)
        stages.append(h)
        pres.append(pre)
    pooled = F.avg_pool2d(h, 4).flatten(1)
    return [f0, *stages, pooled], [f0, *pres, pooled], h, pres[-1], m.linear(pooled)


def _v2_down(b, x):
    mid = b.conv4.weight.shape[0]
    left = b.bn1(_cv(x, b.conv1, 2, 1, x.shape[1]))
    left = F.relu(b.bn2(_cv(left, b.conv2)))
    right = F.relu(b.bn3(_cv(x, b.conv3)))
    right = b.bn4(_cv(right, b.conv4, 2, 1, mid))
    right = F.relu(b.bn5(_cv(right, b.conv5)))
    return _shuffle(torch.cat([left, right], 1), 2)


def _v2_basic(b, x):
    half = x.shape[1] // 2
    x1, x2 = x[:, :half], x[:, half:]
    y = F.relu(b.bn1(_cv(x2, b.conv1)))
    y = b.bn2(_cv(y, b.conv2, 1, 1, half))
    pre = b.bn3(_cv(y, b.conv3))
    return _shuffle(torch.cat([x1, F.relu(pre)], 1), 2), torch.cat([x1, pre], 1)


def r_shufflev2(m, x):
    """R's ShuffleV2 forward, returned as in ``r_mobile_half``."""
    f0 = F.relu(m.bn1(_cv(x, m.conv1)))
    h, stages, pres = f0, [], []
    for layer in (m.layer1, m.layer2, m.layer3):
        h = _v2_down(layer[0], h)
        for block in list(layer)[1:]:
            h, pre = _v2_basic(block, h)
        stages.append(h)
        pres.append(pre)
    top_pre = m.bn2(_cv(h, m.conv2))
    top = F.relu(top_pre)
    pooled = F.avg_pool2d(top, 4).flatten(1)
    return [f0, *stages, pooled], [f0, *pres, pooled], top, top_pre, m.linear(pooled)


def _r50_block(b, x, stride):
    y = F.relu(b.bn1(_cv(x, b.conv1)))
    y = F.relu(b.bn2(_cv(y, b.conv2, stride, 1)))
    y = b.bn3(_cv(y, b.conv3))
    if stride != 1 or x.shape[1] != y.shape[1]:
        res = b.shortcut[1](_cv(x, b.shortcut[0], stride))
    else:
        assert not list(b.shortcut.parameters()), "a projection where R adds the identity"
        res = x
    return F.relu(y + res), y + res


def r_resnet50(m, x):
    """R's ResNet50 forward, returned as in ``r_mobile_half``."""
    f0 = F.relu(m.bn1(_cv(x, m.conv1, 1, 1)))
    h, stages, pres = f0, [], []
    for k, layer in enumerate((m.layer1, m.layer2, m.layer3, m.layer4)):
        for i, block in enumerate(layer):
            h, pre = _r50_block(block, h, 2 if (i == 0 and k > 0) else 1)
        stages.append(h)
        pres.append(pre)
    pooled = F.adaptive_avg_pool2d(h, 1).flatten(1)
    return [f0, *stages, pooled], [f0, *pres, pooled], h, pres[-1], m.linear(pooled)


R_FORWARD = {"mobilenetv2": r_mobile_half, "shufflev1": r_shufflev1,
             "shufflev2": r_shufflev2, "resnet50": r_resnet50}


@pytest.mark.parametrize("name", NAMES)
def test_taps_equal_r_feature_lists(name):
    torch.manual_seed(1)
    model = build_model(name, num_classes=100).train()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        feats, pre_feats, top, top_pre, logits = R_FORWARD[name](model, x)
        taps = _taps(model, x)
    n = len(feats) - 2
    assert n == (4 if name in ("mobilenetv2", "resnet50") else 3)
    expected = {"pool": feats[-1], "logits": logits, "feat": top, "feat_pre": top_pre,
                "stage0": feats[0]}
    for k in range(1, n + 1):
        expected[f"stage{k}"], expected[f"stage{k}_pre"] = feats[k], pre_feats[k]
    assert set(expected) == set(taps)
    for tap, value in expected.items():
        torch.testing.assert_close(taps[tap], value, msg=f"{name} {tap}")
    assert (taps["feat_pre"] < 0).any() and torch.equal(taps["feat"], taps["feat_pre"].relu())


# ---- the CLI and the engine ------------------------------------------------------------------

@pytest.mark.slow  # builds every model twice (7 s); test_cli lists them too
def test_list_models_shows_the_new_networks(capsys):
    assert main(["list", "models"]) == 0
    lines = {ln.split()[0]: ln for ln in capsys.readouterr().out.splitlines() if ln.strip()}
    for name in NAMES:
        at_10 = _layout_params(R_LAYOUTS[name](10))
        assert f"{at_10 / 1e6:.3f}M" in lines[name]


@pytest.fixture(scope="module")
def tiny_data():
    return load_dataset(Spec("synthetic", {"n_train": 8, "n_test": 4, "image_size": 16}))


@pytest.mark.parametrize("name", NAMES)
def test_one_kd_step_trains_each_network_as_a_student(name, tiny_data):
    torch.manual_seed(0)
    teacher = build_model(Spec("resnet8", {"width": 0.25}), tiny_data.num_classes).eval()
    recipe = Recipe(epochs=1, batch_size=8, lr=0.01)
    set_seed(0)  # the engine's seed before it builds the student: the same initial weights
    before = torch.cat([p.detach().flatten()
                        for p in build_model(name, tiny_data.num_classes).parameters()])
    result = train(tiny_data, Spec(name), build_method("kd"), recipe, 0,
                   make_accelerator("cpu"), teacher)
    (record,) = result.history
    assert math.isfinite(record["loss"])
    after = torch.cat([p.detach().cpu().flatten() for p in result.model.parameters()])
    # one small SGD step moved the weights, and only a little (not a different start)
    assert 0 < (after - before).norm() < 0.1 * before.norm()
