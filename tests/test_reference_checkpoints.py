"""RepDistiller's published teachers load: checkpoints in R's key layout give the logits of the
model they were written from, and the unpacked teachers folder is found by R's names.

The R layout is transcribed here by hand from R's model classes (R = HobbitLong/RepDistiller;
its ``ckpt_epoch_240.pth`` files hold ``{'model': state_dict, ...}``):

* R:models/resnet.py ``ResNet(depth, num_filters)``: ``conv1``, ``bn1``, then ``layer1..3``
  (``nn.Sequential`` of ``(depth-2)//6`` BasicBlocks of widths ``num_filters[1..3]``, strides
  1, 2, 2); a block is ``conv1`` (3x3), ``bn1``, ``conv2`` (3x3), ``bn2`` and, on the first
  block of a layer whose stride is not 1 or whose width changes, ``downsample`` =
  Sequential(1x1 conv, BN); then ``fc``. resnet56/110: num_filters 16/16/32/64;
  resnet32x4: 32/64/128/256.
* R:models/wrn.py ``WideResNet(depth, widen_factor)``: ``conv1`` (3 -> 16), ``block1..3``
  each a NetworkBlock whose ``layer`` is a Sequential of ``(depth-4)//6`` BasicBlocks: ``bn1``
  (input width), ``conv1`` (3x3), ``bn2``, ``conv2`` (3x3) and ``convShortcut`` (1x1) where
  the widths differ; then ``bn1`` (64k) and ``fc``. Widths 16k/32k/64k.
* R:models/vgg.py ``VGG(cfg, batch_norm=True)`` (R's ``vgg13`` is ``vgg13_bn``, cfg B):
  ``block0..4``, each Sequential of (Conv2d with bias, BatchNorm2d, ReLU) per width with the
  last ReLU dropped; then ``classifier`` = Linear(512, classes).
* BatchNorm2d keys: weight, bias, running_mean, running_var, num_batches_tracked.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator

import pytest
import torch
from torch import Tensor, nn

from kt_bench.core.errors import KtBenchError
from kt_bench.core.options import Spec
from kt_bench.models import build_model
from kt_bench.sweep.config import load_grid
from kt_bench.sweep.teachers import load_state
from kt_bench.training.reference_checkpoints import (
    PUBLISHED_TEACHERS,
    fit_state,
    kt_to_reference_key,
    layout_of,
    reference_key,
    reference_name,
    reference_teacher_path,
)

CLASSES = 100
Entry = tuple[str, tuple[int, ...], Tensor]  # (R key, shape R's code gives it, kt's tensor)


def _bn(prefix: str, c: int, bn: nn.BatchNorm2d) -> Iterator[Entry]:
    yield f"{prefix}.weight", (c,), bn.weight
    yield f"{prefix}.bias", (c,), bn.bias
    yield f"{prefix}.running_mean", (c,), bn.running_mean
    yield f"{prefix}.running_var", (c,), bn.running_var
    yield f"{prefix}.num_batches_tracked", (), bn.num_batches_tracked


def r_resnet(model: nn.Module, depth: int, nf: tuple[int, int, int, int]) -> Iterator[Entry]:
    """R's ResNet keys, their shapes, and kt's tensor for each (from kt's module objects)."""
    n = (depth - 2) // 6
    yield "conv1.weight", (nf[0], 3, 3, 3), model.conv1.weight
    yield from _bn("bn1", nf[0], model.bn1)
    inplanes = nf[0]
    for i, (planes, stride) in enumerate(zip(nf[1:], (1, 2, 2), strict=True), 1):
        layer = getattr(model, f"layer{i}")
        for b in range(n):
            kt, p = layer[b], f"layer{i}.{b}"
            cin = inplanes if b == 0 else planes
            yield f"{p}.conv1.weight", (planes, cin, 3, 3), kt.conv1.weight
            yield from _bn(f"{p}.bn1", planes, kt.bn1)
            yield f"{p}.conv2.weight", (planes, planes, 3, 3), kt.conv2.weight
            yield from _bn(f"{p}.bn2", planes, kt.bn2)
            if b == 0 and (stride != 1 or inplanes != planes):
                yield f"{p}.downsample.0.weight", (planes, inplanes, 1, 1), kt.shortcut[0].weight
                yield from _bn(f"{p}.downsample.1", planes, kt.shortcut[1])
        inplanes = planes
    yield "fc.weight", (CLASSES, nf[3]), model.fc.weight
    yield "fc.bias", (CLASSES,), model.fc.bias


def r_wrn(model: nn.Module, depth: int, k: int) -> Iterator[Entry]:
    """R's WideResNet keys, their shapes, and kt's tensor for each."""
    n = (depth - 4) // 6
    ch = (16, 16 * k, 32 * k, 64 * k)
    yield "conv1.weight", (16, 3, 3, 3), model.conv1.weight
    for i in (1, 2, 3):
        group = getattr(model, f"block{i}")
        for b in range(n):
            kt, p = group[b], f"block{i}.layer.{b}"
            cin, cout = (ch[i - 1] if b == 0 else ch[i]), ch[i]
            yield from _bn(f"{p}.bn1", cin, kt.bn1)
            yield f"{p}.conv1.weight", (cout, cin, 3, 3), kt.conv1.weight
            yield from _bn(f"{p}.bn2", cout, kt.bn2)
            yield f"{p}.conv2.weight", (cout, cout, 3, 3), kt.conv2.weight
            if cin != cout:
                yield f"{p}.convShortcut.weight", (cout, cin, 1, 1), kt.shortcut.weight
    yield from _bn("bn1", ch[3], model.bn)
    yield "fc.weight", (CLASSES, ch[3]), model.fc.weight
    yield "fc.bias", (CLASSES,), model.fc.bias


VGG13_CFG = ((64, 64), (128, 128), (256, 256), (512, 512), (512, 512))


def r_vgg(model: nn.Module, cfg: tuple[tuple[int, ...], ...]) -> Iterator[Entry]:
    """R's VGG-BN keys, their shapes, and kt's tensor for each."""
    cin = 3
    for i, widths in enumerate(cfg):
        kt_layers = [m for m in getattr(model, f"block{i}") if not isinstance(m, nn.ReLU)]
        for j, v in enumerate(widths):
            conv, bn = kt_layers[2 * j], kt_layers[2 * j + 1]
            yield f"block{i}.{3 * j}.weight", (v, cin, 3, 3), conv.weight
            yield f"block{i}.{3 * j}.bias", (v,), conv.bias
            yield from _bn(f"block{i}.{3 * j + 1}", v, bn)
            cin = v
    yield "classifier.weight", (CLASSES, 512), model.classifier.weight
    yield "classifier.bias", (CLASSES,), model.classifier.bias


R_LAYOUT = {
    "resnet56": lambda m: r_resnet(m, 56, (16, 16, 32, 64)),
    "resnet110": lambda m: r_resnet(m, 110, (16, 16, 32, 64)),
    "resnet32x4": lambda m: r_resnet(m, 32, (32, 64, 128, 256)),
    "wrn_40_2": lambda m: r_wrn(m, 40, 2),
    "vgg13": lambda m: r_vgg(m, VGG13_CFG),
}

# keys that R's layout holds (and kt's does not, except for VGG, whose names agree)
R_ONLY_KEYS = {
    "resnet56": ["layer2.0.downsample.0.weight", "layer3.0.downsample.1.running_var"],
    "resnet110": ["layer2.0.downsample.0.weight", "layer3.0.downsample.1.running_var"],
    "resnet32x4": ["layer1.0.downsample.0.weight", "layer3.0.downsample.1.weight"],
    "wrn_40_2": ["block1.layer.0.convShortcut.weight", "block3.layer.5.bn2.weight",
                 "bn1.running_mean"],
    "vgg13": ["block0.4.running_mean", "block4.3.weight"],
}
# where R has the identity shortcut, it has no downsample
R_ABSENT_KEYS = {"resnet56": ["layer1.0.downsample.0.weight"],
                 "resnet110": ["layer1.0.downsample.0.weight"]}


def _randomise(model: nn.Module, seed: int) -> nn.Module:
    """Random vectors everywhere (BN statistics and counters, biases), so that a misplaced
    tensor shows; the conv and linear weights keep their random initialisation."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if name.endswith("num_batches_tracked"):
                t.fill_(int(torch.randint(1, 1000, (), generator=g)))
            elif name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            elif t.dim() == 1:
                offset = 1.0 if name.endswith(".weight") else 0.0  # BN scales near 1
                t.copy_(torch.randn(t.shape, generator=g) * 0.2 + offset)
    return model


def r_checkpoint(name: str, model: nn.Module) -> OrderedDict:
    """``model``'s weights as R's state dict for ``name`` (checking R's shapes)."""
    state = OrderedDict()
    for key, shape, tensor in R_LAYOUT[name](model):
        assert key not in state, key
        assert tuple(tensor.shape) == shape, (key, tuple(tensor.shape), shape)
        state[key] = tensor.detach().clone()
    return state


@pytest.mark.parametrize("name", list(R_LAYOUT))
def test_a_teacher_in_repdistillers_layout_gives_the_same_logits(name, tmp_path):
    torch.manual_seed(0)
    original = _randomise(build_model(name, num_classes=CLASSES), seed=1).eval()
    state = r_checkpoint(name, original)
    assert len(state) == len(original.state_dict())  # every weight, once
    for key in R_ONLY_KEYS[name]:
        assert key in state
    for key in R_ABSENT_KEYS.get(name, []):
        assert key not in state
    path = tmp_path / f"{reference_name(name)}_vanilla" / "ckpt_epoch_240.pth"
    path.parent.mkdir()
    torch.save({"epoch": 240, "model": state, "accuracy": 0.0}, path)

    torch.manual_seed(2)
    fresh = build_model(name, num_classes=CLASSES)
    if name != "vgg13":  # R's names are not kt-bench's: a plain load fails
        with pytest.raises(RuntimeError):
            build_model(name, num_classes=CLASSES).load_state_dict(state)
    load_state(fresh, str(path))
    fresh.eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        expected, got = original(x), fresh(x)
    assert torch.equal(got, expected)
    for key, value in original.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key


@pytest.mark.parametrize("name", list(R_LAYOUT))
def test_the_renaming_rules_agree_with_the_transcribed_layout(name):
    model = build_model(name, num_classes=CLASSES)
    kt_name = {id(t): k for k, t in model.state_dict(keep_vars=True).items()}
    layout = layout_of(model)
    for r_key, _, tensor in R_LAYOUT[name](model):
        assert reference_key(layout, r_key) == kt_name[id(tensor)]
        assert kt_to_reference_key(layout, kt_name[id(tensor)]) == r_key


def test_kt_benchs_own_layout_still_loads_and_is_tried_first(tmp_path):
    original = _randomise(build_model("wrn_16_2", num_classes=CLASSES), seed=3).eval()
    path = tmp_path / "own.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in original.state_dict().items()}},
               path)
    fresh = build_model("wrn_16_2", num_classes=CLASSES)
    load_state(fresh, str(path))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(fresh.eval()(x), original(x))
    # a kt-layout state comes back untouched, even where R's rules would rename a key
    state = original.state_dict()
    assert fit_state(original, state, "x") == dict(state)


def test_a_file_without_num_batches_tracked_loads(tmp_path):
    original = _randomise(build_model("resnet56", num_classes=CLASSES), seed=4).eval()
    state = {k: v for k, v in r_checkpoint("resnet56", original).items()
             if not k.endswith("num_batches_tracked")}
    path = tmp_path / "old.pth"
    torch.save({"model": state}, path)
    fresh = build_model("resnet56", num_classes=CLASSES)
    load_state(fresh, str(path))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(fresh.eval()(x), original(x))


def _error(model: nn.Module, state: dict, path) -> str:
    torch.save({"model": state}, path)
    with pytest.raises(KtBenchError) as info:
        load_state(model, str(path))
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"teacher checkpoint {path} does not fit the teacher")
    return message


