"""The ``detection`` downstream kind: VOC annotations to targets, mAP@0.5 on hand-made cases,
Faster R-CNN fine-tuning of a zoo student on a tiny VOC-layout folder (resumable, bit-exact),
and one-line errors for bad input. Tests that score (and so fine-tune) need the ``detection``
extra; the rest run on a base install."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from kt_bench.core.errors import KtBenchError
from kt_bench.core.options import Spec
from kt_bench.downstream import DOWNSTREAM_KINDS, UnitContext, detection
from kt_bench.downstream.detection import Options, map50
from kt_bench.downstream.voc import (
    VOC_CLASSES,
    evaluation_target,
    read_annotation,
    training_target,
)
from kt_bench.models import build_model
from kt_bench.training.checkpoints import load_plain

#: For the tests that score detections: torchmetrics and pycocotools (the extra) installed.
needs_extra = pytest.mark.skipif(
    any(importlib.util.find_spec(name) is None for name in ("torchmetrics", "pycocotools")),
    reason="needs the detection extra (torchmetrics, pycocotools)")

KIND = DOWNSTREAM_KINDS.get("detection")
SIDE = 64
#: (class, colour) of the rectangles the tiny dataset draws.
DRAWN = (("cat", (220, 40, 40)), ("dog", (40, 40, 220)))
#: A recipe that trains in about a second on the tiny folder.
TINY = dict(epochs=1, batch_size=4, min_size=SIDE, max_size=96, warmup_iters=2, workers=0,
            eval_batch_size=4, lr=0.005)


def object_xml(name: str, box: tuple[int, int, int, int], difficult: bool = False) -> str:
    """One VOC ``<object>`` with a 1-based ``box`` (xmin, ymin, xmax, ymax)."""
    xmin, ymin, xmax, ymax = box
    return (f"<object><name>{name}</name><pose>Unspecified</pose><truncated>0</truncated>"
            f"<difficult>{int(difficult)}</difficult><bndbox><xmin>{xmin}</xmin>"
            f"<ymin>{ymin}</ymin><xmax>{xmax}</xmax><ymax>{ymax}</ymax></bndbox></object>")


def annotation_xml(image_id: str, objects: list[str]) -> str:
    """A VOC annotation file's text."""
    return (f"<annotation><folder>VOC2007</folder><filename>{image_id}.jpg</filename>"
            f"<size><width>{SIDE}</width><height>{SIDE}</height><depth>3</depth></size>"
            f"{''.join(objects)}</annotation>")


