"""The one training loop: a student (plus its method's parameters) learns from a frozen teacher.

Accelerate owns the device, mixed precision, the backward pass and data parallelism. Every
random choice derives from the cell's seed: the student's initialisation (the same for every
method of a seed), the data order and the augmentation of each epoch, so a cell run twice on
the CPU gives the same numbers, and a cell resumed from its checkpoint continues exactly.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import DistributedDataParallelKwargs, set_seed
from torch import nn
from tqdm.auto import tqdm

from kt_bench.checkpoints import restore_training, save_checkpoint
from kt_bench.config import Recipe
from kt_bench.data.bundle import DataBundle, derived_seed
from kt_bench.errors import KtBenchError, first_line
from kt_bench.interrupts import cell_failure
from kt_bench.method import INIT, MAIN, Batch, Method
from kt_bench.models import build_model
from kt_bench.precision import PRECISIONS
from kt_bench.spec import Spec
from kt_bench.startup import CLOCK
from kt_bench.taps import TapRecorder

DEVICES = ("auto", "cpu", "cuda")


class DivergedError(KtBenchError):
    """The training loss became NaN or infinite."""


def check_device_and_precision(device: str, precision: str) -> None:
    """Raise a one-line error for what the accelerator would refuse or not really run: an
    unknown device or precision (``precision`` already resolved from ``auto``), CUDA where
    there is none, or fp16 off CUDA."""
    if device not in DEVICES:
        raise KtBenchError(f"unknown device '{device}'; accepted: {', '.join(DEVICES)}")
    if precision not in PRECISIONS:
        raise KtBenchError(f"unknown precision '{precision}'; accepted: auto, "
                           f"{', '.join(PRECISIONS)}")
    if device == "cuda" and not torch.cuda.is_available():
        raise KtBenchError("--device cuda was asked for, but no CUDA device is available")
    if precision == "fp16" and (device == "cpu" or not torch.cuda.is_available()):
        # Accelerate accepts fp16 on the CPU but runs no autocast there: fp32 under its name
        raise KtBenchError("--precision fp16 needs a CUDA device; on the CPU use bf16 or no")


def make_accelerator(device: str = "auto", precision: str = "no", log_with: str | None = None,
                     project_dir: str | None = None) -> Accelerator:
    """An Accelerator for ``device`` (auto|cpu|cuda) and ``precision`` (no|bf16|fp16);
    ``log_with`` names an Accelerate tracker (e.g. ``tensorboard``) writing under
    ``project_dir``."""
    check_device_and_precision(device, precision)
    # Accelerate keeps one process-wide state; a new device or precision needs it reset.
    AcceleratorState._reset_state(reset_partial_state=False)
    try:
        # A method's parameters, or part of the student, may sit out a stage (FitNet's hint
        # stage, a loss term weighted 0 in some epochs): DDP must not wait for their grads.
        ddp = DistributedDataParallelKwargs(find_unused_parameters=True)
        accelerator = Accelerator(cpu=device == "cpu", mixed_precision=precision,
                                  log_with=log_with, project_dir=project_dir,
                                  kwargs_handlers=[ddp])
    except (ValueError, ImportError, RuntimeError) as exc:
        raise KtBenchError(f"cannot log with '{log_with}': {first_line(exc)}") from None
    if log_with and not accelerator.log_with:
        raise KtBenchError(f"--log-with {log_with}: that tracker's package is not installed "
                           f"(for TensorBoard: pip install tensorboard)")
    return accelerator


def in_layout(x: torch.Tensor, memory_format: torch.memory_format) -> torch.Tensor:
    """A batch of images (N, C, H, W) with the strides of ``memory_format`` (a copy only where
    they differ; other inputs as they are). ``.contiguous()`` alone would keep a one-channel
    batch's channels-last strides, as both layouts hold for it, and convolutions choose their
    layout by strides."""
    if x.dim() != 4:
        return x
    n, c, h, w = x.shape
    want = ((c * h * w, h * w, w, 1) if memory_format == torch.contiguous_format
            else (h * w * c, 1, w * c, c))
    return x if x.stride() == want else x.clone(memory_format=memory_format)


def channels_last(x: torch.Tensor) -> torch.Tensor:
    """Images in the channels-last layout, which convolutions run faster in on both CUDA and
    the CPU (oneDNN); models are converted to it too."""
    return x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x


#: Channels per vector of AVX-512 in float32: PyTorch's channels-last CPU kernels vectorise
#: over channels, and a BatchNorm narrower than this runs its backward pass on a slow path.
CPU_VECTOR_CHANNELS = 16


def training_memory_format(model: nn.Module, device: torch.device) -> torch.memory_format:
    """The layout ``model`` trains fastest in on ``device``, and correctly: channels_last,
    except on the CPU for a network with a BatchNorm narrower than
    :data:`CPU_VECTOR_CHANNELS` channels, whose backward pass is several times slower there in
    channels_last (7x at 8 channels, measured on AVX-512) than in the default layout, or with
    a strided 1x1 convolution of fewer than :data:`ONEDNN_SAFE_CHANNELS` input channels, whose
    weight gradient oneDNN gets wrong in channels_last on some CPUs (off by 13-59% on an AVX2
    AMD EPYC, PyTorch 2.14; tests/test_compile.py). Such a network trains in the default
    layout on the CPU."""
    if device.type == "cpu" and any(_slow_or_wrong_in_channels_last(m)
                                    for m in model.modules()):
        return torch.contiguous_format
    return torch.channels_last


#: Input channels from which oneDNN's channels-last weight gradient of a strided 1x1
#: convolution is right on every CPU measured (2 to 7 were wrong on an AVX2 one).
ONEDNN_SAFE_CHANNELS = 8


def _slow_or_wrong_in_channels_last(module: nn.Module) -> bool:
    if isinstance(module, nn.BatchNorm2d):
        return module.num_features < CPU_VECTOR_CHANNELS
    return (isinstance(module, nn.Conv2d) and module.kernel_size == (1, 1)
            and module.stride != (1, 1) and module.in_channels < ONEDNN_SAFE_CHANNELS)


class Trainee(nn.Module):
    """The student and its method as one module, so data parallelism sees one forward pass."""

    def __init__(self, student: nn.Module, method: Method,
                 memory_format: torch.memory_format | None = None) -> None:
        super().__init__()
        self.student = student
        self.method = method
        self.memory_format = memory_format
        self.recorder = TapRecorder(student, student.tap_map, method.taps)

    def forward(self, x: torch.Tensor, teacher_taps: dict | None, batch: Batch | None = None):
        """The student's logits and the method's unweighted loss terms."""
        if self.memory_format is not None:  # in the student's own layout
            x = in_layout(x, self.memory_format)
        logits = self.student(x)
        taps = self.recorder.collect(logits)
        terms = self.method.terms(taps, teacher_taps, batch) if teacher_taps is not None else {}
        return logits, terms


@dataclass
class TrainResult:
    """What one training run produced."""

    #: The trained student (None where it failed to start).
    model: nn.Module | None
    history: list[dict[str, Any]] = field(default_factory=list)
    wall_s: float = 0.0
    train_s: float = 0.0
    images: int = 0
    #: Training seconds of each epoch run in this call (not of resumed ones).
    epoch_s: list[float] = field(default_factory=list)
    #: Why training stopped early (a diverged loss, a method's exception), else None.
    error: BaseException | None = None
    #: What the method settled on while training (:meth:`Method.facts`).
    facts: dict[str, Any] = field(default_factory=dict)

    @property
    def top1(self) -> float:
        """Test top-1 accuracy (%) after the last epoch."""
        return self.history[-1]["top1"]

    @property
    def top5(self) -> float:
        """Test top-5 accuracy (%) after the last epoch."""
        return self.history[-1]["top5"]

    @property
    def top1_best(self) -> float:
        """Best test top-1 accuracy (%) over the epochs (shown beside top1, never instead)."""
        return max(h["top1"] for h in self.history if h.get("stage") != INIT)

    @property
    def images_per_s(self) -> float:
        """Training images per second over all processes (evaluation excluded)."""
        return self.images / self.train_s if self.train_s > 0 else 0.0


def make_scheduler(optimizer: torch.optim.Optimizer, recipe: Recipe):
    """The per-epoch learning-rate schedule of ``recipe``."""
    if recipe.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=recipe.epochs)
    if recipe.schedule == "multistep":
        return torch.optim.lr_scheduler.MultiStepLR(
            optimizer, list(recipe.milestones), recipe.gamma)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)


@torch.inference_mode()
def evaluate(accelerator: Accelerator, model: nn.Module, data: DataBundle, batch_size: int) -> dict:
    """Top-1 and top-5 accuracy (%) of ``model`` on the test split of ``data``, each sample
    counted once over all processes."""
    model.eval()
    rank, world = accelerator.process_index, accelerator.num_processes
    if world > 1:
        # each process updated its own BatchNorm statistics in its last step; all score the
        # model the main process checkpoints, with the main's
        for buffer in model.buffers():
            torch.distributed.broadcast(buffer, src=0)
    correct = torch.zeros(2, dtype=torch.float64, device=accelerator.device)
    layout = training_memory_format(model, accelerator.device)  # as it trained
    for x, y in data.test_batches(batch_size, accelerator.device, rank, world):
        with accelerator.autocast():
            logits = model(in_layout(x, layout))
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hit = top.eq(y[:, None])
        correct[0] += hit[:, 0].sum()
        correct[1] += hit.any(dim=1).sum()
    total = accelerator.reduce(correct, reduction="sum") if world > 1 else correct
    top1, top5 = (100.0 * total / data.n_test).tolist()
    return {"top1": top1, "top5": top5}


def tap_shapes(model: nn.Module, taps: tuple[str, ...], x: torch.Tensor) -> dict[str, torch.Size]:
    """The shapes of ``model``'s ``taps`` on input ``x`` (eval mode, no gradients)."""
    recorder = TapRecorder(model, model.tap_map, taps)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = recorder.collect(model(x))
    finally:
        recorder.remove()
        model.train(was_training)
    return {k: v.shape for k, v in out.items()}


