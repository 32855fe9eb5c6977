"""``linear_probe``: the frozen student's pooled features on another dataset, and a linear
classifier trained on them; its top-1 on that dataset's test split says how well the
representation transfers (the CRD paper's transferability experiment: WRN-40-2 -> WRN-16-2 on
CIFAR-100, probed on STL-10 and Tiny-ImageNet at 32x32).

The features of both splits are computed once, without augmentation, and cached in the unit's
``features.pt`` (recomputed only when the student's weights, the dataset or the tap change); the
classifier is checkpointed after every epoch in ``probe.pt``, so a stopped probe resumes and
ends with the same weights as one never stopped.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from kt_bench.core.errors import ConfigError, KtBenchError
from kt_bench.core.options import Spec
from kt_bench.core.seeds import derived_seed
from kt_bench.data import DataBundle, dataset_info, load_dataset
from kt_bench.downstream.kinds import DownstreamKind, UnitContext, register_kind
from kt_bench.downstream.student import (
    autocast_for,
    input_channels,
    pooled,
    weights_digest,
)
from kt_bench.models.macs import forward_macs
from kt_bench.models.taps import TapRecorder
from kt_bench.training.checkpoints import load_checkpoint, remove_checkpoint, save_checkpoint

#: The cached features of a unit, and the linear classifier's last checkpoint.
FEATURES, CHECKPOINT = "features.pt", "probe.pt"
#: What each of them holds.
FEATURE_KEYS = ("key", "train", "train_labels", "test", "test_labels", "num_classes")
CHECKPOINT_KEYS = ("features", "epoch", "classifier", "optimizer", "schedule")


@dataclass(frozen=True)
class ProbeOptions:
    """The probe's recipe. The CRD paper states no optimiser settings for its linear probes;
    the defaults are those of the DCD authors' re-run of that experiment
    (giakoumoglou/distillers ``cifar/transfer_student.py``): SGD, lr 0.05, momentum 0.9, weight
    decay 5e-4, batch 64, 120 epochs, lr x0.1 at epochs 30, 60 and 90; the last epoch's
    top-1 is reported. The features are of un-augmented images (computed once)."""

    #: The tap whose output, averaged over its positions, is the feature vector (``pool``: the
    #: layer before the logits, as the CRD paper probes).
    tap: str = "pool"
    epochs: int = 120
    batch_size: int = 64
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    milestones: tuple[int, ...] = (30, 60, 90)
    gamma: float = 0.1
    #: Images per batch while the features are computed.
    eval_batch_size: int = 256


def check_probe_options(options: ProbeOptions, where: str) -> None:
    """A one-line ConfigError naming ``where.key`` for an option out of its range."""
    checks = [(options.epochs >= 1, "epochs", "an integer >= 1"),
              (options.batch_size >= 1, "batch_size", "an integer >= 1"),
              (options.eval_batch_size >= 1, "eval_batch_size", "an integer >= 1"),
              (options.lr > 0, "lr", "a number > 0"),
              (0 <= options.momentum < 1, "momentum", "a number in [0, 1)"),
              (options.weight_decay >= 0, "weight_decay", "a number >= 0"),
              (all(1 <= m < options.epochs for m in options.milestones), "milestones",
               f"epochs m with 1 <= m < epochs ({options.epochs})"),
              (bool(options.tap), "tap", "a tap name, e.g. pool or stage3")]
    for ok, key, accepted in checks:
        if not ok:
            raise ConfigError(f"{where}.{key} = {getattr(options, key)!r} is invalid; "
                              f"accepted: {accepted}")


@torch.no_grad()
def extract(student: nn.Module, tap: str, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
            device: torch.device, precision: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The pooled ``tap`` features (float32, CPU) of every image of ``batches`` and their
    labels, the student in eval mode on ``device`` (under ``precision``'s autocast)."""
    student.eval()
    recorder = TapRecorder(student, student.tap_map, [tap])
    feats, labels = [], []
    try:
        for x, y in batches:
            with autocast_for(device, precision):
                taps = recorder.collect(student(x.to(device)))
            feats.append(pooled(taps[tap]).float().cpu())
            labels.append(y.cpu())
    finally:
        recorder.remove()
    return torch.cat(feats), torch.cat(labels).long()


def _features_key(ctx: UnitContext) -> str:
    """What the cached features depend on: the student's weights, the dataset, the tap."""
    return json.dumps({"weights": weights_digest(ctx.student), "dataset": ctx.dataset.to_dict(),
                       "tap": ctx.options.tap, "precision": ctx.precision}, sort_keys=True)


