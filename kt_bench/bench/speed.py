"""``kt-bench bench``: training throughput of a plain PyTorch loop, the engine solo, the
engine's cohort and the cohort trained fused, measured in one run, with the ratios between them
and each as a fraction of the bare-model limit, in every precision asked for (fp32 and bf16 by
default).

(a) *plain*: the loop the common reference repositories write: a DataLoader with worker
processes applying torchvision's per-image transforms (PIL crop with padding, flip, to tensor,
normalise), the teacher's forward without gradients, the student's forward, the method's loss,
backward and step, one method after another; the method is set up and given each step's batch
(labels, sample indices, epoch, seed) as the engine does, so every method can be timed.
(b) *solo*: the kt-bench engine, one method after another. (c) *cohort*: the engine training
all methods' students in one pass. (d) *fused cohort*: the same cohort with its students fused
into one network (``train_cohort(..., fuse=True)``); where fusion is refused, its figures are
None and the bench says why. A method with an initialisation stage (AB, FT, FSP) is
timed in its main stage, the one a run spends nearly all its epochs in: every loop skips
the initialisation stage.
Each is timed per epoch; the first ``warmup`` epochs are dropped and the fastest of the rest
is used (other work on the machine only ever adds time, so the fastest epoch is the least
disturbed one, and every figure is taken the same way). The *bare-model limit* is the teacher's
forward plus the student's forward, backward and SGD step on batches already made, with no
loss terms, taps or data path: no loop can beat it; the fused cohort's own limit is the same
with the students' bare steps taken as one fused step. Networks start from their random
initialisation (speed does not depend on it).

The data: random CIFAR-shaped uint8 images, or a dataset held in memory (uint8, augmented
through PIL in the plain loop as the reference repositories do, or float, like the embedded
digits the demo trains on, augmented per image by torch ops there).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import resource
import statistics
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from kt_bench.api.method import METHODS, Batch, Method, build_method
from kt_bench.core.errors import KtBenchError
from kt_bench.core.options import Spec
from kt_bench.core.precision import PRECISION_NAMES
from kt_bench.core.seeds import derived_seed
from kt_bench.data.augment import random_crop_flip
from kt_bench.data.bundle import Split, TensorData, channel_stats, load_dataset
from kt_bench.models import build_model
from kt_bench.training.device import (
    channels_last,
    compile_model,
    make_accelerator,
    sync_device,
    training_memory_format,
)
from kt_bench.training.engine import fusion_refusal, train, train_cohort
from kt_bench.training.fusion import FusedStudents, NotFusable, fused_memory_format
from kt_bench.training.fusion_speed import bare_students, fused_bare_step
from kt_bench.training.hooks import ProgressBar
from kt_bench.training.lifecycle import (
    TeacherTaps,
    Trainee,
    base_ce_weight,
    in_layout,
    plan_epoch,
    prepare_on_probe,
    step_loss,
)
from kt_bench.training.recipe import Recipe

DEMO_METHODS = ["student", "kd", "fitnet", "at", "nst_linear", "nst_poly", "nst_gauss",
                "kd+nst_poly"]


@dataclass
class BenchConfig:
    """What to measure."""

    teacher: str | Spec = "resnet56"
    student: str | Spec = "resnet20"
    methods: tuple[str, ...] = tuple(DEMO_METHODS)
    #: A dataset held in memory; None: random CIFAR-shaped data.
    dataset: str | Spec | None = None
    batch_size: int = 64
    steps: int = 20
    warmup: int = 1
    repeats: int = 3
    device: str = "auto"
    #: Each precision is measured in turn (``no``: fp32), every figure against its own limit.
    precisions: tuple[str, ...] = ("no", "bf16")
    workers: int | None = None
    nst: bool = True
    compile: bool = False
    #: Also time a 1-epoch ``kt-bench run`` of the demo from launch to its first step.
    startup: bool = True
    #: Also time (d), the cohort trained as one fused network, and its bare limit.
    fused: bool = True


def demo_setting() -> dict[str, Any]:
    """The demo grid's setting as :class:`BenchConfig` fields: its teacher and student, its
    dataset, its methods and its batch size (resnet20 -> resnet8 at width 0.5 on the
    embedded digits at 16x16, the 8 demo methods, batch 64)."""
    from kt_bench.api.plugins import load_builtin_methods
    from kt_bench.sweep.config import load_grid

    load_builtin_methods()  # the grid's method options name methods it checks are registered
    grid = load_grid("demo")
    (pair,), (dataset,) = grid.pairs, grid.datasets
    return {"teacher": pair.teacher, "student": pair.student, "dataset": dataset,
            "methods": tuple(grid.methods), "batch_size": grid.recipe.batch_size}


def bench_method(name: str) -> Method:
    """Method ``name`` as the bench times it: its main stage only. An initialisation stage
    (AB's, FT's, FSP's ``init_epochs``) is skipped in every loop, so every timed epoch is
    one of the main stage, the stage a run spends nearly all its epochs in."""
    method = build_method(name)
    for part in method.modules():  # a combination's members too
        if isinstance(part, Method):
            part.needs = dataclasses.replace(part.needs, init=None)
    return method


def initialising_methods(names: tuple[str, ...]) -> list[str]:
    """Those of ``names`` whose method has an initialisation stage (which the bench skips)."""
    return [m for m in names if build_method(m).needs.init is not None]


def expand_methods(names: list[str]) -> tuple[str, ...]:
    """``names`` with ``all`` replaced by every registered method (each name once)."""
    if "all" in names and "all" not in METHODS:
        at = names.index("all")
        names = [*names[:at], *METHODS.names(), *names[at + 1:]]
    return tuple(dict.fromkeys(names))


def bench_recipe(cfg: BenchConfig) -> Recipe:
    """The recipe of every loop: ``warmup + repeats`` epochs at a constant rate."""
    return Recipe(epochs=cfg.warmup + cfg.repeats, batch_size=cfg.batch_size, lr=0.05,
                  schedule="constant", eval_batch_size=64)


def model_spec(value: str | Spec, what: str) -> Spec:
    """``value`` (a name or a :class:`Spec`) as a :class:`Spec`."""
    return Spec.parse(value, what)


def random_cifar(n: int, num_classes: int = 10, seed: int = 0) -> TensorData:
    """``n`` random uint8 32x32 RGB images with CIFAR's augmentation."""
    gen = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=gen)
    labels = torch.randint(0, num_classes, (n,), generator=gen)
    mean, std = channel_stats(images)
    test = Split(images[:64], labels[:64])
    return TensorData("random-cifar", Split(images, labels), test, num_classes,
                      lambda x, g: random_crop_flip(x, g, pad=4, flip=True), mean, std)