def test_a_file_of_neither_layout_is_a_one_line_error_naming_the_first_bad_key(tmp_path):
    model = build_model("resnet56", num_classes=CLASSES)
    r_state = r_checkpoint("resnet56", model)
    # R's layout with one tensor gone and one stray: named by R's names
    broken = dict(r_state)
    del broken["layer2.0.downsample.1.running_var"]
    broken["layer2.0.downsample.2.weight"] = torch.zeros(1)
    message = _error(model, broken, tmp_path / "r.pth")
    assert "RepDistiller" in message
    assert "first missing key 'layer2.0.downsample.1.running_var'" in message
    assert "first unexpected key 'layer2.0.downsample.2.weight'" in message
    # kt-bench's layout with the first tensor gone
    own = dict(model.state_dict())
    del own["conv1.weight"]
    message = _error(model, own, tmp_path / "kt.pth")
    assert "closer to kt-bench's: first missing key 'conv1.weight' (1 missing)" in message
    # a model without a reference layout: no mention of RepDistiller
    plain = nn.Sequential(nn.Linear(2, 2))
    message = _error(plain, {"0.weight": torch.zeros(2, 2), "1.bias": torch.zeros(2)},
                     tmp_path / "plain.pth")
    assert "RepDistiller" not in message
    assert "first missing key '0.bias'" in message
    assert "first unexpected key '1.bias'" in message


