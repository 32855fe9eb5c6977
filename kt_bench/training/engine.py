"""The one training loop: students (each with its method's parameters) learn from a frozen
teacher, together, in one pass over the data.

Accelerate owns the device, mixed precision, the backward pass and data parallelism. Every
random choice derives from the cell's seed: the student's initialisation (the same for every
method of a seed), the data order and the augmentation of each epoch, so a cell run twice on
the CPU gives the same numbers, and a cell resumed from its checkpoint continues exactly. What
a method does with a student and a teacher is :mod:`kt_bench.training.lifecycle`'s; what the
loop reports while it runs, its caller's :mod:`~kt_bench.training.hooks`.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch import nn

from kt_bench.api.method import INIT, MAIN, Method
from kt_bench.core.errors import KtBenchError
from kt_bench.core.interrupts import cell_failure
from kt_bench.core.options import Spec
from kt_bench.core.seeds import derived_seed
from kt_bench.data.bundle import DataBundle
from kt_bench.models import build_model
from kt_bench.training.checkpoints import restore_training, save_checkpoint
from kt_bench.training.device import (
    StepTimer,
    channels_last,
    compile_model,
    training_memory_format,
)
from kt_bench.training.fused_cohort import CohortFusion, FusionFailed
from kt_bench.training.hooks import HookList, TrainingHooks
from kt_bench.training.lifecycle import (
    EpochPlan,
    StepLoss,
    TeacherTaps,
    Trainee,
    base_ce_weight,
    in_layout,
    plan_epoch,
    prepare_on_probe,
    step_loss,
    total_epochs,
)
from kt_bench.training.recipe import Recipe

#: ``f(history)``, called after each epoch with the student's history so far.
OnEpoch = Callable[[list[dict[str, Any]]], None]


class DivergedError(KtBenchError):
    """The training loss became NaN or infinite."""


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
    #: Seconds spent in this student's own steps (forward, backward, update; the teacher's
    #: shared forward pass and evaluation not included) in this call, as ``wall_s`` is this
    #: call's: what a cohort member's share of the cohort's time is measured by.
    step_s: float = 0.0
    #: Steps the student took in a fused group in this call (0: it trained unfused).
    fused_steps: int = 0

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


@dataclass
class _Member:
    """One student of a cohort with everything it owns (``trainee``, ``optimizer`` and
    ``scheduler`` are None for a student that failed to start; ``error`` says why)."""

    method: Method
    trainee: nn.Module | None
    optimizer: torch.optim.Optimizer | None
    scheduler: Any
    checkpoint: Path | None
    on_epoch: OnEpoch | None
    base_ce: float
    #: The initialisation stage's optimiser (None without one).
    init_optimizer: torch.optim.Optimizer | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    train_s: float = 0.0
    images: int = 0
    epoch_s: list[float] = field(default_factory=list)
    error: BaseException | None = None
    #: The member's position among the cohort's methods.
    index: int = 0
    #: Seconds in the member's own steps (see :attr:`TrainResult.step_s`).
    step_s: float = 0.0
    #: Steps taken in a fused group (see :attr:`TrainResult.fused_steps`).
    fused_steps: int = 0

    @property
    def start_epoch(self) -> int:
        """The first global epoch this call trains (after those its checkpoint holds)."""
        return len(self.history)

    def trains_in(self, epoch: int, epochs: int) -> bool:
        """Whether the member is healthy and trains in global ``epoch``."""
        return (self.error is None
                and self.start_epoch <= epoch < total_epochs(self.method, epochs))

    def fail(self, exc: BaseException) -> None:
        """Stop this member alone with ``exc`` (an interrupt is raised again: see
        :func:`~kt_bench.core.interrupts.cell_failure`)."""
        self.error = cell_failure(exc, f"method '{self.method.name}'")


@dataclass
class _Planned:
    """A member's epoch: its plan, the optimiser of its stage and its summed terms."""

    member: _Member
    plan: EpochPlan
    optimizer: torch.optim.Optimizer
    sums: dict[str, torch.Tensor] = field(default_factory=dict)