def crop_flip_of(data: TensorData) -> tuple[int, bool]:
    """The padding of the random crop and whether images flip in ``data``'s augmentation:
    read from a :func:`random_crop_flip` augmentation, none without augmentation, CIFAR's
    (4, flip) for any other kind."""
    aug = data.augment
    if aug is None:
        return 0, False
    if isinstance(aug, functools.partial) and aug.func is random_crop_flip:
        return int(aug.keywords.get("pad", 4)), bool(aug.keywords.get("flip", True))
    return 4, True


class _PILDataset(torch.utils.data.Dataset):
    """uint8 images served the torchvision way: PIL image, per-image transforms; each item
    (image, label, index), the index for methods that read it (CRD), as RepDistiller's
    instance-sampling datasets serve it."""

    def __init__(self, data: TensorData) -> None:
        from torchvision import transforms as T

        self.images = data.train.images.permute(0, 2, 3, 1).numpy()  # N, H, W, C as on disk
        if self.images.shape[-1] == 1:  # PIL takes a one-channel image as (H, W)
            self.images = self.images[..., 0]
        self.labels = data.train.labels.tolist()
        pad, flip = crop_flip_of(data)  # the engine's augmentation of the same data
        steps = [T.RandomCrop(self.images.shape[1], padding=pad)] if pad else []
        steps += [T.RandomHorizontalFlip()] if flip else []
        steps += [T.ToTensor(), T.Normalize(data.mean, data.std)]
        if data.resize_to is not None:  # as the engine resizes its batches
            steps.append(T.Resize(data.resize_to, antialias=False))
        self.transform = T.Compose(steps)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        from PIL import Image

        return self.transform(Image.fromarray(self.images[i])), self.labels[i], i


class _FloatDataset(torch.utils.data.Dataset):
    """Float images (normalised, as held in memory) served one at a time, each item (image,
    label, index). PIL takes no float images, so this is the loop a reference repository
    would write over float tensors: the dataset's crop and flip done per image by torch
    ops in the worker processes (then the resize the dataset's batches get, if any)."""

    def __init__(self, data: TensorData) -> None:
        self.images, self.labels = data.train.images, data.train.labels.tolist()
        self.pad, self.flip = crop_flip_of(data)
        self.size = data.resize_to

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        x = self.images[i]
        if self.pad:
            h, w = x.shape[-2:]
            top, left = torch.randint(0, 2 * self.pad + 1, (2,)).tolist()
            x = F.pad(x, (self.pad,) * 4)[:, top:top + h, left:left + w]
        if self.flip and torch.rand(()) < 0.5:
            x = x.flip(-1)
        if self.size is not None and x.shape[-1] != self.size:
            x = F.interpolate(x[None], size=(self.size, self.size), mode="bilinear",
                              align_corners=False)[0]
        return x.contiguous(), self.labels[i], i


def _epoch_seconds(seconds: list[float], warmup: int) -> float:
    """The fastest epoch time after the first ``warmup`` epochs."""
    return min(seconds[warmup:] or seconds)


def _plain_trainee(cfg: BenchConfig, data: TensorData, method: Method, teacher: torch.nn.Module
                   ) -> Trainee:
    """The student and ``method``, the method prepared as the engine prepares it, in the
    default memory layout of a reference loop."""
    student = build_model(cfg.student, data.num_classes, data.in_channels, data.image_size)
    prepare_on_probe(method, student, teacher, data.train_labels(), data.num_classes,
                     data.probe())
    return Trainee(student, method)