def write_voc(root: Path, n_train: int = 8, n_test: int = 4, with_objects: bool = True,
              difficult_test: bool = False) -> Path:
    """A tiny VOC 2007 folder under ``root`` in torchvision's layout: grey JPEGs with one
    coloured rectangle each (a cat red, a dog blue), the last test image with a second,
    difficult one; ``difficult_test``: every test object difficult."""
    folder = root / "VOCdevkit" / "VOC2007"
    for sub in ("JPEGImages", "Annotations", "ImageSets/Main"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(0)
    ids = [f"{i:06d}" for i in range(n_train + n_test)]
    for i, image_id in enumerate(ids):
        name, colour = DRAWN[i % 2]
        x0, y0 = (int(v) for v in torch.randint(0, 24, (2,), generator=gen))
        w, h = (int(v) for v in torch.randint(16, 32, (2,), generator=gen))
        image = Image.new("RGB", (SIDE, SIDE), (128, 128, 128))
        image.paste(colour, (x0, y0, x0 + w, y0 + h))
        objects = [object_xml(name, (x0 + 1, y0 + 1, x0 + w, y0 + h),
                              difficult=difficult_test and i >= n_train)]
        if i == len(ids) - 1:
            image.paste((40, 200, 40), (48, 48, 60, 60))
            objects.append(object_xml("cat", (49, 49, 60, 60), difficult=True))
        image.save(folder / "JPEGImages" / f"{image_id}.jpg", quality=95)
        text = annotation_xml(image_id, objects if with_objects else [])
        (folder / "Annotations" / f"{image_id}.xml").write_text(text)
    main = folder / "ImageSets" / "Main"
    (main / "trainval.txt").write_text("\n".join(ids[:n_train]) + "\n")
    (main / "test.txt").write_text("\n".join(ids[n_train:]) + "\n")
    return folder


@pytest.fixture(scope="module")
def voc_root(tmp_path_factory) -> Path:
    """The root of a tiny VOC folder, shared by the module's tests (they only read it)."""
    root = tmp_path_factory.mktemp("voc")
    write_voc(root)
    return root


def context(folder: Path, root: Path, student=None, logs: list | None = None,
            **options) -> UnitContext:
    """A unit context for ``student`` (a fresh resnet8 of 32x32 RGB images by default)."""
    if student is None:
        torch.manual_seed(0)
        student = build_model("resnet8", 10, 3, 32)
    return UnitContext(folder=folder, student=student.eval(),
                       options=Options(**{**TINY, **options}),
                       dataset=Spec("voc2007", {"root": str(root)}), data_root=None,
                       device=torch.device("cpu"), precision="no", seed=0,
                       log=(logs.append if logs is not None else lambda line: None))


def final_weights(folder: Path) -> dict[str, torch.Tensor]:
    """The detector's weights in a unit folder's checkpoint."""
    return load_plain(folder / "detector.pt")["model"]


# ---------------------------------------------------------------- annotations and mAP


def test_annotation_to_targets(tmp_path):
    path = tmp_path / "a.xml"
    path.write_text(annotation_xml("a", [object_xml("dog", (11, 21, 40, 50)),
                                         object_xml("aeroplane", (1, 1, 5, 5), difficult=True)]))
    ann = read_annotation(path)
    assert ann.boxes.tolist() == [[10, 20, 40, 50], [0, 0, 5, 5]]
    assert ann.labels.tolist() == [VOC_CLASSES.index("dog") + 1, 1] == [12, 1]
    train, test = training_target(ann), evaluation_target(ann)
    assert train["boxes"].tolist() == [[10, 20, 40, 50]] and train["labels"].tolist() == [12]
    assert test["iscrowd"].tolist() == [0, 1] and test["boxes"].shape == (2, 4)


def boxes(*rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)


def prediction(rows, scores, labels) -> dict[str, torch.Tensor]:
    return {"boxes": boxes(*rows), "scores": torch.tensor(scores),
            "labels": torch.tensor(labels)}


@needs_extra
def test_map50_of_perfect_predictions_is_one():
    targets = [{"boxes": boxes([0, 0, 10, 10], [20, 20, 40, 30]), "labels": torch.tensor([1, 2])},
               {"boxes": boxes([5, 5, 25, 25]), "labels": torch.tensor([2])}]
    predictions = [prediction([[0, 0, 10, 10], [20, 20, 40, 30]], [0.9, 0.8], [1, 2]),
                   prediction([[5, 5, 25, 25]], [0.7], [2])]
    assert map50(predictions, targets) == pytest.approx(1.0)


@needs_extra
def test_map50_of_one_box_found_of_two():
    # recall reaches 0.5 at precision 1 and never more: 51 of the 101 recall points
    targets = [{"boxes": boxes([0, 0, 10, 10], [30, 30, 50, 50]), "labels": torch.tensor([3, 3])}]
    predictions = [prediction([[0, 0, 10, 10]], [0.9], [3])]
    assert map50(predictions, targets) == pytest.approx(51 / 101)


@needs_extra
def test_map50_ignores_difficult_boxes_and_their_detections():
    # GT: a found box, a missed box, a difficult box detected with the top score. Ignored, it
    # leaves recall 1/2 at precision 1 (51/101); counted as an object, recall 2/3 (67/101); as a
    # false positive, precision 1/2 (25.5/101).
    target = {"boxes": boxes([0, 0, 10, 10], [60, 60, 80, 80], [30, 30, 50, 50]),
              "labels": torch.tensor([1, 1, 1]), "iscrowd": torch.tensor([0, 0, 1])}
    pred = prediction([[30, 30, 50, 50], [0, 0, 10, 10]], [0.95, 0.9], [1, 1])
    assert map50([pred], [target]) == pytest.approx(51 / 101)
    counted = {k: v for k, v in target.items() if k != "iscrowd"}
    assert map50([pred], [counted]) == pytest.approx(67 / 101)


# ---------------------------------------------------------------- fine-tuning


@needs_extra
def test_finetunes_and_a_second_run_resumes_to_the_same_score(voc_root, tmp_path):
    logs: list[str] = []
    ctx = context(tmp_path / "unit", voc_root, logs=logs)
    before = {k: v.clone() for k, v in ctx.student.state_dict().items()}
    first = KIND.run(ctx)
    assert set(first) == {"map50"} and 0.0 <= first["map50"] <= 100.0
    assert math.isfinite(first["map50"])
    assert (tmp_path / "unit" / "detector.pt").is_file()
    assert load_plain(tmp_path / "unit" / "detector.pt")["epoch"] == 1
    # the unit fine-tunes a copy: the cell's student is untouched
    assert all(torch.equal(v, ctx.student.state_dict()[k]) for k, v in before.items())
    weights = final_weights(tmp_path / "unit")
    assert any(not torch.equal(weights[f"backbone.student.{k}"], v)
               for k, v in before.items() if v.is_floating_point())
    # BatchNorm statistics stay frozen through fine-tuning
    stats = [k for k in before if k.endswith(("running_mean", "running_var"))]
    assert stats and all(torch.equal(weights[f"backbone.student.{k}"], before[k]) for k in stats)

    logs.clear()
    second = KIND.run(ctx)
    assert second == first
    assert any("resuming after epoch 1/1" in line for line in logs)
    assert not any("epoch 1/1, loss" in line for line in logs)  # no training this time


@needs_extra
def test_interrupted_run_resumes_to_the_uninterrupted_result(voc_root, tmp_path, monkeypatch):
    whole = KIND.run(context(tmp_path / "whole", voc_root, epochs=2, milestones=[1]))

    real_save = detection.save_checkpoint

    def save_then_stop(path, state):
        real_save(path, state)
        raise KeyboardInterrupt

    monkeypatch.setattr(detection, "save_checkpoint", save_then_stop)
    ctx = context(tmp_path / "cut", voc_root, epochs=2, milestones=[1])
    with pytest.raises(KeyboardInterrupt):
        KIND.run(ctx)
    assert load_plain(tmp_path / "cut" / "detector.pt")["epoch"] == 1
    monkeypatch.setattr(detection, "save_checkpoint", real_save)
    resumed = KIND.run(ctx)

    assert resumed == whole
    expected, got = final_weights(tmp_path / "whole"), final_weights(tmp_path / "cut")
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[k], got[k]) for k in expected)