def build_trainee(data: DataBundle, student_spec: Spec, method: Method, seed: int,
                  device: torch.device, teacher: nn.Module | None = None,
                  compile: bool = False) -> Trainee:
    """The student of ``method`` as every run of its cell builds it: seeded by ``seed`` (the
    method's own parameters by a seed derived from it), the method prepared on ``data`` and
    ``teacher``, in the memory layout it trains in on ``device``, compiled if asked."""
    set_seed(seed)
    student = build_model(student_spec, data.num_classes, data.in_channels, data.image_size)
    if method.needs_teacher:
        set_seed(derived_seed(seed, 2))  # the method's own parameters
        prepare_on_probe(method, student, teacher, data.train_labels(), data.num_classes,
                         data.probe())
    layout = training_memory_format(student, device)
    trainee = Trainee(student, method, layout).to(memory_format=layout)
    if compile:
        compile_model(student, layout)
    return trainee


def _start_member(data: DataBundle, student_spec: Spec, method: Method, recipe: Recipe,
                  seed: int, accelerator: Accelerator, teacher: nn.Module | None,
                  checkpoint: Path | None, on_epoch: OnEpoch | None, compile: bool) -> _Member:
    """Build one student exactly as a solo run would: the same seeds in the same order
    (``teacher`` is already on the accelerator's device); resume it from ``checkpoint``."""
    trainee = build_trainee(data, student_spec, method, seed, accelerator.device, teacher,
                            compile)
    optimizer = _sgd(trainee, recipe, recipe.lr)
    scheduler = make_scheduler(optimizer, recipe)
    init = method.needs.init
    # the initialisation stage's own SGD at a constant rate
    init_optimizer = _sgd(trainee, recipe, init.lr or recipe.lr) if init else None
    member = _Member(method, trainee, optimizer, scheduler, checkpoint, on_epoch,
                     base_ce_weight(method, recipe.ce_weight), init_optimizer)
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


def _start_members(data: DataBundle, student_spec: Spec, methods: list[Method], recipe: Recipe,
                   seed: int, accelerator: Accelerator, teacher: nn.Module | None,
                   checkpoints: Sequence[Path | None], on_epoch: Sequence[OnEpoch | None],
                   compile: bool) -> list[_Member]:
    """Every method's member; one that cannot start is stopped alone with its error."""
    members = []
    for i, (m, c, cb) in enumerate(zip(methods, checkpoints, on_epoch, strict=True)):
        try:
            members.append(_start_member(data, student_spec, m, recipe, seed, accelerator,
                                         teacher, c, cb, compile))
        except BaseException as exc:  # noqa: BLE001 - a student that cannot start stops alone
            members.append(_Member(m, None, None, None, c, cb, 0.0))
            members[-1].fail(exc)
        members[-1].index = i
    return members


def _sgd(trainee: nn.Module, recipe: Recipe, lr: float) -> torch.optim.Optimizer:
    """SGD over every parameter of ``trainee`` with the recipe's momentum and weight decay."""
    return torch.optim.SGD(trainee.parameters(), lr=lr, momentum=recipe.momentum,
                           nesterov=recipe.nesterov, weight_decay=recipe.weight_decay)


def _frozen_teacher(teacher: nn.Module | None, methods: list[Method],
                    accelerator: Accelerator) -> nn.Module | None:
    """The teacher on the accelerator's device, frozen in eval mode (None where no method
    needs one; an error where one does and there is none)."""
    for m in methods:
        if m.needs_teacher and teacher is None:
            raise KtBenchError(f"method '{m.name}' needs a teacher")
    if not any(m.needs_teacher for m in methods):
        return None
    teacher = teacher.to(accelerator.device, memory_format=torch.channels_last)
    return teacher.eval().requires_grad_(False)


def _teacher_of(teacher: nn.Module | None, members: list[_Member], compile: bool
                ) -> TeacherTaps | None:
    """The teacher as the members that started read it."""
    if teacher is None:
        return None
    if compile:  # after the members' shape probes, which would each compile it again
        compile_model(teacher)
    return TeacherTaps(teacher, [m.method for m in members if m.error is None])


