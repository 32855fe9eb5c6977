"""timm's models as ``timm:<name>``: each family's canonical taps and their shapes, the token
and channels-last outputs reaching methods as (B, C, H, W) maps, local weight files, and the
errors for a wrong name, option or file."""

from __future__ import annotations

import sys

import pytest
import torch

from kt_bench.core.errors import ConfigError, KtBenchError, UnknownNameError
from kt_bench.models import build_model
from kt_bench.models.taps import TapRecorder
from kt_bench.models.timm_family import tokens_to_map

timm = pytest.importorskip("timm")


def taps_of(model: torch.nn.Module, size: int, channels: int = 3) -> dict[str, tuple]:
    """Every tap of ``model`` on two random images, as shapes."""
    recorder = TapRecorder(model, model.tap_map, list(model.tap_map))
    model.eval()
    with torch.no_grad():
        out = recorder.collect(model(torch.randn(2, channels, size, size)))
    recorder.remove()
    return {k: tuple(v.shape) for k, v in out.items()}


#: (spec, image side, the taps' shapes). Hierarchical CNNs and Swin: feature_info's stages
#: at strides 4..32 (and the stem at stride 2 as stage0); isotropic models: four equal
#: stages of blocks, their patch tokens laid out on the patch grid.
FAMILIES = [
    ({"name": "timm:resnet18"}, 64, {
        "stage0": (2, 64, 32, 32), "stage1": (2, 64, 16, 16), "stage2": (2, 128, 8, 8),
        "stage3": (2, 256, 4, 4), "stage4": (2, 512, 2, 2), "feat": (2, 512, 2, 2),
        "feat_pre": (2, 512, 2, 2), "stage1_pre": (2, 64, 16, 16), "stage4_pre": (2, 512, 2, 2),
        "pool": (2, 512), "logits": (2, 7)}),
    ({"name": "timm:convnext_atto"}, 64, {
        "stage1": (2, 40, 16, 16), "stage2": (2, 80, 8, 8), "stage3": (2, 160, 4, 4),
        "stage4": (2, 320, 2, 2), "feat": (2, 320, 2, 2), "pool": (2, 320), "logits": (2, 7)}),
    ({"name": "timm:efficientnet_b0"}, 64, {
        "stage0": (2, 16, 32, 32), "stage1": (2, 24, 16, 16), "stage2": (2, 40, 8, 8),
        "stage3": (2, 112, 4, 4), "stage4": (2, 320, 2, 2), "feat": (2, 1280, 2, 2),
        "pool": (2, 1280), "logits": (2, 7)}),
    ({"name": "timm:vit_tiny_patch16_224", "patch_size": 8, "depth": 8}, 32, {
        **{f"stage{k}": (2, 192, 4, 4) for k in (1, 2, 3, 4)},
        "feat": (2, 192, 4, 4), "pool": (2, 192), "logits": (2, 7)}),
    ({"name": "timm:deit_tiny_distilled_patch16_224", "patch_size": 8, "depth": 4}, 32, {
        **{f"stage{k}": (2, 192, 4, 4) for k in (1, 2, 3, 4)},
        "feat": (2, 192, 4, 4), "pool": (2, 192), "logits": (2, 7)}),
    ({"name": "timm:swin_tiny_patch4_window7_224", "window_size": 2, "depths": [1, 1, 1, 1],
      "embed_dim": 32, "num_heads": [1, 2, 4, 8]}, 32, {
        "stage1": (2, 32, 8, 8), "stage2": (2, 64, 4, 4), "stage3": (2, 128, 2, 2),
        "stage4": (2, 256, 1, 1), "feat": (2, 256, 1, 1), "pool": (2, 256), "logits": (2, 7)}),
    ({"name": "timm:mixer_s16_224"}, 64, {
        **{f"stage{k}": (2, 512, 4, 4) for k in (1, 2, 3, 4)},
        "feat": (2, 512, 4, 4), "pool": (2, 512), "logits": (2, 7)}),
]


@pytest.mark.parametrize("spec,size,shapes", FAMILIES, ids=[f[0]["name"] for f in FAMILIES])
def test_each_family_has_the_canonical_taps_as_image_like_maps(spec, size, shapes):
    model = build_model(spec, num_classes=7, in_channels=3, image_size=size)
    got = taps_of(model, size)
    assert {k: got[k] for k in shapes} == shapes
    assert all(k.endswith("_pre") for k in set(got) - set(shapes))


@pytest.mark.parametrize("spec,size,shapes", FAMILIES[1:],
                         ids=[f[0]["name"] for f in FAMILIES[1:]])
def test_stages_without_a_final_activation_are_their_own_preactivation(spec, size, shapes):
    model = build_model(spec, num_classes=7, in_channels=3, image_size=size)
    assert all(model.tap_map[f"stage{k}_pre"] == model.tap_map[f"stage{k}"] for k in (1, 4))
    assert model.bn_before_relu == {}