@dataclass
class _Member:
    """One student of a cohort with everything it owns (``trainee``, ``optimizer`` and
    ``scheduler`` are None for a student that failed to start; ``error`` says why)."""

    method: Method
    trainee: nn.Module | None
    optimizer: torch.optim.Optimizer | None
    scheduler: Any
    checkpoint: Path | None
    on_epoch: Callable[[list[dict[str, Any]]], None] | None
    base_ce: float
    #: The initialisation stage's optimiser (None without one).
    init_optimizer: torch.optim.Optimizer | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    train_s: float = 0.0
    images: int = 0
    epoch_s: list[float] = field(default_factory=list)
    error: BaseException | None = None

    @property
    def start_epoch(self) -> int:
        return len(self.history)

    def stage_of(self, epoch: int, epochs: int) -> tuple[str, int, int]:
        """(stage, epoch within it, its epochs) of global ``epoch`` (the initialisation
        stage's epochs come first)."""
        init = self.method.init_epochs
        return (INIT, epoch, init) if epoch < init else (MAIN, epoch - init, epochs)


def compile_model(model: nn.Module,
                  memory_format: torch.memory_format = torch.channels_last) -> None:
    """Compile ``model``'s forward in place with ``torch.compile`` (its state dict keeps its
    keys, so checkpoints are unchanged); a model that trains in ``memory_format``
    ``contiguous_format`` keeps that layout inside the compiled code too."""
    # Instances of one class share their compiled code unless Dynamo also guards on the
    # modules' hooks; without these guards a student would run another's tap hooks.
    torch._dynamo.config.skip_nnmodule_hook_guards = False
    # Each student (its hooks) and each mode (train, eval) is a compilation of the same code;
    # past the default limit of 8, Dynamo would fall back to eager for the rest, unseen.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    # Inductor moves convolutions to channels_last on its own; for a network the engine keeps
    # in the default layout (see training_memory_format) that would bring back the slow and
    # the wrong kernels it avoids.
    keep = memory_format == torch.contiguous_format
    model.compile(options={"layout_optimization": False} if keep else None)


