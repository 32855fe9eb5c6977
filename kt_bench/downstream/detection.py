"""The ``detection`` downstream kind: the student as the backbone of a Faster R-CNN (Ren et al.,
2015; torchvision's ``FasterRCNN``), fine-tuned on PASCAL VOC 2007 ``trainval`` and scored by
mAP at IoU 0.5 on ``test``, as the NST paper (Huang & Wang, 2017) and later distillation
papers evaluate a student's features for detection.

The backbone runs the student's own forward pass, records its stage taps (its
:class:`~kt_bench.models.taps.TapRecorder`) and stops once the deepest wanted one is recorded,
so the classifier head (and any layer past the taps) is unused. ``features = "last"`` gives the
detector one feature map, the deepest stage (one anchor level of five sizes and three aspect
ratios); ``features = "fpn"`` puts a feature pyramid (Lin et al., 2017) over every stage, with
one anchor size per level. The student's BatchNorm layers stay in eval mode throughout
fine-tuning (their running statistics frozen, their affine weights still learning), as is usual
at detection batch sizes. Images reach the detector in [0, 1]; its transform resizes them
(``min_size``/``max_size``) and normalises them with ``image_mean``/``image_std``: ImageNet's by
default, since the unit does not know the student's own training normalisation (set them to it
where it matters, e.g. CIFAR's for a CIFAR student).

A unit resumes: after each epoch ``detector.pt`` holds the detector's and the optimizer's state,
the GradScaler's, the epochs done and the recipe. Each epoch's data order and flips and the
detector's own sampling (anchors, regions) are seeded from (seed, epoch), so no random state
needs saving and a resumed unit repeats an unstopped one bit for bit on the same device. A
checkpoint of another recipe is set aside (as a damaged one is) and training starts again.

The score is torchmetrics' ``MeanAveragePrecision`` on pycocotools at IoU 0.5: COCO-style AP,
interpolated at 101 recall points, not VOC 2007's 11-point AP (the two differ slightly).
Difficult objects count as COCO's crowd boxes (``iscrowd = 1``): neither misses nor, where
detected, false positives (pycocotools measures a detection's overlap with a crowd box over the
detection's own area). torchmetrics and pycocotools are the ``detection`` extra.
"""

from __future__ import annotations

import copy
import importlib.util
import math
import re
from collections import OrderedDict
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.rpn import RPNHead
from torchvision.ops import FeaturePyramidNetwork, MultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from kt_bench.core.atomic import previous_path
from kt_bench.core.errors import ConfigError, KtBenchError, first_line
from kt_bench.core.options import Spec
from kt_bench.core.seeds import derived_seed
from kt_bench.data.bundle import data_root
from kt_bench.downstream.kinds import DownstreamKind, UnitContext, register_kind
from kt_bench.downstream.student import autocast_for, input_channels
from kt_bench.downstream.voc import VOC2007_SIZES, VOC_CLASSES, VocDetection, split_ids, voc_folder
from kt_bench.models.macs import count_macs
from kt_bench.models.taps import TapRecorder
from kt_bench.training.checkpoints import (
    DamagedFileError,
    load_checkpoint,
    load_states,
    save_checkpoint,
)