def _plan(members: list[_Member], epoch: int, recipe: Recipe, accelerator: Accelerator
          ) -> list[_Planned]:
    """The members that train in global ``epoch``, each with its plan, in its stage's mode
    (a plan that fails stops its member alone)."""
    planned = []
    for m in members:
        if not m.trains_in(epoch, recipe.epochs):
            continue
        try:
            plan = plan_epoch(m.method, epoch, recipe.epochs, m.base_ce)
        except BaseException as exc:  # noqa: BLE001 - this student stops, the rest go on
            m.fail(exc)
            continue
        planned.append(_Planned(m, plan, m.init_optimizer if plan.stage == INIT
                                else m.optimizer))
    for p in planned:
        p.member.trainee.train()
        init = p.member.method.needs.init
        if p.plan.stage == INIT and not init.trains_student:
            accelerator.unwrap_model(p.member.trainee).student.eval()
    return planned


def _step(p: _Planned, accelerator: Accelerator, x: torch.Tensor, batch,
          t_taps: dict | None, hooks: TrainingHooks, global_step: int) -> None:
    """One optimisation step of one student; loss terms are summed on the device."""
    with accelerator.autocast():
        out = step_loss(p.member.trainee, x, batch, t_taps, p.plan)
    accelerator.backward(out.loss)
    p.optimizer.step()
    p.optimizer.zero_grad(set_to_none=True)
    _record(p, out, hooks, global_step)


def _record(p: _Planned, out: StepLoss, hooks: TrainingHooks, global_step: int) -> None:
    """Add a step's loss and terms to the member's sums (on the device)."""
    values = {**out.terms, "loss": out.loss}
    for name, value in values.items():
        p.sums[name] = p.sums.get(name, 0) + value.detach().float()
    if hooks.wants_step_values:  # reading the values back waits for the device
        hooks.step_values(global_step, values)


#: The :class:`StepTimer` key of a fused group's steps (shared out among its members).
_FUSED = -1


def _fused_step(fusion: CohortFusion, accelerator: Accelerator, x: torch.Tensor,
                y: torch.Tensor, idx: torch.Tensor, step_seed: int, read: dict | None,
                hooks: TrainingHooks, global_step: int, timer: StepTimer,
                fused_steps: dict[int, int]) -> set[int]:
    """The fused group's step, if there is one; the ``id`` of each member it stepped or
    failed (the others step one by one). A failure of the fused passes ends fusion and
    leaves the batch to the members' own steps."""
    fusion.refresh()
    grouped = fusion.grouped()
    if not grouped:
        return grouped
    try:
        with timer.timing(_FUSED):
            stepped = fusion.group.step(accelerator, x, y, idx, step_seed, read)
    except FusionFailed as exc:
        for m in fusion.group.members:  # what the failed passes left behind
            if m.error is None:
                m.optimizer.zero_grad(set_to_none=True)
        fusion.fail(exc)
        return set()
    for p, out in stepped:
        _record(p, out, hooks, global_step)
    for m in fusion.group.members:
        fused_steps[m.index] = fused_steps.get(m.index, 0) + 1
    for p, _ in stepped:
        p.member.fused_steps += 1
    return grouped


def _run_epoch(planned: list[_Planned], data: DataBundle, epoch: int, seed: int,
               recipe: Recipe, accelerator: Accelerator, teacher: TeacherTaps | None,
               hooks: TrainingHooks, steps: int, fusion: CohortFusion) -> tuple[int, float]:
    """One pass over the training data: the teacher once per batch, then the fused group's
    step and every other planned student's own. The number of steps and the seconds they
    took."""
    methods = [p.member.method for p in planned]
    world = accelerator.num_processes
    timer = StepTimer(accelerator.device)
    fused_steps: dict[int, int] = {}  # member index -> steps taken in the fused group
    fusion.plan(planned)
    n_steps, t0 = 0, time.perf_counter()
    for x, y, idx in data.train_batches(epoch, seed, recipe.batch_size, accelerator.device,
                                        accelerator.process_index, world, indices=True):
        x = channels_last(x)
        read = teacher.read(x, methods, accelerator.autocast) if teacher else {}
        n_steps += 1
        step_seed = derived_seed(seed, 5, epoch, n_steps)
        global_step = epoch * steps + n_steps
        grouped = _fused_step(fusion, accelerator, x, y, idx, step_seed,
                              read if teacher else None, hooks, global_step, timer,
                              fused_steps)
        for p in planned:
            if id(p.member) in grouped:
                p.member.images += x.shape[0] * world
                continue
            if p.member.error is not None:
                continue
            try:
                t_taps = TeacherTaps.of(p.member.method, read) if teacher else None
                with timer.timing(p.member.index):
                    _step(p, accelerator, x, p.plan.batch(y, idx, step_seed), t_taps, hooks,
                          global_step)
            except BaseException as exc:  # noqa: BLE001 - this student stops, the rest go on
                p.member.fail(exc)
            p.member.images += x.shape[0] * world
        hooks.step()
    shares = sum(fused_steps.values())
    for p in planned:  # a fused step's time is shared out among the members it stepped
        fused = timer.seconds(_FUSED) * fused_steps.get(p.member.index, 0) / shares if shares else 0
        p.member.step_s += timer.seconds(p.member.index) + fused
    return n_steps, time.perf_counter() - t0