def test_a_wrong_width_is_still_a_one_line_error(tmp_path):
    state = r_checkpoint("resnet56", build_model("resnet56", num_classes=CLASSES))
    other = build_model(Spec("resnet56", {"width": 2}), num_classes=CLASSES)
    message = _error(other, state, tmp_path / "wide.pth")
    assert "size mismatch" in message


def test_reference_teacher_path_uses_repdistillers_folder_names(tmp_path):
    expected = {"resnet56": "resnet56", "resnet110": "resnet110", "resnet32x4": "resnet32x4",
                "wrn_40_2": "wrn_40_2", "vgg13": "vgg13", "resnet50": "ResNet50"}
    for kt_name, r_name in expected.items():
        path = reference_teacher_path(tmp_path, kt_name)
        assert path == tmp_path / f"{r_name}_vanilla" / "ckpt_epoch_240.pth"
        assert r_name in PUBLISHED_TEACHERS
    assert sorted(PUBLISHED_TEACHERS) == sorted(expected.values())
    with pytest.raises(KtBenchError, match="tv_resnet101"):
        reference_teacher_path(tmp_path, "tv_resnet101")


def test_every_teacher_of_the_crd_grid_is_a_published_one():
    grid = load_grid("crd-cifar100")
    teachers = {pair.teacher.name for pair in grid.pairs}
    assert teachers == {"wrn_40_2", "resnet56", "resnet110", "resnet32x4", "vgg13"}
    for teacher in teachers:
        assert reference_name(teacher) in PUBLISHED_TEACHERS
        assert teacher in R_LAYOUT  # and its layout is checked above