def _make_member(data: DataBundle, student_spec: Spec, method: Method, recipe: Recipe,
                 seed: int, accelerator: Accelerator, teacher: nn.Module | None,
                 checkpoint: Path | None, on_epoch, compile: bool) -> _Member:
    """Build one student exactly as a solo run would: the same seeds in the same order
    (``teacher`` is already on the accelerator's device)."""
    set_seed(seed)
    student = build_model(student_spec, data.num_classes, data.in_channels)
    if method.needs_teacher:
        set_seed(derived_seed(seed, 2))  # the method's own parameters
        method.setup_data(data.train_labels(), data.num_classes)
        setup_method(method, student, teacher, data.probe())
    layout = training_memory_format(student, accelerator.device)
    trainee = Trainee(student, method, layout).to(memory_format=layout)
    if compile:
        compile_model(student, layout)
    optimizer = _sgd(trainee, recipe, recipe.lr)
    scheduler = make_scheduler(optimizer, recipe)
    init_optimizer = None
    if method.init_epochs:  # the initialisation stage's own SGD at a constant rate
        init_optimizer = _sgd(trainee, recipe, method.init_lr or recipe.lr)
    member = _Member(method, trainee, optimizer, scheduler, checkpoint, on_epoch,
                     base_ce_weight(method, recipe), init_optimizer)
    if checkpoint is not None:  # a damaged one is set aside: the previous copy, or scratch
        state = restore_training(checkpoint, trainee, optimizer, scheduler,
                                 accelerator.is_main_process, init_optimizer)
        if state is not None:
            member.history, member.train_s, member.images = (state["history"],
                                                             state["train_s"], state["images"])
    member.trainee, member.optimizer = accelerator.prepare(trainee, optimizer)
    if init_optimizer is not None:
        member.init_optimizer = accelerator.prepare(init_optimizer)
    return member