def _close_epoch(p: _Planned, accelerator: Accelerator, data: DataBundle, recipe: Recipe,
                 epoch: int, n_steps: int, seconds: float) -> None:
    """Close one epoch of one student: record, check for divergence, schedule, evaluate,
    checkpoint."""
    member = p.member
    member.train_s += seconds
    member.epoch_s.append(seconds)
    record: dict[str, Any] = {"epoch": epoch + 1, "lr": p.optimizer.param_groups[0]["lr"]}
    if p.plan.stage == INIT:
        record["stage"] = INIT
    record.update({k: v.item() / max(n_steps, 1) for k, v in p.sums.items()})
    if not math.isfinite(record.get("loss", 0.0)):
        raise DivergedError(f"loss became {record['loss']} in epoch {epoch + 1}")
    if p.plan.stage == MAIN:
        member.scheduler.step()
    record.update(evaluate(accelerator, accelerator.unwrap_model(member.trainee).student, data,
                           recipe.eval_batch_size))
    member.history.append(record)
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


def _close_epochs(planned: list[_Planned], accelerator: Accelerator, data: DataBundle,
                  recipe: Recipe, epoch: int, n_steps: int, seconds: float,
                  hooks: TrainingHooks, steps: int) -> None:
    """Close the epoch of every student still training (one that fails stops alone)."""
    for p in planned:
        if p.member.error is None:
            try:
                _close_epoch(p, accelerator, data, recipe, epoch, n_steps, seconds)
            except BaseException as exc:  # noqa: BLE001
                p.member.fail(exc)
    hooks.epoch_end((epoch + 1) * steps, {p.member.index: p.member.history[-1] for p in planned
                                          if p.member.error is None and p.member.history})