#: ImageNet's per-channel mean and std (torchvision's detection defaults).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: The ways the student's maps feed the detector.
FEATURES = ("last", "fpn")
#: The detection datasets and the options of each (beside the kind's own).
DETECTION_DATASETS = {"voc2007": ("root", "train_split", "test_split")}
#: The one line for a missing optional extra.
EXTRA_MISSING = "detection needs torchmetrics and pycocotools: pip install 'kt-bench[detection]'"
#: The unit's checkpoint, in its folder.
CHECKPOINT = "detector.pt"
#: What the checkpoint holds.
CHECKPOINT_KEYS = ("model", "optimizer", "scaler", "epoch", "options")
#: Options that do not change a unit's result (a resumed run may change them).
RUN_ONLY = ("eval_batch_size", "workers")
#: Anchor sizes (pixels) and aspect ratios of Faster R-CNN (Ren et al., 2015).
ANCHOR_SIZES = (32, 64, 128, 256, 512)
ASPECT_RATIOS = (0.5, 1.0, 2.0)
#: The learning rate's fraction at the start of the warm-up (torchvision's reference).
WARMUP_FACTOR = 1e-3
#: The side of the blank images that probe a student's taps.
PROBE_SIDE = 64
#: Regions per image the box head sees in training and in testing (torchvision's defaults:
#: ``box_batch_size_per_image`` and ``rpn_post_nms_top_n_test``), for compute estimates.
ROIS_TRAIN, ROIS_TEST = 512, 1000
#: The width of the box head's two hidden layers (torchvision's ``TwoMLPHead`` in FasterRCNN).
BOX_HEAD_WIDTH = 1024
#: Names of stage taps: ``stage1``, ``stage2``, ... (``stage0``, the stem's output, is no stage).
STAGE_TAP = re.compile(r"stage([1-9][0-9]*)")
BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


@dataclass
class Options:
    """The fine-tuning recipe. Faster R-CNN's scales (``min_size`` 600, ``max_size`` 1000) and
    flips are Ren et al.'s; SGD with momentum 0.9, weight decay 1e-4, lr 0.02 per 16 images
    (here 0.01 for 8) and a linear warm-up over the first 1000 steps are torchvision's detection
    reference; 12 epochs with the lr divided by 10 at epochs 8 and 11 is the "1x" schedule of
    Detectron and mmdetection. ``layers``: the stage taps to use, shallow to deep (empty: the
    deepest stage for ``last``, every stage for ``fpn``). ``max_images`` > 0 keeps only the
    first that many images of each split (smoke tests). ``workers``: data-loading processes."""

    epochs: int = 12
    milestones: tuple[int, ...] = (8, 11)
    batch_size: int = 8
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup_iters: int = 1000
    min_size: int = 600
    max_size: int = 1000
    flip: bool = True
    features: str = "last"
    layers: tuple[str, ...] = ()
    fpn_channels: int = 256
    image_mean: tuple[float, ...] = IMAGENET_MEAN
    image_std: tuple[float, ...] = IMAGENET_STD
    max_images: int = 0
    eval_batch_size: int = 8
    workers: int = 4


# ---------------------------------------------------------------- checks


def require_extras() -> None:
    """A one-line error where torchmetrics or pycocotools is not installed."""
    if any(importlib.util.find_spec(name) is None for name in ("torchmetrics", "pycocotools")):
        raise KtBenchError(EXTRA_MISSING)


def check_dataset(dataset: Spec) -> None:
    """A one-line error unless ``dataset`` is a detection dataset with options it accepts."""
    accepted = DETECTION_DATASETS.get(dataset.name)
    if accepted is None:
        raise ConfigError(f"dataset '{dataset.name}' has no boxes; accepted: "
                          f"{', '.join(DETECTION_DATASETS)}")
    for key in dataset.options:
        if key not in accepted:
            raise ConfigError(f"unknown option '{key}' for dataset {dataset.name}; "
                              f"accepted: {', '.join(accepted)}")


def _require(ok: bool, problem: str) -> None:
    if not ok:
        raise ConfigError(f"detection: {problem}")


def check_options(options: Options) -> None:
    """A one-line error where ``options`` are out of range or contradict each other."""
    _require(options.features in FEATURES,
             f"features = {options.features!r}; accepted: {', '.join(FEATURES)}")
    _require(options.features == "fpn" or len(options.layers) <= 1,
             f"features = 'last' takes one layer, got {list(options.layers)}")
    for name in ("epochs", "batch_size", "eval_batch_size", "min_size", "fpn_channels"):
        _require(getattr(options, name) >= 1, f"{name} must be at least 1")
    for name in ("warmup_iters", "max_images", "workers", "momentum", "weight_decay"):
        _require(getattr(options, name) >= 0, f"{name} must not be negative")
    _require(options.lr > 0, "lr must be positive")
    _require(options.max_size >= options.min_size, "max_size must be at least min_size")
    _require(list(options.milestones) == sorted(options.milestones)
             and all(m >= 1 for m in options.milestones),
             "milestones must be epochs (from 1) in ascending order")
    _require(len(options.image_mean) == 3 and len(options.image_std) == 3
             and all(s > 0 for s in options.image_std),
             "image_mean and image_std take 3 values (RGB), the std ones positive")