def _sgd(trainee: nn.Module, recipe: Recipe, lr: float) -> torch.optim.Optimizer:
    """SGD over every parameter of ``trainee`` with the recipe's momentum and weight decay."""
    return torch.optim.SGD(trainee.parameters(), lr=lr, momentum=recipe.momentum,
                           nesterov=recipe.nesterov, weight_decay=recipe.weight_decay)


def total_loss(logits: torch.Tensor, y: torch.Tensor, terms: dict[str, torch.Tensor],
               weights: Mapping[str, float], ce_weight: float) -> torch.Tensor:
    """The training loss of one batch: ``ce_weight`` · cross-entropy + Σ weight · term over
    the method's terms (weights of 0 leave their term out). Adds ``terms["ce"]`` when the
    cross-entropy counts."""
    parts = []
    if ce_weight:
        terms["ce"] = F.cross_entropy(logits.float(), y)
        parts.append(ce_weight * terms["ce"])
    parts += [w * terms[name] for name, w in weights.items() if w]
    return sum(parts) if parts else logits.sum() * 0.0


def base_ce_weight(method: Method, recipe: Recipe) -> float:
    """The cross-entropy weight ``method`` trains with: its own ``ce_weight`` if set, else the
    recipe's (each epoch then scales it by :meth:`Method.ce_scale`)."""
    return recipe.ce_weight if method.ce_weight is None else method.ce_weight


def setup_method(method: Method, student: nn.Module, teacher: nn.Module | None,
                 probe: torch.Tensor) -> None:
    """Let ``method`` build its trainable parts from its taps' shapes on ``probe`` images
    (a method that needs no teacher has nothing to set up)."""
    if method.needs_teacher:
        method.setup_teacher(teacher)
        method.setup(tap_shapes(student, method.taps, probe),
                     tap_shapes(teacher, method.taps, probe.to(next(teacher.parameters()).device)))


def teacher_taps(teacher: nn.Module, recorder: TapRecorder, x: torch.Tensor,
                 accelerator: Accelerator | None = None) -> dict[str, torch.Tensor]:
    """The teacher's taps on ``x``, without gradients, as tensors autograd may save."""
    autocast = accelerator.autocast() if accelerator is not None else contextlib.nullcontext()
    with autocast, torch.inference_mode():
        taps = recorder.collect(teacher(x))
    # clones leave inference mode, so autograd may save them for backward
    return {k: v.clone() for k, v in taps.items()}