def test_isotropic_stages_are_every_quarter_of_the_blocks():
    model = build_model({"name": "timm:vit_tiny_patch16_224", "patch_size": 8}, 3, 3, 32)
    assert [model.tap_map[f"stage{k}"] for k in (1, 2, 3, 4)] == [
        "blocks.2", "blocks.5", "blocks.8", "blocks.11"]
    assert model.tap_map["feat"] == "norm" and model.tap_map["pool"] == "head:input"


def test_tokens_become_the_patch_grid_without_the_class_tokens():
    b, c, side = 2, 3, 4
    grid = torch.arange(b * c * side * side, dtype=torch.float32).view(b, c, side, side)
    patches = grid.flatten(2).transpose(1, 2)  # (B, N, C), row-major patches
    prefix = torch.full((b, 2, c), -1.0)  # class and distillation tokens
    assert torch.equal(tokens_to_map(torch.cat([prefix, patches], 1), prefix_tokens=2), grid)
    with pytest.raises(KtBenchError, match="square grid"):
        tokens_to_map(torch.zeros(1, 7, 3))


def test_vit_stage_tap_is_the_block_output_reshaped():
    model = build_model({"name": "timm:vit_tiny_patch16_224", "patch_size": 8, "depth": 4},
                        3, 3, 32).eval()
    raw = {}
    model.blocks[0].register_forward_hook(lambda m, i, o: raw.setdefault("b0", o))
    recorder = TapRecorder(model, model.tap_map, ["stage1"])
    with torch.no_grad():
        stage1 = recorder.collect(model(torch.randn(2, 3, 32, 32)))["stage1"]
    tokens = raw["b0"]  # (2, 1 + 16, 192): the class token first
    assert torch.equal(stage1[:, :, 1, 2], tokens[:, 1 + 1 * 4 + 2])


def test_swin_stage_is_its_channels_last_output_permuted():
    spec = FAMILIES[5][0]
    model = build_model(spec, 3, 3, 32).eval()
    raw = {}
    model.layers[1].register_forward_hook(lambda m, i, o: raw.setdefault("l1", o))
    recorder = TapRecorder(model, model.tap_map, ["stage2"])
    with torch.no_grad():
        stage2 = recorder.collect(model(torch.randn(2, 3, 32, 32)))["stage2"]
    assert raw["l1"].shape == (2, 4, 4, 64)
    assert torch.equal(stage2, raw["l1"].permute(0, 3, 1, 2))


def test_resnet_preactivation_and_bn_before_relu_name_the_last_block():
    model = build_model("timm:resnet18", 3, 3)
    assert model.tap_map["stage4_pre"] == "layer4.1.act2:input"
    assert model.bn_before_relu == {f"stage{k}": f"layer{k}.1.bn2" for k in (1, 2, 3, 4)}


def test_dataset_sets_channels_classes_and_image_size():
    model = build_model({"name": "timm:vit_tiny_patch16_224", "patch_size": 4, "depth": 1},
                        num_classes=10, in_channels=1, image_size=16)
    assert model.patch_embed.proj.in_channels == 1 and model.head.out_features == 10
    assert taps_of(model, 16, channels=1)["stage1"] == (2, 192, 4, 4)


def test_other_options_go_to_create_model_and_bad_ones_are_one_line():
    model = build_model({"name": "timm:resnet18", "drop_path_rate": 0.1}, 3)
    assert model.layer4[1].drop_path is not None  # timm raises the rate block by block
    with pytest.raises(ConfigError, match=r"timm model 'resnet18'.*no_such_option") as exc:
        build_model({"name": "timm:resnet18", "no_such_option": 1}, 3)
    assert "\n" not in str(exc.value)
    with pytest.raises(ConfigError, match="unknown option 'num_classes'"):
        build_model({"name": "timm:resnet18", "num_classes": 5}, 3)


def test_unknown_timm_name_is_one_line_with_close_names():
    with pytest.raises(UnknownNameError, match=r"unknown timm model 'resnet181'.*resnet18"):
        build_model("timm:resnet181", 3)
    with pytest.raises(UnknownNameError, match=r"or timm:<name>"):
        build_model("resnet181", 3)


def test_missing_timm_names_the_extra(monkeypatch, capsys):
    from tests.conftest import run_cli

    monkeypatch.setitem(sys.modules, "timm", None)
    with pytest.raises(KtBenchError, match=r"pip install 'kt-bench\[timm\]'"):
        build_model("timm:resnet18", 3)
    code, _, err = run_cli(capsys, "list", "models", "timm:vit_*")
    assert code == 2 and "no timm models are available here" in err and "[timm]" in err