def cached_features(ctx: UnitContext, load: Callable[[], DataBundle]) -> dict[str, Any]:
    """The unit's features (``train``, ``train_labels``, ``test``, ``test_labels``) and the
    dataset's ``num_classes``, read from ``features.pt`` when it holds those of this student,
    dataset and tap; else the dataset is loaded (``load()``), its features computed and
    written there (and a classifier trained on other features forgotten)."""
    path, key = ctx.folder / FEATURES, _features_key(ctx)
    cached = load_checkpoint(path, FEATURE_KEYS, ctx.log, otherwise="computing them again")
    if cached is not None and cached["key"] == key:
        return cached
    data = load()
    wanted = input_channels(ctx.student)
    if wanted is not None and data.in_channels != wanted:
        raise KtBenchError(f"dataset {ctx.dataset.label} has {data.in_channels}-channel "
                           f"images; the student takes {wanted}-channel images")
    student = ctx.student.to(ctx.device)
    size = ctx.options.eval_batch_size
    train, train_y = extract(student, ctx.options.tap, data.train_in_order(size, ctx.device),
                             ctx.device, ctx.precision)
    test, test_y = extract(student, ctx.options.tap, data.test_batches(size, ctx.device),
                           ctx.device, ctx.precision)
    state = {"key": key, "train": train, "train_labels": train_y, "test": test,
             "test_labels": test_y, "num_classes": data.num_classes}
    remove_checkpoint(ctx.folder / CHECKPOINT)  # a classifier of other features
    save_checkpoint(path, state)
    ctx.log(f"features: {tuple(train.shape)} train, {tuple(test.shape)} test, cached in {path}")
    return state


def _optimizer(classifier: nn.Linear, options: ProbeOptions):
    sgd = torch.optim.SGD(classifier.parameters(), lr=options.lr, momentum=options.momentum,
                          weight_decay=options.weight_decay)
    schedule = torch.optim.lr_scheduler.MultiStepLR(sgd, list(options.milestones), options.gamma)
    return sgd, schedule


def train_probe(features: dict[str, torch.Tensor], num_classes: int, options: ProbeOptions,
                seed: int, checkpoint: Path | None = None,
                log: Callable[[str], None] = print) -> nn.Linear:
    """A linear classifier trained on ``features`` with ``options``' recipe, seeded by
    ``seed`` (the caller's random state is left alone); with ``checkpoint``, resumed from it
    (or its previous copy) and saved to it after every epoch."""
    x, y = features["train"], features["train_labels"]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derived_seed(seed, 7))
        classifier = nn.Linear(x.shape[1], num_classes)
    sgd, schedule = _optimizer(classifier, options)
    start = 0
    saved = (load_checkpoint(checkpoint, CHECKPOINT_KEYS, log,
                             otherwise="training the classifier from scratch")
             if checkpoint is not None else None)
    if saved is not None and saved["features"] == features["key"]:
        classifier.load_state_dict(saved["classifier"])
        sgd.load_state_dict(saved["optimizer"])
        schedule.load_state_dict(saved["schedule"])
        start = int(saved["epoch"])
    for epoch in range(start, options.epochs):
        order = torch.randperm(len(y), generator=torch.Generator().manual_seed(
            derived_seed(seed, 8, epoch)))
        for i in range(0, len(y), options.batch_size):
            idx = order[i:i + options.batch_size]
            loss = F.cross_entropy(classifier(x[idx]), y[idx])
            sgd.zero_grad(set_to_none=True)
            loss.backward()
            sgd.step()
        schedule.step()
        if checkpoint is not None:
            save_checkpoint(checkpoint, {
                "features": features["key"], "epoch": epoch + 1,
                "classifier": classifier.state_dict(), "optimizer": sgd.state_dict(),
                "schedule": schedule.state_dict()})
    return classifier


def top1(classifier: nn.Linear, x: torch.Tensor, y: torch.Tensor) -> float:
    """Top-1 accuracy (%) of ``classifier`` on features ``x`` with labels ``y``."""
    with torch.no_grad():
        return 100.0 * classifier(x).argmax(1).eq(y).float().mean().item()


@register_kind
class LinearProbe(DownstreamKind):
    """A linear classifier on the frozen student's pooled features (see the module)."""

    name = "linear_probe"
    Options = ProbeOptions
    metrics = ("top1",)
    run_only = ("eval_batch_size",)
    source = ("CRD (Tian et al., ICLR 2020), transferability of representations: frozen "
              "network, linear classifier on the layer before the logits; recipe of the DCD "
              "authors' re-run (giakoumoglou/distillers cifar/transfer_student.py)")

    def check(self, dataset: Spec, options: Any) -> None:
        """The dataset is a registered classification dataset with options its loader takes;
        the options are in range."""
        dataset_info(dataset)
        check_probe_options(options, "options")

    def flops(self, student: nn.Module, student_shape: tuple[int, int, int], dataset: Spec,
              options: Any) -> float:
        """One forward pass of the student over both splits (the classifier is negligible)."""
        info = dataset_info(dataset)
        shape = (info.in_channels, info.image_size, info.image_size)
        # the test split's size is not known without loading: counted as large as the training
        return 2.0 * forward_macs(student, shape) * 2 * info.n_train

    def run(self, ctx: UnitContext) -> dict[str, float]:
        """Features (cached: the dataset is loaded only to compute them), the classifier
        (resumed), its top-1 on the test features."""
        features = cached_features(ctx, lambda: load_dataset(ctx.dataset, ctx.data_root))
        classifier = train_probe(features, int(features["num_classes"]), ctx.options,
                                 ctx.seed, ctx.folder / CHECKPOINT, ctx.log)
        return {"top1": top1(classifier, features["test"], features["test_labels"])}