def _plain_loader(cfg: BenchConfig, data: TensorData, device: torch.device, workers: int
                  ) -> torch.utils.data.DataLoader:
    """The reference loop's DataLoader: shuffled (image, label, index) batches."""
    dataset = (_PILDataset(data) if data.train.images.dtype == torch.uint8
               else _FloatDataset(data))
    return torch.utils.data.DataLoader(dataset, batch_size=cfg.batch_size,
                                       shuffle=True, num_workers=workers, drop_last=True,
                                       pin_memory=device.type == "cuda")


def plain_loop(cfg: BenchConfig, data: TensorData, method_name: str, accelerator,
               workers: int) -> list[float]:
    """Epoch times of the reference-style loop for one method in its main stage (forward
    passes under the accelerator's autocast, as a reference loop given the same precision
    would run them). The method is set up, weighted and given each step's :class:`Batch`
    (labels, indices, epoch, seed) as the engine does; only the loop around it is the
    reference repositories'."""
    device = accelerator.device
    recipe = bench_recipe(cfg)
    torch.manual_seed(0)
    teacher = build_model(cfg.teacher, data.num_classes, data.in_channels, data.image_size)
    teacher = teacher.to(device).eval().requires_grad_(False)
    method = bench_method(method_name)
    trainee = _plain_trainee(cfg, data, method, teacher).to(device)
    taught = TeacherTaps(teacher, [method]) if method.needs_teacher else None
    opt = torch.optim.SGD(trainee.parameters(), lr=recipe.lr, momentum=recipe.momentum,
                          nesterov=recipe.nesterov, weight_decay=recipe.weight_decay)
    loader = _plain_loader(cfg, data, device, workers)
    base_ce = base_ce_weight(method, recipe.ce_weight)
    times = []
    for epoch in range(recipe.epochs):
        trainee.train()
        plan = plan_epoch(method, epoch, recipe.epochs, base_ce)
        t0 = time.perf_counter()
        for step, (x, y, idx) in enumerate(loader, 1):
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            # the step's seed from the engine's stream of them, for seed 0
            batch = plan.batch(y, idx.to(device), derived_seed(0, 5, epoch, step))
            t_taps = (TeacherTaps.of(method, taught.read(x, [method], accelerator.autocast))
                      if taught is not None else None)
            with accelerator.autocast():
                loss = step_loss(trainee, x, batch, t_taps, plan).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
        sync_device(device)
        times.append(time.perf_counter() - t0)
    return times


def _epoch_times(cfg: BenchConfig, data: TensorData, device: torch.device, step,
                 prepare: bool) -> list[float]:
    """Epoch times of ``step(x)`` over the engine's batches (augmented, normalised, in the
    engine's memory layout). With ``prepare`` the batches are made before the clock starts,
    so only ``step`` is timed; without, making them is what is timed."""
    times = []
    for epoch in range(cfg.warmup + cfg.repeats):
        batches = (channels_last(x) for x, _ in data.train_batches(epoch, 0, cfg.batch_size,
                                                                     device))
        if prepare:
            batches = list(batches)
        t0 = time.perf_counter()
        for x in batches:
            step(x)
        sync_device(device)
        times.append(time.perf_counter() - t0)
    return times


def teacher_forward_times(cfg: BenchConfig, data: TensorData, accelerator,
                          teacher: torch.nn.Module) -> list[float]:
    """Epoch times of ``teacher``'s forward alone, as the engine runs it (compiled if the
    engine compiled it), for the bound."""
    teacher = teacher.to(accelerator.device, memory_format=torch.channels_last).eval()

    def forward(x: torch.Tensor) -> None:
        with accelerator.autocast(), torch.inference_mode():
            teacher(x)

    return _epoch_times(cfg, data, accelerator.device, forward, prepare=True)