@needs_extra
def test_fpn_features_build_and_run(voc_root, tmp_path):
    ctx = context(tmp_path / "unit", voc_root, features="fpn", fpn_channels=32)
    detector = detection.build_detector(ctx.student, ctx.options)
    assert detector.backbone.body.taps == ("stage1", "stage2", "stage3")
    assert list(detector.rpn.anchor_generator.sizes) == [(32,), (64,), (128,), (256,)]
    logs: list[str] = []
    result = KIND.run(context(tmp_path / "unit", voc_root, logs=logs, features="fpn",
                              fpn_channels=32, max_images=3))
    assert 0.0 <= result["map50"] <= 100.0
    assert logs[-1].endswith("on 3 test images")


@pytest.mark.slow
@needs_extra
def test_finetuning_learns_the_tiny_task(tmp_path):
    # 16 training images, 8 epochs: the rectangles are found (about 48 mAP here); an
    # evaluation with real detections is as repeatable as the training
    write_voc(tmp_path / "voc", n_train=16, n_test=4)
    ctx = context(tmp_path / "unit", tmp_path / "voc", epochs=8, lr=0.02, milestones=[8])
    first = KIND.run(ctx)
    assert first["map50"] > 20
    assert KIND.run(ctx) == first


def test_last_features_take_the_deepest_stage_and_freeze_batchnorm():
    torch.manual_seed(0)
    detector = detection.build_detector(build_model("resnet8", 10, 3, 32), Options())
    assert detector.backbone.taps == ("stage3",)
    assert detector.backbone.out_channels == 64
    detector.train()
    norms = [m for m in detector.backbone.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert norms and not any(m.training for m in norms)
    assert detector.rpn.training and detector.roi_heads.training


def test_backbone_stops_after_the_last_tap():
    # a CIFAR ResNet's classifier fits 32x32 inputs only: the pass must end before it
    torch.manual_seed(0)
    student = build_model("resnet8", 10, 3, 32).eval()
    maps = detection.record_taps(student, ["stage2", "stage3"], torch.zeros(1, 3, 72, 100))
    assert maps["stage2"].shape == (1, 32, 36, 50) and maps["stage3"].shape == (1, 64, 18, 25)


def test_flops_grow_with_epochs_and_size(voc_root):
    student = build_model("resnet8", 10, 3, 32)
    dataset = Spec("voc2007", {"root": str(voc_root)})
    one = KIND.flops(student, (3, 32, 32), dataset, Options(epochs=1, min_size=64, max_size=96))
    two = KIND.flops(student, (3, 32, 32), dataset, Options(epochs=2, min_size=64, max_size=96))
    big = KIND.flops(student, (3, 32, 32), dataset, Options(epochs=1))
    assert 0 < one < two < 2 * one and big > one
    assert detection.split_sizes(dataset, Options()) == (8, 4)
    missing = Spec("voc2007", {"root": "/nonexistent/voc"})
    assert detection.split_sizes(missing, Options()) == (5011, 4952)
    assert detection.split_sizes(missing, Options(max_images=10)) == (10, 10)


def test_learning_rate_warms_up_then_steps():
    options = Options(lr=0.1, warmup_iters=4, milestones=(2, 3))
    assert detection.learning_rate(options, 0, 0, 10) == pytest.approx(1e-4)
    assert detection.learning_rate(options, 0, 2, 10) == pytest.approx(0.1 * (1e-3 * 0.5 + 0.5))
    assert detection.learning_rate(options, 0, 4, 10) == pytest.approx(0.1)
    assert detection.learning_rate(options, 2, 0, 10) == pytest.approx(0.01)
    assert detection.learning_rate(options, 3, 0, 10) == pytest.approx(0.001)


# ---------------------------------------------------------------- bad input


def one_line(exc_info) -> str:
    message = str(exc_info.value)
    assert "\n" not in message
    return message


@needs_extra
def test_missing_folder_is_one_line_naming_it(tmp_path):
    with pytest.raises(KtBenchError) as exc:
        KIND.run(context(tmp_path / "unit", tmp_path / "nowhere"))
    assert str(tmp_path / "nowhere" / "VOCdevkit" / "VOC2007") in one_line(exc)


@needs_extra
@pytest.mark.parametrize(("layers", "words"), [
    (["stage4"], "has no tap 'stage4' for detection"),
    (["pool"], "tap 'pool' is no (B, C, H, W) feature map"),
])
def test_student_without_the_tap_is_one_line(voc_root, tmp_path, layers, words):
    with pytest.raises(KtBenchError) as exc:
        KIND.run(context(tmp_path / "unit", voc_root, layers=layers))
    message = one_line(exc)
    assert message.startswith("model CifarResNet") and words in message and "stage3" in message


def test_classification_dataset_has_no_boxes():
    with pytest.raises(KtBenchError) as exc:
        KIND.check(Spec("digits"), Options())
    assert one_line(exc) == "dataset 'digits' has no boxes; accepted: voc2007"
    KIND.check(Spec("voc2007", {"root": "/anywhere"}), Options())  # data is not loaded


@pytest.mark.parametrize(("options", "words"), [
    (dict(features="grid"), "features = 'grid'"),
    (dict(layers=("stage2", "stage3")), "takes one layer"),
    (dict(epochs=0), "epochs"),
    (dict(min_size=800, max_size=600), "max_size"),
])
def test_bad_options_are_one_line(options, words):
    with pytest.raises(KtBenchError) as exc:
        KIND.check(Spec("voc2007"), Options(**options))
    assert words in one_line(exc)


@needs_extra
def test_annotations_without_objects_are_one_line(tmp_path):
    write_voc(tmp_path / "empty", n_train=3, n_test=2, with_objects=False)
    with pytest.raises(KtBenchError) as exc:
        KIND.run(context(tmp_path / "unit", tmp_path / "empty"))
    assert "has no boxes" in one_line(exc) and "trainval" in one_line(exc)


@needs_extra
def test_map50_of_no_scorable_box_is_minus_one_and_an_error_in_percent():
    # torchmetrics' -1 where every ground-truth box is ignored must not become -100%
    target = {"boxes": boxes([0, 0, 10, 10]), "labels": torch.tensor([1]),
              "iscrowd": torch.tensor([1])}
    pred = prediction([[0, 0, 10, 10]], [0.9], [1])
    assert map50([pred], [target]) == -1
    assert detection.percent_map50([pred], [{**target, "iscrowd": torch.tensor([0])}],
                                   "voc2007", "test") == pytest.approx(100.0)
    with pytest.raises(KtBenchError) as exc:
        detection.percent_map50([pred], [target], "voc2007", "test")
    assert one_line(exc) == ("the test split of voc2007 has no box to score (every one is "
                             "difficult)")


@needs_extra
def test_unit_whose_test_boxes_are_all_difficult_is_one_line(tmp_path):
    write_voc(tmp_path / "voc", n_train=4, n_test=2, difficult_test=True)
    with pytest.raises(KtBenchError) as exc:
        KIND.run(context(tmp_path / "unit", tmp_path / "voc"))
    assert one_line(exc) == ("the test split of voc2007 has no box to score (every one is "
                             "difficult)")


def hide_extra(monkeypatch) -> None:
    """Make torchmetrics and pycocotools look uninstalled (neither found nor importable)."""
    for name in ("torchmetrics", "pycocotools"):
        monkeypatch.setitem(sys.modules, name, None)


def test_missing_extra_fails_run_only(monkeypatch, voc_root, tmp_path):
    hide_extra(monkeypatch)
    dataset = Spec("voc2007", {"root": str(voc_root)})
    KIND.check(dataset, Options())  # a grid with a detection table loads and dry-runs
    assert KIND.flops(build_model("resnet8", 10, 3, 32), (3, 32, 32), dataset,
                      Options(min_size=64, max_size=96)) > 0
    with pytest.raises(KtBenchError) as exc:
        KIND.run(context(tmp_path / "unit", voc_root))
    assert one_line(exc) == detection.EXTRA_MISSING
    assert not (tmp_path / "unit").exists()  # it fails before doing anything