# ---------------------------------------------------------------- the backbone


class _Reached(Exception):
    """Every wanted tap is recorded: the rest of the student's forward pass is not needed."""


def record_taps(student: nn.Module, taps: Sequence[str], images: torch.Tensor
                ) -> dict[str, torch.Tensor]:
    """The values of ``taps`` as the student's forward pass on ``images`` makes them; the pass
    stops once every one is recorded."""
    tap_map = student.tap_map
    recorder = TapRecorder(student, tap_map, taps)
    modules = dict(student.named_modules())
    seen: set[str] = set()

    def stop_after(tap: str) -> Callable[..., None]:
        def hook(module: nn.Module, inputs: Any, output: Any) -> None:
            seen.add(tap)
            if len(seen) == len(recorder.wanted):
                raise _Reached
        return hook

    # registered after the recorder's hooks on the same modules, so they run after them
    handles = [modules[tap_map[tap].partition(":")[0]].register_forward_hook(stop_after(tap))
               for tap in recorder.wanted]
    try:
        student(images)
    except _Reached:
        pass
    finally:
        recorder.remove()
        for handle in handles:
            handle.remove()
    values = recorder.collect(images)  # collect wants the logits, which were never computed
    return {tap: values[tap] for tap in recorder.wanted}


def _model_name(student: nn.Module) -> str:
    return type(student).__name__


def _taps_of(student: nn.Module) -> str:
    return ", ".join(sorted(getattr(student, "tap_map", {}))) or "(none)"


def _check_input_channels(student: nn.Module) -> None:
    channels = input_channels(student)
    if channels is not None and channels != 3:
        raise KtBenchError(f"model {_model_name(student)} takes {channels}-channel images; "
                           "detection images are RGB (3 channels)")


def probe_shapes(student: nn.Module, taps: Sequence[str]) -> dict[str, tuple[int, ...]]:
    """The shapes of ``taps`` on one blank RGB image of side :data:`PROBE_SIDE`."""
    _check_input_channels(student)
    was_training = student.training
    student.eval()
    try:
        with torch.no_grad():
            values = record_taps(student, taps, torch.zeros(1, 3, PROBE_SIDE, PROBE_SIDE))
    except RuntimeError as exc:
        raise KtBenchError(f"model {_model_name(student)} cannot run on {PROBE_SIDE}x"
                           f"{PROBE_SIDE} RGB images: {first_line(exc)}") from None
    finally:
        student.train(was_training)
    return {tap: tuple(value.shape) for tap, value in values.items()}


def _stage_number(tap: str) -> int:
    match = STAGE_TAP.fullmatch(tap)
    return int(match.group(1)) if match else -1


def choose_taps(student: nn.Module, options: Options) -> tuple[list[str], list[int]]:
    """The taps (shallow to deep) whose maps feed the detector, and their channels; a one-line
    error naming the model, the tap and the taps it has where a wanted tap is missing or is no
    (B, C, H, W) map."""
    name, tap_map = _model_name(student), getattr(student, "tap_map", None) or {}
    stages = sorted((t for t in tap_map if _stage_number(t) > 0), key=_stage_number)
    wanted = list(options.layers) or stages
    missing = [t for t in wanted if t not in tap_map] or ([] if wanted else ["stage1"])
    if missing:
        raise KtBenchError(f"model {name} has no tap '{missing[0]}' for detection; "
                           f"its taps: {_taps_of(student)}")
    shapes = probe_shapes(student, wanted)
    maps = [t for t in wanted if len(shapes[t]) == 4]
    flat = [t for t in wanted if t not in maps]
    if (options.layers and flat) or not maps:
        shown = ", ".join(f"{t} {list(shapes[t])}" for t in flat)
        raise KtBenchError(f"model {name}: tap '{flat[0]}' is no (B, C, H, W) feature map, "
                           f"which detection needs ({shown}); its taps: {_taps_of(student)}")
    if options.features == "last":
        maps = maps[-1:]
    else:  # shallow to deep: largest map first
        maps.sort(key=lambda t: -shapes[t][2] * shapes[t][3])
    return maps, [shapes[t][1] for t in maps]