def bare_student_times(cfg: BenchConfig, data: TensorData, accelerator, spec: Spec
                       ) -> list[float]:
    """Epoch times of the student's bare training step on resident batches: forward,
    cross-entropy, backward and an SGD step, under the accelerator's autocast, with no loss
    terms, no taps and no data path (the batches are made before the clock starts). With the
    teacher's forward this is the limit of what any loop can reach for the pair."""
    torch.manual_seed(0)
    student = build_model(spec, data.num_classes, data.in_channels, data.image_size)
    layout = training_memory_format(student, accelerator.device)  # as the engine trains it
    student = student.to(accelerator.device, memory_format=layout)
    if cfg.compile:
        compile_model(student, layout)
    student.train()
    opt = torch.optim.SGD(student.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    labels = data.train.labels[:cfg.batch_size].to(accelerator.device)

    def step(x: torch.Tensor) -> None:
        with accelerator.autocast():
            loss = F.cross_entropy(student(in_layout(x, layout)).float(), labels[:x.shape[0]])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return _epoch_times(cfg, data, accelerator.device, step, prepare=True)


def bare_fused_times(cfg: BenchConfig, data: TensorData, accelerator, spec: Spec,
                     members: int) -> list[float]:
    """Epoch times of ``members`` students' bare training step taken as one fused step
    (:class:`~kt_bench.training.fusion.FusedStudents`): one forward pass of the fused network,
    the sum of the members' cross-entropies, one backward pass, each member's SGD step on its
    slice of the gradients; under the accelerator's autocast, on resident batches. With the
    teacher's forward this is the limit of a fused cohort. A
    :class:`~kt_bench.training.fusion.NotFusable` where the students cannot be fused."""
    device = accelerator.device
    students, _, opts = bare_students(spec, data, members, device)
    fused_layout = fused_memory_format(students, device)
    fused = FusedStudents(students, (), fused_layout)
    step = fused_bare_step(fused, fused_layout, opts, accelerator)
    labels = data.train.labels[:cfg.batch_size].to(device)
    try:
        return _epoch_times(cfg, data, device, lambda x: step(x, labels[:x.shape[0]]),
                            prepare=True)
    finally:
        fused.release()


def data_times(cfg: BenchConfig, data: TensorData, device: torch.device) -> list[float]:
    """Epoch times of the engine's data path alone (sampling, augmentation, normalisation)."""
    return _epoch_times(cfg, data, device, lambda x: None, prepare=False)


def nst_timing(device: torch.device, reps: int = 5, images: int = 64) -> dict[str, float]:
    """Forward + backward time of NST-poly at the paper's ImageNet shape (teacher 2048x7x7,
    student 1024x7x7, batch ``images``): the form chosen by shape against the direct kernel
    form."""
    gen = torch.Generator().manual_seed(0)
    f_t = torch.randn(images, 2048, 7, 7, generator=gen).to(device)
    f_s = torch.randn(images, 1024, 7, 7, generator=gen).to(device).requires_grad_(True)
    batch = Batch(torch.zeros(images, dtype=torch.long, device=device))  # NST reads no labels
    out = {}
    for form in ("auto", "kernel"):
        # through the registry, not the plugin's module: the core imports no plugin by path
        method = build_method("nst_poly", {"nst_poly": {"form": form}})
        times = []
        for _ in range(reps + 1):
            t0 = time.perf_counter()
            method.loss_terms({"feat": f_s}, {"feat": f_t}, batch)["nst_poly"].backward()
            sync_device(device)
            times.append(time.perf_counter() - t0)
            f_s.grad = None
        out[form] = statistics.median(times[1:]) * 1000
    return {"nst_auto_ms": out["auto"], "nst_kernel_ms": out["kernel"],
            "nst_speedup": out["kernel"] / out["auto"]}


def _peak_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()


def bench_data(cfg: BenchConfig) -> TensorData:
    """The bench's data: ``batch_size x steps`` training images, or as many whole batches
    as the dataset has where it has fewer (see :func:`fitted_steps`)."""
    n = cfg.batch_size * cfg.steps
    if cfg.dataset is None:
        return random_cifar(n)
    label = model_spec(cfg.dataset, "dataset").label
    data = load_dataset(cfg.dataset)
    if not isinstance(data, TensorData) or not (data.train.images.dtype == torch.uint8
                                                or data.train.images.is_floating_point()):
        raise KtBenchError(f"bench --dataset needs an image dataset held in memory (cifar10, "
                           f"cifar100, digits, synthetic), not '{label}'")
    if data.n_train < cfg.batch_size:
        raise KtBenchError(f"{label} has {data.n_train} training images; the bench needs at "
                           f"least one batch of {cfg.batch_size}")
    n = min(n, data.n_train // cfg.batch_size * cfg.batch_size)
    data.train = Split(data.train.images[:n], data.train.labels[:n])
    data.test = Split(data.test.images[:64], data.test.labels[:64])
    return data


def fitted_steps(cfg: BenchConfig, data: TensorData) -> BenchConfig:
    """``cfg`` with as many steps as ``data`` holds whole batches, where that is fewer than
    it asks for (the digits hold 1438 training images: 22 batches of 64)."""
    steps = data.n_train // cfg.batch_size
    return dataclasses.replace(cfg, steps=steps) if steps < cfg.steps else cfg


def _header(cfg: BenchConfig, data: TensorData, workers: int) -> dict[str, Any]:
    """What the bench ran: the networks, the data, the methods, the loop settings."""
    dataset = model_spec(cfg.dataset, "dataset").label if cfg.dataset else "random CIFAR"
    return {"teacher": model_spec(cfg.teacher, "teacher").label,
            "student": model_spec(cfg.student, "student").label,
            "dataset": dataset,
            "image_shape": [data.in_channels, data.image_size, data.image_size],
            "methods": list(cfg.methods), "batch_size": cfg.batch_size, "steps": cfg.steps,
            "images_per_epoch": cfg.batch_size * cfg.steps,
            "workers": workers, "compile": cfg.compile,
            "precisions": [PRECISION_NAMES[p] for p in cfg.precisions],
            "main_stage_only": initialising_methods(cfg.methods)}


def _versus_fp32(runs: dict[str, dict[str, Any]]) -> None:
    """Add each run's images/s over fp32's (bare, solo, cohort and, where both were
    measured, the fused cohort) to every run but fp32's."""
    for name, run in runs.items():
        if name == "fp32":
            continue
        for what in ("bare", "solo", "cohort", "fused"):
            mine, fp32 = run.get(f"{what}_ips"), runs["fp32"].get(f"{what}_ips")
            if mine is not None and fp32 is not None:
                run[f"{what}_vs_fp32"] = mine / fp32


def run_bench(cfg: BenchConfig) -> dict[str, Any]:
    """Measure (a) plain, (b) solo, (c) cohort and (d) fused cohort training images/s, their
    ratios, and each as a fraction of the bare-model limit, in every precision of ``cfg``;
    the NST loss timing and the start-up of a short run."""
    data = bench_data(cfg)
    fitted = fitted_steps(cfg, data)
    workers = cfg.workers if cfg.workers is not None else min(8, os.cpu_count() or 1)
    result = _header(fitted, data, workers)
    if fitted.steps != cfg.steps:
        result["steps_asked"] = cfg.steps
    cfg = fitted
    runs = {}
    for precision in cfg.precisions:
        runs[PRECISION_NAMES[precision]] = measure_precision(cfg, data, precision, workers)
    result["device"] = next(iter(runs.values()))["device"]
    result["runs"] = runs
    if "fp32" in runs:
        _versus_fp32(runs)
    if cfg.nst:
        result.update(nst_timing(make_accelerator(cfg.device, "no").device))
    if cfg.startup:  # a failed start-up run costs its own figure, not the bench's others
        result["startup"] = {}
        for p in cfg.precisions:
            try:
                result["startup"][PRECISION_NAMES[p]] = startup_timing(cfg.device, p)
            except KtBenchError as exc:
                result["startup"][PRECISION_NAMES[p]] = {"error": str(exc)}
    return result


def measure_precision(cfg: BenchConfig, data: TensorData, precision: str,
                      workers: int) -> dict[str, Any]:
    """Every figure of the bench in one precision (``no``: fp32)."""
    accelerator = make_accelerator(cfg.device, precision)
    teacher = build_model(cfg.teacher, data.num_classes, data.in_channels, data.image_size)
    result: dict[str, Any] = {"device": str(accelerator.device), "precision": precision}
    times = _loop_times(cfg, data, accelerator, teacher, workers, result)
    result.update(_limits(cfg, data, accelerator, teacher, times))
    return result


def _loop_times(cfg: BenchConfig, data: TensorData, accelerator, teacher: torch.nn.Module,
                workers: int, result: dict[str, Any]) -> dict[str, Any]:
    """The epoch seconds of the loops (``plain`` and ``solo`` per method, ``cohort`` and,
    unless ``cfg.fused`` is off, ``fused`` for all); their images/s and peak memory go into
    ``result``."""
    device, n, k = accelerator.device, cfg.batch_size * cfg.steps, len(cfg.methods)
    recipe, student = bench_recipe(cfg), model_spec(cfg.student, "student")

    _reset_peak(device)
    plain_t = [_epoch_seconds(plain_loop(cfg, data, m, accelerator, workers), cfg.warmup)
               for m in cfg.methods]
    result["plain_ips"] = k * n / sum(plain_t)
    result["plain_peak_mem_mb"] = _peak_mb(device)

    _reset_peak(device)
    solo_t = [_epoch_seconds(train(data, student, bench_method(m), recipe, 0, accelerator,
                                   teacher, compile=cfg.compile,
                                   hooks=[ProgressBar(f"solo {m}")]).epoch_s, cfg.warmup)
              for m in cfg.methods]
    result["solo_ips"] = k * n / sum(solo_t)
    result["method_ips"] = {m: {"plain": n / p, "solo": n / s}
                            for m, p, s in zip(cfg.methods, plain_t, solo_t, strict=True)}
    result["solo_peak_mem_mb"] = _peak_mb(device)

    _reset_peak(device)
    cohort = train_cohort(data, student, [bench_method(m) for m in cfg.methods], recipe, 0,
                          accelerator, teacher, compile=cfg.compile,
                          hooks=[ProgressBar("cohort")])
    errors = [r.error for r in cohort if r.error is not None]
    if errors:
        raise KtBenchError(f"the cohort failed: {errors[0]}")
    cohort_t = _epoch_seconds(cohort[0].epoch_s, cfg.warmup)
    result["cohort_ips"] = k * n / cohort_t
    result["cohort_peak_mem_mb"] = _peak_mb(device)
    times = {"plain": plain_t, "solo": solo_t, "cohort": cohort_t}
    if cfg.fused:
        times["fused"] = _fused_loop(cfg, data, accelerator, teacher, result)
    loops = [p for p in ("plain", "solo", "cohort", "fused")
             if result.get(f"{p}_peak_mem_mb") is not None]
    result["peak_mem_mb"] = max(result[f"{p}_peak_mem_mb"] for p in loops)
    return times


def fused_cohort_times(cfg: BenchConfig, data: TensorData, accelerator,
                       teacher: torch.nn.Module) -> tuple[list[float] | None, str | None]:
    """Epoch times of (d), the cohort of ``cfg``'s methods trained as one fused network, and
    None; or None and why, where fusion is refused (``cfg.compile``, several processes, fp16,
    fewer than two methods), the students cannot be fused (the cohort then trains unfused:
    no epoch of it is a fused one), fusion ended part way, or a student failed."""
    why = fusion_refusal(accelerator, cfg.compile)
    if why is None and len(cfg.methods) < 2:
        why = "fusion needs two or more methods"
    if why is not None:
        return None, why
    said: list[str] = []
    cohort = train_cohort(data, model_spec(cfg.student, "student"),
                          [bench_method(m) for m in cfg.methods], bench_recipe(cfg), 0,
                          accelerator, teacher, hooks=[ProgressBar("fused cohort")], fuse=True,
                          log=said.append)
    errors = [r.error for r in cohort if r.error is not None]
    if errors:
        return None, f"a student failed in the fused cohort: {errors[0]}"
    steps = (cfg.warmup + cfg.repeats) * cfg.steps
    fused = min(r.fused_steps for r in cohort)
    if fused < steps:
        what = said[-1] if said else "the students were not fused"
        return None, (what if fused == 0
                      else f"{fused} of {steps} steps fused: {what}")
    return cohort[0].epoch_s, None


def _fused_loop(cfg: BenchConfig, data: TensorData, accelerator, teacher: torch.nn.Module,
                result: dict[str, Any]) -> float | None:
    """(d)'s epoch seconds (None where fusion was refused); its images/s, peak memory and
    why it was refused (None: it was not) go into ``result``."""
    device, n, k = accelerator.device, cfg.batch_size * cfg.steps, len(cfg.methods)
    _reset_peak(device)
    seconds, why = fused_cohort_times(cfg, data, accelerator, teacher)
    fused_t = _epoch_seconds(seconds, cfg.warmup) if seconds is not None else None
    result["fused_ips"] = k * n / fused_t if fused_t is not None else None
    result["fused_peak_mem_mb"] = _peak_mb(device) if fused_t is not None else None
    result["fused_why"] = why
    return fused_t


def _limits(cfg: BenchConfig, data: TensorData, accelerator, teacher: torch.nn.Module,
            times: dict[str, Any]) -> dict[str, Any]:
    """The parts of a step timed alone (teacher forward, data path, bare student step), the
    bare-model limits they set and each loop's share of them."""
    n, k = cfg.batch_size * cfg.steps, len(cfg.methods)
    plain_t, solo_t, cohort_t = times["plain"], times["solo"], times["cohort"]
    t_teacher = _epoch_seconds(teacher_forward_times(cfg, data, accelerator, teacher),
                                cfg.warmup)
    t_data = _epoch_seconds(data_times(cfg, data, accelerator.device), cfg.warmup)
    t_bare = _epoch_seconds(bare_student_times(cfg, data, accelerator,
                                               model_spec(cfg.student, "student")), cfg.warmup)
    n_teach = sum(build_method(m).needs_teacher for m in cfg.methods)
    # A cohort saves what the solo runs repeat: the teacher's forward of every method that
    # has a teacher but one, and the data path of every method but one. The students' own
    # steps cannot be shared, so solo time over what is left bounds the gain.
    saved = max(n_teach - 1, 0) * t_teacher + (k - 1) * t_data
    steps = n / cfg.batch_size
    # The bare-model limit: per method, the bare student step plus, for a method with a
    # teacher, the teacher's forward; for the cohort, one teacher forward for all.
    limit_solo = k * t_bare + n_teach * t_teacher
    limit_cohort = k * t_bare + (t_teacher if n_teach else 0.0)
    plain_ips, solo_ips, cohort_ips = k * n / sum(plain_t), k * n / sum(solo_t), k * n / cohort_t
    bound = sum(solo_t) / max(sum(solo_t) - saved, 1e-9)
    out = {
        "teacher_epoch_s": t_teacher,
        "teacher_step_ms": 1000 * t_teacher / steps,
        "data_step_ms": 1000 * t_data / steps,
        "bare_student_step_ms": 1000 * t_bare / steps,
        "student_step_ms": 1000 * (sum(solo_t) - n_teach * t_teacher - k * t_data) / k / steps,
        "methods_with_teacher": n_teach,
        "bare_ips": k * n / limit_solo,
        "bare_cohort_ips": k * n / limit_cohort,
        "solo_of_limit": limit_solo / sum(solo_t),
        "cohort_of_limit": limit_cohort / cohort_t,
        "plain_of_limit": limit_solo / sum(plain_t),
        "cohort_bound": bound,
        "solo_vs_plain": solo_ips / plain_ips,
        "cohort_vs_solo": cohort_ips / solo_ips,
        "cohort_vs_plain": cohort_ips / plain_ips,
        "cohort_of_bound": cohort_ips / solo_ips / bound,
    }
    if "fused" in times:
        out.update(_fused_limits(cfg, data, accelerator, times, t_teacher if n_teach else 0.0,
                                 limit_cohort, plain_ips, cohort_ips))
    return out


def _fused_limits(cfg: BenchConfig, data: TensorData, accelerator, times: dict[str, Any],
                  t_teacher: float, limit_cohort: float, plain_ips: float, cohort_ips: float
                  ) -> dict[str, Any]:
    """(d)'s ratios, its share of the cohort's limit and of the fused cohort's own: one
    teacher forward (``t_teacher``, 0 where no method reads it) plus the fused bare step of
    all the students. All None where (d) was refused."""
    n, k, fused_t = cfg.batch_size * cfg.steps, len(cfg.methods), times["fused"]
    keys = ("bare_fused_step_ms", "bare_fused_ips", "fused_of_limit", "fused_of_fused_limit",
            "fused_vs_cohort", "fused_vs_plain")
    if fused_t is None:
        return dict.fromkeys(keys)
    fused_ips = k * n / fused_t
    out = dict(zip(keys, (None, None, limit_cohort / fused_t, None, fused_ips / cohort_ips,
                          fused_ips / plain_ips), strict=True))
    spec = model_spec(cfg.student, "student")
    try:
        t_fused = _epoch_seconds(bare_fused_times(cfg, data, accelerator, spec, k), cfg.warmup)
    except NotFusable as exc:  # the engine fused them, so not expected: the limit is unknown
        out["bare_fused_why"] = str(exc)
        return out
    limit_fused = t_fused + t_teacher
    out.update(bare_fused_step_ms=1000 * t_fused / cfg.steps, bare_fused_ips=k * n / limit_fused,
               fused_of_fused_limit=limit_fused / fused_t)
    return out


def startup_timing(device: str, precision: str) -> dict[str, Any]:
    """Seconds from launch to the first training step of a 1-epoch ``kt-bench run`` of one
    demo cell (KD, its teacher loaded from a checkpoint and evaluated, not trained), by
    phase as the run reports them, and the whole run's wall time."""
    import json
    import subprocess
    import sys
    import tempfile
    from pathlib import Path

    from kt_bench.sweep.cells import expand
    from kt_bench.sweep.config import load_grid

    (cell,) = expand(load_grid("demo").overridden(["kd"], 1, [0]))
    data = load_dataset(cell.dataset)
    with tempfile.TemporaryDirectory(prefix="kt-bench-startup-") as tmp:
        ckpt = Path(tmp) / "teacher.pt"
        torch.save(build_model(cell.teacher, data.num_classes, data.in_channels).state_dict(),
                   ckpt)
        cmd = [sys.executable, "-m", "kt_bench", "run", "--grid", "demo", "--methods", "kd",
               "--epochs", "1", "--seeds", "0", "--out", str(Path(tmp) / "run"),
               "--teacher-checkpoint", str(ckpt), "--device", device, "--precision", precision]
        t0 = time.perf_counter()
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        wall = time.perf_counter() - t0
        if done.returncode != 0:
            lines = (done.stderr.strip() or done.stdout.strip() or "no output").splitlines()
            raise KtBenchError(f"the start-up run failed: {lines[-1]}")
        marks = json.loads((Path(tmp) / "run" / "startup.json").read_text())
    return {"phases": {m["phase"]: m["seconds"] for m in marks["phases"]},
            "first_step_s": marks["first_step_s"], "run_wall_s": wall}


def _run_rows(r: dict[str, Any]) -> list[list[str]]:
    """The table rows of one precision's run."""
    def row(name: str, ips: float, vs_plain: str, of_limit: str, mem: str) -> list[str]:
        return [name, f"{ips:.0f}", vs_plain, of_limit, mem]

    rows = [
        row("bare models (limit, solo)", r["bare_ips"], "", "1.00", ""),
        row("(a) plain PyTorch loop", r["plain_ips"], "1.00", f"{r['plain_of_limit']:.2f}",
            f"{r['plain_peak_mem_mb']:.0f}"),
        row("(b) kt-bench engine, solo", r["solo_ips"], f"{r['solo_vs_plain']:.2f}",
            f"{r['solo_of_limit']:.2f}", f"{r['solo_peak_mem_mb']:.0f}"),
        row("bare models (limit, cohort)", r["bare_cohort_ips"], "", "1.00", ""),
        row("(c) kt-bench cohort", r["cohort_ips"], f"{r['cohort_vs_plain']:.2f}",
            f"{r['cohort_of_limit']:.2f}", f"{r['cohort_peak_mem_mb']:.0f}"),
    ]
    if r.get("fused_ips") is None:
        return rows
    if r.get("bare_fused_ips") is not None:  # against the cohort's limit, as (d) is
        rows.append(row("bare models (limit, fused cohort)", r["bare_fused_ips"], "",
                        f"{r['bare_fused_ips'] / r['bare_cohort_ips']:.2f}", ""))
    rows.append(row("(d) kt-bench fused cohort", r["fused_ips"], f"{r['fused_vs_plain']:.2f}",
                    f"{r['fused_of_limit']:.2f}", f"{r['fused_peak_mem_mb']:.0f}"))
    return rows


def _fused_line(run: dict[str, Any]) -> str | None:
    """(d) against (c) and against its own limit, or why it was not measured (None where
    it was not asked for)."""
    if "fused_why" not in run:
        return None
    if run["fused_ips"] is None:
        return f"(d) fused cohort: not measured: {run['fused_why']}"
    line = f"fused cohort vs cohort: {run['fused_vs_cohort']:.2f}x"
    if run.get("fused_of_fused_limit") is not None:
        return (f"{line} (the fused cohort's own limit is {run['bare_fused_ips']:.0f} "
                f"images/s, a bare fused step {run['bare_fused_step_ms']:.1f} ms a batch; "
                f"reached {run['fused_of_fused_limit']:.0%} of it)")
    return f"{line} (its own limit not measured: {run.get('bare_fused_why')})"


def _fp32_line(name: str, run: dict[str, Any]) -> str:
    """One precision's images/s over fp32's."""
    fused = f", fused cohort {run['fused_vs_fp32']:.2f}x" if "fused_vs_fp32" in run else ""
    return (f"{name} vs fp32: bare models {run['bare_vs_fp32']:.2f}x, solo "
            f"{run['solo_vs_fp32']:.2f}x, cohort {run['cohort_vs_fp32']:.2f}x{fused}")


def _method_table(method_ips: dict[str, dict[str, float]]) -> str:
    """Each method's images/s in the plain loop and the engine solo."""
    from tabulate import tabulate

    rows = [[m, f"{v['plain']:.1f}", f"{v['solo']:.1f}", f"{v['solo'] / v['plain']:.2f}"]
            for m, v in method_ips.items()]
    return tabulate(rows, headers=["method", "plain images/s", "solo images/s", "solo vs plain"],
                    tablefmt="github", disable_numparse=True)


def format_result(r: dict[str, Any]) -> str:
    """A human-readable summary of :func:`run_bench`'s result."""
    from tabulate import tabulate

    k = len(r["methods"])
    shape = "x".join(str(d) for d in r["image_shape"])
    lines = [
        f"{r['teacher']} -> {r['student']}, {k} methods, batch {r['batch_size']}, "
        f"{r['images_per_epoch']} images per epoch of {r['dataset']} ({shape}), on "
        f"{r['device']}{' (compiled)' if r['compile'] else ''}; plain loop with "
        f"{r['workers']} DataLoader workers; images/s over all students",
    ]
    if "steps_asked" in r:
        lines.append(f"{r['steps']} steps per epoch, not the {r['steps_asked']} asked: all the "
                     f"whole batches {r['dataset']} holds")
    if r.get("main_stage_only"):
        lines.append(f"{', '.join(r['main_stage_only'])}: timed in the main stage (their "
                     "initialisation stage is skipped in every loop)")
    for name, run in r["runs"].items():
        lines += [
            "",
            f"{name}:",
            tabulate(_run_rows(run), headers=["", "train images/s", "vs plain",
                                              "of the limit", "peak memory MB"],
                     tablefmt="github", disable_numparse=True),
            f"per batch: teacher forward {run['teacher_step_ms']:.1f} ms, bare student step "
            f"{run['bare_student_step_ms']:.1f} ms, data path {run['data_step_ms']:.1f} ms, "
            f"a student's step in the engine {run['student_step_ms']:.1f} ms (mean over the "
            f"methods; {run['methods_with_teacher']} of {k} use the teacher)",
            f"cohort vs solo: {run['cohort_vs_solo']:.2f}x (bound from the measured step "
            f"times: {run['cohort_bound']:.2f}x; reached {run['cohort_of_bound']:.0%} of it)",
        ]
        fused = _fused_line(run)
        if fused is not None:
            lines.append(fused)
        if len(run.get("method_ips", {})) > 1:
            lines.append(_method_table(run["method_ips"]))
        if "solo_vs_fp32" in run:
            lines.append(_fp32_line(name, run))
    if not r["device"].startswith("cuda"):
        lines.append("(peak memory on the CPU is the process's peak resident size so far, so "
                     "it can only grow down the tables)")
    if "nst_auto_ms" in r:
        lines.append(f"NST-poly loss at the paper's ImageNet shape (64 x 2048x7x7 teacher, "
                     f"1024x7x7 student), forward+backward: {r['nst_auto_ms']:.1f} ms (form "
                     f"chosen by shape) vs {r['nst_kernel_ms']:.1f} ms (direct kernel form): "
                     f"{r['nst_speedup']:.1f}x")
    for name, st in r.get("startup", {}).items():
        if "error" in st:
            lines.append(f"start-up of a 1-epoch demo run ({name}): {st['error']}")
            continue
        phases = ", ".join(f"{p} {t:.2f} s" for p, t in st["phases"].items())
        lines.append(f"start-up of a 1-epoch demo run ({name}): first step "
                     f"{st['first_step_s']:.2f} s after launch ({phases}); whole run "
                     f"{st['run_wall_s']:.1f} s")
    return "\n".join(lines)