def sync_device(device: torch.device) -> None:
    """Wait for the work queued on ``device`` (a GPU runs asynchronously), so that a clock
    read after it measures the work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def batch_statistics_teacher(teacher: nn.Module) -> nn.Module:
    """A private copy of the frozen ``teacher`` whose BatchNorm layers normalise with each
    batch's statistics (train mode), for methods with ``teacher_batch_statistics``."""
    return copy.deepcopy(teacher).train().requires_grad_(False)


def _step(member: _Member, accelerator: Accelerator, x: torch.Tensor, batch: Batch,
          t_taps: dict | None, weights: dict[str, float], ce_weight: float,
          sums: dict[str, torch.Tensor], log_step: int | None,
          optimizer: torch.optim.Optimizer) -> None:
    """One optimisation step of one student; loss terms are summed on the device."""
    with accelerator.autocast():
        logits, terms = member.trainee(x, t_taps, batch)
        loss = total_loss(logits, batch.labels, terms, weights, ce_weight)
    accelerator.backward(loss)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    for name, value in {**terms, "loss": loss}.items():
        sums[name] = sums.get(name, 0) + value.detach().float()
    if log_step is not None:  # only when a tracker is on: logging reads the values back
        accelerator.log({f"train/{k}": v.item() for k, v in terms.items()}
                        | {"train/loss": loss.item()}, step=log_step)


def _end_epoch(member: _Member, accelerator: Accelerator, data: DataBundle, recipe: Recipe,
               epoch: int, n_steps: int, sums: dict, seconds: float, steps: int) -> None:
    """Close one epoch of one student: record, check for divergence, schedule, evaluate,
    checkpoint."""
    member.train_s += seconds
    member.epoch_s.append(seconds)
    stage = member.stage_of(epoch, recipe.epochs)[0]
    optimizer = member.init_optimizer if stage == INIT else member.optimizer
    record: dict[str, Any] = {"epoch": epoch + 1, "lr": optimizer.param_groups[0]["lr"]}
    if stage == INIT:
        record["stage"] = INIT
    record.update({k: v.item() / max(n_steps, 1) for k, v in sums.items()})
    if not math.isfinite(record.get("loss", 0.0)):
        raise DivergedError(f"loss became {record['loss']} in epoch {epoch + 1}")
    if stage == MAIN:
        member.scheduler.step()
    record.update(evaluate(accelerator, accelerator.unwrap_model(member.trainee).student, data,
                           recipe.eval_batch_size))
    member.history.append(record)
    if accelerator.trackers:
        accelerator.log({f"test/{k}": record[k] for k in ("top1", "top5")},
                        step=(epoch + 1) * steps)
    if accelerator.is_main_process:
        if member.checkpoint is not None:
            save_checkpoint(member.checkpoint, {
                "trainee": accelerator.unwrap_model(member.trainee).state_dict(),
                "optimizer": member.optimizer.state_dict(),
                "scheduler": member.scheduler.state_dict(),
                "init_optimizer": (member.init_optimizer.state_dict()
                                   if member.init_optimizer is not None else None),
                "history": member.history, "train_s": member.train_s,
                "images": member.images})
        if member.on_epoch is not None:
            member.on_epoch(member.history)


def _epoch_plan(member: _Member, epoch: int, recipe: Recipe):
    """What one student does in global ``epoch``: the stage (a :class:`Batch` template), the
    terms' weights, the cross-entropy weight and the optimiser."""
    stage, e, n = member.stage_of(epoch, recipe.epochs)
    template = Batch(torch.empty(0), e, n, stage=stage)
    if stage == INIT:  # no labels in the initialisation stage
        return template, member.method.init_term_weights(e, n), 0.0, member.init_optimizer
    return (template, member.method.term_weights(e, n),
            member.base_ce * member.method.ce_scale(e, n), member.optimizer)