class TapBackbone(nn.Module):
    """The student as a detection backbone: its maps at ``taps`` as an ordered dict keyed
    ``"0"``, ``"1"``, ... (shallow to deep). Its BatchNorm layers stay in eval mode."""

    def __init__(self, student: nn.Module, taps: Sequence[str], out_channels: int) -> None:
        super().__init__()
        self.student = student
        self.taps = tuple(taps)
        self.out_channels = out_channels

    def forward(self, images: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        """The tap maps of a batch of normalised images."""
        values = record_taps(self.student, self.taps, images)
        return OrderedDict((str(i), values[tap]) for i, tap in enumerate(self.taps))

    def train(self, mode: bool = True) -> TapBackbone:
        """Set training ``mode``, BatchNorm layers excepted (their statistics stay frozen)."""
        super().train(mode)
        for module in self.modules():
            if isinstance(module, BATCH_NORMS):
                module.eval()
        return self


class FpnBackbone(nn.Module):
    """A feature pyramid over a :class:`TapBackbone`'s maps, with a max-pooled extra level."""

    def __init__(self, body: TapBackbone, in_channels: Sequence[int], out_channels: int
                 ) -> None:
        super().__init__()
        self.body = body
        self.fpn = FeaturePyramidNetwork(list(in_channels), out_channels, LastLevelMaxPool())
        self.out_channels = out_channels

    def forward(self, images: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        """The pyramid's maps, keyed as the body's plus ``"pool"``."""
        return self.fpn(self.body(images))


def build_backbone(student: nn.Module, options: Options
                   ) -> tuple[nn.Module, list[str], tuple[tuple[int, ...], ...]]:
    """The backbone on ``student`` that ``options.features`` asks for, the names of its maps
    that regions are pooled from, and the anchor sizes of each of its levels."""
    taps, channels = choose_taps(student, options)
    body = TapBackbone(student, taps, channels[-1])
    names = [str(i) for i in range(len(taps))]
    if options.features == "fpn":
        sizes = tuple((ANCHOR_SIZES[0] * 2**i,) for i in range(len(taps) + 1))
        return FpnBackbone(body, channels, options.fpn_channels), names, sizes
    return body, names, (ANCHOR_SIZES,)


def build_detector(student: nn.Module, options: Options) -> FasterRCNN:
    """A Faster R-CNN for the VOC classes on ``student`` (which becomes part of it) as
    ``options.features`` says; its new layers drawn from torch's global generator."""
    backbone, names, sizes = build_backbone(student, options)
    anchors = AnchorGenerator(sizes, (ASPECT_RATIOS,) * len(sizes))
    return FasterRCNN(backbone, num_classes=len(VOC_CLASSES) + 1, min_size=options.min_size,
                      max_size=options.max_size, image_mean=list(options.image_mean),
                      image_std=list(options.image_std), rpn_anchor_generator=anchors,
                      box_roi_pool=MultiScaleRoIAlign(names, output_size=7, sampling_ratio=2))


# ---------------------------------------------------------------- data


def dataset_folder(dataset: Spec, root: str | None) -> Path:
    """The VOC 2007 folder of ``dataset`` (its ``root`` option, else ``<data root>/voc``)."""
    given = dataset.options.get("root")
    return voc_folder(Path(given).expanduser() if given else data_root(root) / "voc")


def _splits(dataset: Spec) -> tuple[str, str]:
    return (dataset.options.get("train_split", "trainval"),
            dataset.options.get("test_split", "test"))


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int, flip: bool
                  ) -> list[list[tuple[int, bool]]]:
    """One epoch's batches of (image index, flip): an order and flips fixed by (seed, epoch)."""
    gen = torch.Generator().manual_seed(derived_seed(seed, 1, epoch))
    order = torch.randperm(n, generator=gen).tolist()
    flips = (torch.rand(n, generator=gen) < 0.5).tolist() if flip else [False] * n
    pairs = list(zip(order, flips, strict=True))
    return [pairs[start:start + batch_size] for start in range(0, n, batch_size)]


def _collate(items: list[tuple[torch.Tensor, dict[str, torch.Tensor]]]
             ) -> tuple[tuple, tuple]:
    images, targets = zip(*items, strict=True)
    return images, targets


def make_loader(dataset: VocDetection, batches: list[list[tuple[int, bool]]], workers: int,
                device: torch.device) -> DataLoader:
    """A loader of (images, targets) tuples in ``batches``."""
    return DataLoader(dataset, batch_sampler=batches, collate_fn=_collate,
                      num_workers=workers, pin_memory=device.type == "cuda")


def _to(device: torch.device, images: tuple, targets: tuple) -> tuple[list, list]:
    return ([image.to(device, non_blocking=True) for image in images],
            [{k: v.to(device, non_blocking=True) for k, v in t.items()} for t in targets])


# ---------------------------------------------------------------- training


def learning_rate(options: Options, epoch: int, step: int, steps: int) -> float:
    """The lr of ``step`` (of ``steps``) in ``epoch`` (from 0): a linear warm-up through the
    first epoch's first ``warmup_iters`` steps, then divided by 10 at each milestone."""
    lr = options.lr * 0.1 ** sum(epoch >= m for m in options.milestones)
    warmup = min(options.warmup_iters, steps - 1)
    if epoch == 0 and step < warmup:
        alpha = step / warmup
        lr *= WARMUP_FACTOR * (1 - alpha) + alpha
    return lr


def train_epoch(model: FasterRCNN, optimizer: torch.optim.Optimizer,
                scaler: torch.amp.GradScaler, loader: DataLoader, ctx: UnitContext,
                epoch: int) -> float:
    """Train ``model`` for one epoch of ``loader``; its mean loss."""
    model.train()
    total = torch.zeros((), device=ctx.device)
    for step, (images, targets) in enumerate(loader):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(ctx.options, epoch, step, len(loader))
        images, targets = _to(ctx.device, images, targets)
        with autocast_for(ctx.device, ctx.precision):
            loss = sum(model(images, targets).values())
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        total += loss.detach().float()
    return total.item() / max(len(loader), 1)


@torch.no_grad()
def detect(model: FasterRCNN, loader: DataLoader, ctx: UnitContext) -> tuple[list, list]:
    """(predictions, targets) of every image of ``loader``, on the CPU."""
    model.eval()
    predictions, all_targets = [], []
    for images, targets in loader:
        with autocast_for(ctx.device, ctx.precision):
            outputs = model([image.to(ctx.device) for image in images])
        predictions += [{"boxes": o["boxes"].float().cpu(), "scores": o["scores"].float().cpu(),
                         "labels": o["labels"].cpu()} for o in outputs]
        all_targets += list(targets)
    return predictions, all_targets


def map50(predictions: Sequence[dict[str, torch.Tensor]],
          targets: Sequence[dict[str, torch.Tensor]]) -> float:
    """Mean AP at IoU 0.5 (a fraction; -1 where ``targets`` hold no box to score: none, or
    only ``iscrowd`` ones) of ``predictions``
    (``boxes`` xyxy, ``scores``, ``labels`` per image) against ``targets`` (``boxes``,
    ``labels``, optional ``iscrowd``: boxes to ignore), by torchmetrics on pycocotools."""
    require_extras()
    from torchmetrics.detection import MeanAveragePrecision

    metric = MeanAveragePrecision(box_format="xyxy", iou_type="bbox", iou_thresholds=[0.5],
                                  backend="pycocotools")
    metric.update(list(predictions), list(targets))
    return float(metric.compute()["map_50"])


def percent_map50(predictions: Sequence[dict[str, torch.Tensor]],
                  targets: Sequence[dict[str, torch.Tensor]], dataset: str, split: str) -> float:
    """:func:`map50` in percent; a one-line error where no box of ``split`` of ``dataset`` can
    be scored (torchmetrics' -1: every one is difficult, so none counts)."""
    score = map50(predictions, targets)
    if score < 0:
        raise KtBenchError(f"the {split} split of {dataset} has no box to score (every one is "
                           "difficult)")
    return score * 100


def recipe(options: Options) -> dict[str, Any]:
    """The options that decide a unit's result, as plain data (kept in its checkpoint)."""
    return Detection().result_options(options)


def _restorer(model: nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
              options: Options) -> Callable[[dict[str, Any]], None]:
    """Loads a checkpoint into the three, or raises leaving them as they were."""

    def apply(state: dict[str, Any]) -> None:
        if state["options"] != recipe(options):
            raise DamagedFileError("written by another detection recipe")
        if not isinstance(state["epoch"], int) or not 0 <= state["epoch"] <= options.epochs:
            raise DamagedFileError(f"its epoch is {state['epoch']!r}")
        pairs = [(model, state["model"]), (optimizer, state["optimizer"])]
        if state["scaler"]:  # a disabled scaler (no fp16) saves an empty state
            pairs.append((scaler, state["scaler"]))
        load_states(pairs)
    return apply


def resume(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
           scaler: torch.amp.GradScaler, options: Options, log: Callable[[str], None]) -> int:
    """Load checkpoint ``path`` (or its previous copy) where there is a usable one; the epochs
    it has done (0 for a fresh start)."""
    if not (path.exists() or previous_path(path).exists()):
        return 0
    state = load_checkpoint(path, CHECKPOINT_KEYS, log,
                            apply=_restorer(model, optimizer, scaler, options))
    return 0 if state is None else state["epoch"]


def _fork_rng(device: torch.device) -> AbstractContextManager[None]:
    if device.type != "cuda":
        return torch.random.fork_rng(devices=[])
    index = device.index if device.index is not None else torch.cuda.current_device()
    return torch.random.fork_rng(devices=[index])


# ---------------------------------------------------------------- compute estimate


def detector_macs(student: nn.Module, options: Options) -> tuple[float, float]:
    """Rough MACs of one training and one test image through the detector: backbone and RPN
    head at a 4:3 image of side ``min_size`` (measured at :data:`PROBE_SIDE` and scaled by
    area), the box head on :data:`ROIS_TRAIN` or :data:`ROIS_TEST` regions."""
    was_training = student.training
    with torch.random.fork_rng(devices=[]):
        backbone, _, sizes = build_backbone(student, options)
        head = RPNHead(backbone.out_channels, len(sizes[0]) * len(ASPECT_RATIOS))
    probe = torch.zeros(1, 3, PROBE_SIDE, round(PROBE_SIDE * 4 / 3))
    parts = nn.ModuleList([backbone, head]).eval()
    try:
        maps = count_macs(parts, lambda: head(list(backbone(probe).values())))
    finally:
        student.train(was_training)
    width = min(options.max_size, round(options.min_size * 4 / 3))
    maps *= options.min_size * width / (probe.shape[2] * probe.shape[3])
    per_roi = (backbone.out_channels * 7 * 7 * BOX_HEAD_WIDTH + BOX_HEAD_WIDTH**2
               + BOX_HEAD_WIDTH * (len(VOC_CLASSES) + 1) * 5)
    return maps + per_roi * ROIS_TRAIN, maps + per_roi * ROIS_TEST


def split_sizes(dataset: Spec, options: Options, root: str | None = None) -> tuple[int, int]:
    """Images in the training and test splits: counted where the data is at hand, else
    VOC 2007's; at most ``max_images`` each where that is above 0."""
    cap = options.max_images if options.max_images > 0 else math.inf
    sizes = []
    for split in _splits(dataset):
        try:
            n = len(split_ids(dataset_folder(dataset, root), split))
        except KtBenchError:
            n = VOC2007_SIZES.get(split, VOC2007_SIZES["test"])
        sizes.append(int(min(n, cap)))
    return sizes[0], sizes[1]


# ---------------------------------------------------------------- the kind


@register_kind
class Detection(DownstreamKind):
    """Faster R-CNN fine-tuning of the student on VOC 2007; mAP@0.5 (percent) on its test set."""

    name = "detection"
    Options = Options
    metrics = ("map50",)
    run_only = RUN_ONLY
    source = ("Faster R-CNN (Ren et al., 2015) on torchvision's FasterRCNN, fine-tuned with "
              "torchvision's detection reference recipe (SGD, lr 0.02 per 16 images, warm-up) "
              "on the 12-epoch 1x schedule; mAP@0.5 by torchmetrics/pycocotools")

    def check(self, dataset: Spec, options: Options) -> None:
        """The dataset is a detection one and the options hold (the ``detection`` extra is
        needed by :meth:`run` only, so a grid with a detection table loads without it)."""
        check_dataset(dataset)
        check_options(options)

    def flops(self, student: nn.Module, student_shape: tuple[int, int, int], dataset: Spec,
              options: Options) -> float:
        """3x the forward FLOPs per training image and epoch, 1x per test image."""
        n_train, n_test = split_sizes(dataset, options)
        train, test = detector_macs(student, options)
        return 2.0 * (3 * train * n_train * options.epochs + test * n_test)

    def run(self, ctx: UnitContext) -> dict[str, float]:
        """Fine-tune (resuming from ``detector.pt``), then score the test split; a one-line
        error first where the ``detection`` extra is not installed."""
        require_extras()
        options = ctx.options
        folder = dataset_folder(ctx.dataset, ctx.data_root)
        train_split, test_split = _splits(ctx.dataset)
        train_set = VocDetection(folder, train_split, True, options.max_images)
        test_set = VocDetection(folder, test_split, False, options.max_images)
        ctx.folder.mkdir(parents=True, exist_ok=True)
        with _fork_rng(ctx.device):
            torch.manual_seed(derived_seed(ctx.seed, 0))
            model = build_detector(copy.deepcopy(ctx.student), options).to(ctx.device)
            self._fine_tune(model, train_set, ctx)
            batches = [[(i, False) for i in range(start, min(start + options.eval_batch_size,
                                                              len(test_set)))]
                       for start in range(0, len(test_set), options.eval_batch_size)]
            loader = make_loader(test_set, batches, options.workers, ctx.device)
            predictions, targets = detect(model, loader, ctx)
        score = percent_map50(predictions, targets, ctx.dataset.name, test_split)
        ctx.log(f"detection: mAP@0.5 {score:.2f} on {len(test_set)} {test_split} images")
        return {"map50": score}

    def _fine_tune(self, model: FasterRCNN, train_set: VocDetection, ctx: UnitContext) -> None:
        options, path = ctx.options, ctx.folder / CHECKPOINT
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad],
                                    lr=options.lr, momentum=options.momentum,
                                    weight_decay=options.weight_decay)
        scaler = torch.amp.GradScaler(ctx.device.type, enabled=ctx.precision == "fp16")
        done = resume(path, model, optimizer, scaler, options, ctx.log)
        if done:
            ctx.log(f"detection: resuming after epoch {done}/{options.epochs}")
        for epoch in range(done, options.epochs):
            torch.manual_seed(derived_seed(ctx.seed, 2, epoch))  # the RPN's and heads' sampling
            batches = epoch_batches(len(train_set), options.batch_size, ctx.seed, epoch,
                                    options.flip)
            loader = make_loader(train_set, batches, options.workers, ctx.device)
            loss = train_epoch(model, optimizer, scaler, loader, ctx, epoch)
            if not math.isfinite(loss):
                raise KtBenchError(f"detection fine-tuning diverged in epoch {epoch + 1} (mean "
                                   f"loss {loss}); try a lower lr")
            save_checkpoint(path, {"model": model.state_dict(), "optimizer":
                                   optimizer.state_dict(), "scaler": scaler.state_dict(),
                                   "epoch": epoch + 1, "options": recipe(options)})
            ctx.log(f"detection: epoch {epoch + 1}/{options.epochs}, loss {loss:.4f}")