def train_cohort(
    data: DataBundle,
    student_spec: Spec,
    methods: list[Method],
    recipe: Recipe,
    seed: int,
    accelerator: Accelerator,
    teacher: nn.Module | None = None,
    checkpoints: list[Path | None] | None = None,
    on_epoch: list[OnEpoch | None] | None = None,
    compile: bool = False,
    hooks: Sequence[TrainingHooks] = (),
    fuse: bool = False,
    log: Callable[[str], None] | None = None,
) -> list[TrainResult]:
    """Train one student per method, together, in one pass over the data: each batch is
    augmented once and goes through the teacher once, and every student takes its step.

    Every student is built, seeded, stepped, evaluated and checkpointed exactly as a solo run
    of its cell would be, so on the CPU each result equals the solo run's bit for bit. A
    student whose loss diverges or whose method raises (or calls ``sys.exit()``) is stopped
    with the error in its result; the others go on. An interrupt (Ctrl-C, SIGTERM, a signal
    handler's exit) stops them all. ``checkpoints`` and ``on_epoch`` are per student; a student
    resumes from its checkpoint and trains only the epochs it lacks. ``hooks`` hear of the
    run's progress (:func:`~kt_bench.training.hooks.standard_hooks`: a progress bar, the
    start-up clock, trackers). With ``compile``, the students' and the teacher's forward
    passes go through ``torch.compile`` (results then match an uncompiled run closely, not bit
    for bit).

    With ``fuse``, the students in their main stage train as one fused network
    (:mod:`~kt_bench.training.fused_cohort`): each result then matches the unfused one to
    float rounding, not bit for bit, and a fused run resumed from its checkpoints continues
    exactly. Fusion needs one process and no ``compile`` (else it is off), and students that
    can be fused (:func:`fusion_refusal`); ``log`` hears why where it is off or ends.
    """
    started = time.perf_counter()
    hooks = HookList(hooks)
    teacher = _frozen_teacher(teacher, methods, accelerator)
    members = _start_members(data, student_spec, methods, recipe, seed, accelerator, teacher,
                             checkpoints or [None] * len(methods),
                             on_epoch or [None] * len(methods), compile)
    taught = _teacher_of(teacher, members, compile)
    hooks.networks_ready()
    steps = math.ceil(data.n_train / recipe.batch_size)
    healthy = [m for m in members if m.error is None]
    first = min((m.start_epoch for m in healthy), default=0)
    last = max((total_epochs(m.method, recipe.epochs) for m in healthy), default=0)
    hooks.start(steps * max(last - first, 0))
    log = log or _warn
    why_not = fusion_refusal(accelerator, compile) if fuse else None
    if why_not:
        log(f"the students train one by one: {why_not}")
    fusion = CohortFusion(fuse and not why_not, accelerator, data.probe() if fuse else None,
                          log)
    try:
        # global epochs: a member's initialisation stage (if any), then the recipe's epochs;
        # the data order of each global epoch is shared by the cohort
        for epoch in range(first, last):
            planned = _plan(members, epoch, recipe, accelerator)
            if not planned:
                break
            n_steps, seconds = _run_epoch(planned, data, epoch, seed, recipe, accelerator,
                                          taught, hooks, steps, fusion)
            _close_epochs(planned, accelerator, data, recipe, epoch, n_steps, seconds, hooks,
                          steps)
    finally:
        fusion.close()
        hooks.end()
        if taught is not None:
            taught.remove()
    return _results(members, accelerator, time.perf_counter() - started)


def fusion_refusal(accelerator: Accelerator, compile: bool) -> str | None:
    """Why a cohort on ``accelerator`` cannot train fused (None: it can): fusion needs one
    process (data parallelism reduces each student's own gradients) and eager networks, and
    fp16's loss scaling is per optimiser, not per fused network."""
    if accelerator.num_processes > 1:
        return "fusion needs one process"
    if compile:
        return "fusion does not run compiled networks"
    if accelerator.mixed_precision == "fp16":
        return "fusion does not run under fp16's loss scaling"
    return None


def _warn(line: str) -> None:
    print(f"kt-bench: {line}", file=sys.stderr)


def _results(members: list[_Member], accelerator: Accelerator, wall: float
             ) -> list[TrainResult]:
    """Each member's :class:`TrainResult`."""
    facts = [_facts(m) if m.trainee else {} for m in members]  # first: it may fail one
    return [TrainResult(accelerator.unwrap_model(m.trainee).student if m.trainee else None,
                        m.history, wall, m.train_s, m.images, m.epoch_s, m.error, f,
                        m.step_s, m.fused_steps)
            for m, f in zip(members, facts, strict=True)]


def _facts(member: _Member) -> dict[str, Any]:
    """The member's :meth:`Method.facts` (none where they fail, which fails the member if
    nothing did before)."""
    try:
        return member.method.facts()
    except BaseException as exc:  # noqa: BLE001
        if member.error is None:
            member.fail(exc)
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
    on_epoch: OnEpoch | None = None,
    compile: bool = False,
    hooks: Sequence[TrainingHooks] = (),
) -> TrainResult:
    """Train ``student_spec`` on ``data`` under ``method`` (taught by ``teacher``, if the method
    needs one) with ``recipe``; evaluate after every epoch (a cohort of one).

    With ``checkpoint``, the state after each epoch is written there atomically, and a run
    that finds one resumes after its epoch. ``on_epoch`` gets the history after each epoch.
    An error in training (a diverged loss, a failing method) is raised. ``compile`` and
    ``hooks``: see :func:`train_cohort`.
    """
    (result,) = train_cohort(data, student_spec, [method], recipe, seed, accelerator, teacher,
                             [checkpoint], [on_epoch], compile, hooks)
    if result.error is not None:
        raise result.error
    return result
