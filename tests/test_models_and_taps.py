"""The zoo's networks, their parameter counts and their named taps."""

import pytest
import torch

from kt_bench.errors import ConfigError, KtBenchError, UnknownNameError
from kt_bench.models import build_model, count_parameters
from kt_bench.spec import Spec
from kt_bench.taps import TapRecorder

# He et al. 2016 (Deep Residual Learning), Table 6: parameters of the CIFAR-10 ResNets.
CITED = {"resnet20": 0.27e6, "resnet32": 0.46e6, "resnet44": 0.66e6, "resnet56": 0.85e6,
         "resnet110": 1.7e6}


@pytest.mark.parametrize("name", list(CITED))
def test_cifar_resnet_parameter_counts_match_he_et_al(name):
    n = count_parameters(build_model(name, num_classes=10))
    assert abs(n - CITED[name]) / CITED[name] < 0.02, n


@pytest.mark.parametrize("name,opts", [("resnet8", {}), ("resnet20", {"width": 0.5}),
                                       ("resnet14", {"width": 2})])
def test_cifar_resnet_taps_have_the_stage_shapes(name, opts):
    model = build_model(Spec(name, opts), num_classes=7, in_channels=1)
    rec = TapRecorder(model, model.tap_map, ["stage1", "stage2", "stage3", "feat", "feat_pre",
                                             "pool"])
    x = torch.randn(2, 1, 32, 32)
    taps = rec.collect(model(x))
    w = opts.get("width", 1)
    assert taps["stage1"].shape == (2, round(16 * w), 32, 32)
    assert taps["stage2"].shape == (2, round(32 * w), 16, 16)
    assert taps["feat"].shape == (2, round(64 * w), 8, 8)
    assert taps["pool"].shape == (2, round(64 * w))
    assert taps["logits"].shape == (2, 7)
    assert torch.equal(taps["feat"], taps["feat_pre"].relu())  # pre-activation map
    assert (taps["feat_pre"] < 0).any()


def test_torchvision_model_is_tapped_by_module_name():
    model = build_model("tv_resnet18", num_classes=5)
    rec = TapRecorder(model, model.tap_map, ["stage4", "pool"])
    taps = rec.collect(model(torch.randn(1, 3, 64, 64)))
    assert taps["stage4"].shape == (1, 512, 2, 2) and taps["logits"].shape == (1, 5)
    rec.remove()
    assert not model.layer4._forward_hooks


def test_unknown_tap_model_and_option_are_one_line_errors():
    model = build_model("resnet8", num_classes=10)
    with pytest.raises(KtBenchError, match="has no tap 'stage4'; known: feat, feat_pre, logits"):
        TapRecorder(model, model.tap_map, ["stage4"])
    with pytest.raises(UnknownNameError, match="unknown model 'resnet9'.*known: .*resnet110"):
        build_model("resnet9", num_classes=10)
    with pytest.raises(ConfigError, match="unknown option 'depth' for model 'resnet8'; "
                                          "accepted: width"):
        build_model(Spec("resnet8", {"depth": 3}), num_classes=10)