def test_local_checkpoint_loads_with_a_new_head_and_adapted_first_conv(tmp_path):
    source = timm.create_model("resnet18", num_classes=1000)
    path = tmp_path / "r18.pth"
    torch.save({"state_dict": source.state_dict()}, path)
    model = build_model({"name": "timm:resnet18", "checkpoint": str(path)}, 5, in_channels=1)
    assert torch.equal(model.layer3[1].conv2.weight, source.layer3[1].conv2.weight)
    # one input channel: timm sums the RGB filters
    assert torch.allclose(model.conv1.weight, source.conv1.weight.sum(1, keepdim=True))
    assert model.fc.out_features == 5  # 1000 classes do not fit: a fresh head


def test_checkpoint_that_does_not_fit_or_runs_code_is_refused(tmp_path):
    state = timm.create_model("resnet18", num_classes=5).state_dict()
    del state["layer2.0.bn1.weight"]
    path = tmp_path / "cut.pth"
    torch.save(state, path)
    with pytest.raises(KtBenchError, match=r"lacks 'layer2.0.bn1.weight' \(1 such\)"):
        build_model({"name": "timm:resnet18", "checkpoint": str(path)}, 5)
    path = tmp_path / "code.pth"
    torch.save({"model": KtBenchError("an object, not data")}, path)
    with pytest.raises(KtBenchError, match="cannot be read as plain data"):
        build_model({"name": "timm:resnet18", "checkpoint": str(path)}, 5)
    with pytest.raises(KtBenchError, match="no such file"):
        build_model({"name": "timm:resnet18", "checkpoint": str(tmp_path / "none.pth")}, 5)


def test_list_models_names_the_family_and_lists_its_names_by_pattern(capsys):
    from kt_bench.commands.listing import _models
    from tests.conftest import run_cli

    rows, _ = _models()
    family = [r for r in rows if r[0] == "timm:<name>"]
    assert family and family[0][1] == f"{len(timm.list_models())} models"
    assert "kt-bench list models 'timm:PATTERN'" in family[0][3]
    code, out, _ = run_cli(capsys, "list", "models", "timm:vit_tiny_patch16_2*")
    assert code == 0 and "timm:vit_tiny_patch16_224" in out.split()
    code, _, err = run_cli(capsys, "list", "models", "timm:no_such_net*")
    assert code == 2 and "no timm model matches 'no_such_net*'" in err


def test_token_outputs_of_other_families_become_maps_too():
    # LeViT's stages output tokens with no class token; its 14x14, 7x7 and 4x4 grids
    model = build_model("timm:levit_128s", 5, 3, 224)
    got = taps_of(model, 224)
    assert [got[f"stage{k}"] for k in (1, 2, 3)] == [(2, 128, 14, 14), (2, 256, 7, 7),
                                                     (2, 384, 4, 4)]


def test_dataset_options_cannot_be_set_in_the_spec():
    with pytest.raises(ConfigError, match="option 'in_chans' comes from the dataset"):
        build_model({"name": "timm:resnet18", "in_chans": 3}, 5)


def test_a_vit_checkpoint_of_another_size_is_converted_by_timms_filter(tmp_path):
    source = timm.create_model("vit_tiny_patch16_224", num_classes=1000, depth=2)
    path = tmp_path / "vit.pth"
    torch.save(source.state_dict(), path)
    # 64-pixel images: a 4x4 patch grid instead of 14x14; the position embeddings resampled
    model = build_model({"name": "timm:vit_tiny_patch16_224", "depth": 2,
                         "checkpoint": str(path)}, 5, 3, 64)
    assert model.pos_embed.shape == (1, 1 + 16, 192)
    assert torch.equal(model.blocks[1].mlp.fc1.weight, source.blocks[1].mlp.fc1.weight)


def test_a_cut_short_checkpoint_is_one_line(tmp_path):
    path = tmp_path / "cut.pth"
    torch.save(timm.create_model("resnet18", num_classes=5).state_dict(), path)
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(KtBenchError, match=r"checkpoint .*cut.pth cannot be read \(") as exc:
        build_model({"name": "timm:resnet18", "checkpoint": str(path)}, 5)
    assert "\n" not in str(exc.value)


def test_a_checkpoint_enters_the_cell_id_by_content(tmp_path):
    from kt_bench.core.options import Spec
    from kt_bench.sweep.cells import model_identity

    a, b = tmp_path / "a.pth", tmp_path / "b.pth"
    a.write_bytes(b"weights one")
    b.write_bytes(b"weights one")
    same = [model_identity(Spec("timm:resnet18", {"checkpoint": str(p)})) for p in (a, b)]
    assert same[0] == same[1]  # the same file by another path
    b.write_bytes(b"weights two")
    assert model_identity(Spec("timm:resnet18", {"checkpoint": str(b)})) != same[0]
    pretrained = model_identity(Spec("timm:resnet18", {"pretrained": True}))
    assert pretrained["timm_version"] == timm.__version__