def train_cohort(
    data: DataBundle,
    student_spec: Spec,
    methods: list[Method],
    recipe: Recipe,
    seed: int,
    accelerator: Accelerator,
    teacher: nn.Module | None = None,
    checkpoints: list[Path | None] | None = None,
    desc: str = "",
    on_epoch: list[Callable[[list[dict[str, Any]]], None] | None] | None = None,
    compile: bool = False,
) -> list[TrainResult]:
    """Train one student per method, together, in one pass over the data: each batch is
    augmented once and goes through the teacher once, and every student takes its step.

    Every student is built, seeded, stepped, evaluated and checkpointed exactly as a solo run
    of its cell would be, so on the CPU each result equals the solo run's bit for bit. A
    student whose loss diverges or whose method raises (or calls ``sys.exit()``) is stopped
    with the error in its result; the others go on. An interrupt (Ctrl-C, SIGTERM, a signal
    handler's exit) stops them all. ``checkpoints`` and ``on_epoch`` are per student; a student
    resumes from its checkpoint and trains only the epochs it lacks. With trackers on the
    accelerator (``--log-with``), every step's loss terms are logged (one student per run).
    With ``compile``, the students' and the teacher's forward passes go through
    ``torch.compile`` (one compilation per student and mode first; results then match an
    uncompiled run closely, not bit for bit).
    """
    started = time.perf_counter()
    checkpoints = checkpoints or [None] * len(methods)
    on_epoch = on_epoch or [None] * len(methods)
    for m in methods:
        if m.needs_teacher and teacher is None:
            raise KtBenchError(f"method '{m.name}' needs a teacher")
    needs_teacher = any(m.needs_teacher for m in methods)
    teacher_rec = bs_rec = bs_teacher = None
    if needs_teacher:
        teacher = teacher.to(accelerator.device, memory_format=torch.channels_last)
        teacher = teacher.eval().requires_grad_(False)
    members = []
    for m, c, cb in zip(methods, checkpoints, on_epoch, strict=True):
        try:
            members.append(_make_member(data, student_spec, m, recipe, seed, accelerator,
                                        teacher, c, cb, compile))
        except BaseException as exc:  # noqa: BLE001 - a student that cannot start stops alone
            members.append(_Member(m, None, None, None, c, cb, 0.0,
                                   error=cell_failure(exc, f"method '{m.name}'")))
    if needs_teacher:
        if compile:  # after the members' shape probes, which would each compile it again
            compile_model(teacher)
        # the taps of the students that started (a bad tap stopped its own student above)
        taps = tuple(dict.fromkeys(t for m in members if m.error is None for t in m.method.taps))
        teacher_rec = TapRecorder(teacher, teacher.tap_map, taps)
        batch_stat_taps = tuple(dict.fromkeys(
            t for m in members if m.error is None and m.method.teacher_batch_statistics
            for t in m.method.taps))
        if batch_stat_taps:
            bs_teacher = batch_statistics_teacher(teacher)
            bs_rec = TapRecorder(bs_teacher, bs_teacher.tap_map, batch_stat_taps)
    CLOCK.mark("networks")  # the first run's students, or a teacher it trains
    device = accelerator.device
    rank, world = accelerator.process_index, accelerator.num_processes
    steps = math.ceil(data.n_train / recipe.batch_size)
    healthy = [m for m in members if m.error is None]
    first = min((m.start_epoch for m in healthy), default=0)
    last = max((m.method.init_epochs + recipe.epochs for m in healthy), default=0)
    bar = tqdm(total=steps * max(last - first, 0), desc=desc, leave=False,
               disable=not accelerator.is_local_main_process, unit="step")
    logging = bool(accelerator.trackers) and len(members) == 1
    try:
        # global epochs: a member's initialisation stage (if any), then the recipe's epochs;
        # the data order of each global epoch is shared by the cohort
        for epoch in range(first, last):
            active = [m for m in members if m.error is None and m.start_epoch <= epoch
                      < m.method.init_epochs + recipe.epochs]
            if not active:
                break
            plan = []
            for m in active:
                try:
                    plan.append((m, *_epoch_plan(m, epoch, recipe), {}))
                except BaseException as exc:  # noqa: BLE001 - this student stops, the rest go on
                    m.error = _member_failure(m, exc)
            use_teacher = any(m.method.needs_teacher for m, *_ in plan)
            for m, stage, *_ in plan:
                m.trainee.train()
                if stage.stage == INIT and not m.method.init_trains_student:
                    accelerator.unwrap_model(m.trainee).student.eval()
            n_steps = 0
            t0 = time.perf_counter()
            for x, y, idx in data.train_batches(epoch, seed, recipe.batch_size, device, rank,
                                                world, indices=True):
                x = channels_last(x)
                t_taps = bs_taps = None
                if use_teacher:
                    t_taps = teacher_taps(teacher, teacher_rec, x, accelerator)
                if bs_rec is not None and any(m.method.teacher_batch_statistics
                                              for m, *_ in plan):
                    bs_taps = teacher_taps(bs_teacher, bs_rec, x, accelerator)
                n_steps += 1
                step_seed = derived_seed(seed, 5, epoch, n_steps)
                for m, stage, weights, ce_weight, optimizer, sums in plan:
                    if m.error is not None:
                        continue
                    batch = dataclasses.replace(stage, labels=y, indices=idx, seed=step_seed)
                    try:
                        mine = bs_taps if m.method.teacher_batch_statistics else t_taps
                        _step(m, accelerator, x, batch,
                              mine if m.method.needs_teacher else None, weights, ce_weight,
                              sums, epoch * steps + n_steps if logging else None, optimizer)
                    except BaseException as exc:  # noqa: BLE001
                        m.error = _member_failure(m, exc)
                    m.images += x.shape[0] * world
                if not CLOCK.done:
                    sync_device(device)
                    CLOCK.mark(CLOCK.FINAL)
                bar.update(1)
            seconds = time.perf_counter() - t0
            for m, _, _, _, _, sums in plan:
                if m.error is None:
                    try:
                        _end_epoch(m, accelerator, data, recipe, epoch, n_steps, sums, seconds,
                                   steps)
                    except BaseException as exc:  # noqa: BLE001
                        m.error = _member_failure(m, exc)
            shown = [m.history[-1] for m, *_ in plan if m.error is None and m.history]
            if len(shown) == 1:
                bar.set_postfix(loss=f"{shown[0]['loss']:.3f}", top1=f"{shown[0]['top1']:.1f}")
    finally:
        bar.close()
        for recorder in (teacher_rec, bs_rec):
            if recorder is not None:
                recorder.remove()
    wall = time.perf_counter() - started
    facts = [_facts(m) if m.trainee else {} for m in members]  # first: it may fail one
    return [TrainResult(accelerator.unwrap_model(m.trainee).student if m.trainee else None,
                        m.history, wall, m.train_s, m.images, m.epoch_s, m.error, f)
            for m, f in zip(members, facts, strict=True)]


def _member_failure(member: _Member, exc: BaseException) -> BaseException:
    """The error that stops ``member`` alone (see :func:`cell_failure`; an interrupt is raised
    again and stops every member)."""
    return cell_failure(exc, f"method '{member.method.name}'")


def _facts(member: _Member) -> dict[str, Any]:
    """The member's :meth:`Method.facts` (none where they fail, which fails the member if
    nothing did before)."""
    try:
        return member.method.facts()
    except BaseException as exc:  # noqa: BLE001
        member.error = member.error or _member_failure(member, exc)
        return {}


def train(
    data: DataBundle,
    student_spec: Spec,
    method: Method,
    recipe: Recipe,
    seed: int,
    accelerator: Accelerator,
    teacher: nn.Module | None = None,
    checkpoint: Path | None = None,
    desc: str = "",
    on_epoch: Callable[[list[dict[str, Any]]], None] | None = None,
    compile: bool = False,
) -> TrainResult:
    """Train ``student_spec`` on ``data`` under ``method`` (taught by ``teacher``, if the method
    needs one) with ``recipe``; evaluate after every epoch (a cohort of one).

    With ``checkpoint``, the state after each epoch is written there atomically, and a run
    that finds one resumes after its epoch. ``on_epoch`` gets the history after each epoch.
    An error in training (a diverged loss, a failing method) is raised. ``compile``: see
    :func:`train_cohort`.
    """
    (result,) = train_cohort(data, student_spec, [method], recipe, seed, accelerator, teacher,
                             [checkpoint], desc, [on_epoch], compile)
    if result.error is not None:
        raise result.error
    return result
