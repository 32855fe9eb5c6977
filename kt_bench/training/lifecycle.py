"""A method's life with a student and a teacher, in one place: prepared once (the training
labels, the teacher, its taps' shapes), planned per epoch (stage, term weights, cross-entropy
weight) and stepped per batch (logits, terms, loss). The engine, the dry run, the bench's
loops and the reference-composition tests all go through these functions, so what one of
them computes the others compute too.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from kt_bench.api.method import (
    INIT,
    MAIN,
    TEACHER_BATCH_STATISTICS,
    TEACHER_EVAL,
    Batch,
    Method,
    Shapes,
)
from kt_bench.core.errors import KtBenchError
from kt_bench.models.taps import LOGITS, TapRecorder

#: Shapes of the given taps of one network: ``f(taps) -> {tap: shape}``.
ShapesOf = Callable[[tuple[str, ...]], Shapes]


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


def prepare_method(method: Method, teacher: nn.Module | None, labels: torch.Tensor,
                   num_classes: int, student_shapes: ShapesOf, teacher_shapes: ShapesOf) -> None:
    """Let ``method`` read the training set's ``labels`` (in sample-index order), the frozen
    ``teacher``, and build its trainable parts from its taps' shapes, in that order; a method
    that needs no teacher has nothing to prepare."""
    if not method.needs_teacher:
        return
    if teacher is None:
        raise KtBenchError(f"method '{method.name}' needs a teacher")
    method.setup_data(labels, num_classes)
    method.setup_teacher(teacher)
    method.setup(student_shapes(method.taps), teacher_shapes(method.taps))


def prepare_on_probe(method: Method, student: nn.Module, teacher: nn.Module | None,
                     labels: torch.Tensor, num_classes: int, probe: torch.Tensor) -> None:
    """:func:`prepare_method` with the shapes of the student's and the teacher's taps on a
    ``probe`` batch of images (moved to the teacher's device for the teacher)."""

    def teacher_shapes(taps: tuple[str, ...]) -> Shapes:
        return tap_shapes(teacher, taps, probe.to(next(teacher.parameters()).device))

    prepare_method(method, teacher, labels, num_classes,
                   lambda taps: tap_shapes(student, taps, probe), teacher_shapes)


@dataclass(frozen=True)
class EpochPlan:
    """What a method does in one global epoch: its stage (``init`` or ``main``), the epoch
    within the stage and the stage's epochs, the weight of each of its terms and the weight
    of the cross-entropy."""

    stage: str
    epoch: int
    epochs: int
    weights: Mapping[str, float]
    ce_weight: float

    def batch(self, labels: torch.Tensor, indices: torch.Tensor | None = None,
              seed: int = 0) -> Batch:
        """The :class:`Batch` a step of this epoch gives the method."""
        return Batch(labels, self.epoch, self.epochs, indices, self.stage, seed)


def total_epochs(method: Method, epochs: int) -> int:
    """The global epochs of ``method`` under a recipe of ``epochs``: its initialisation
    stage's, then the recipe's."""
    return method.needs.init_epochs + epochs


def plan_epoch(method: Method, epoch: int, epochs: int, base_ce: float) -> EpochPlan:
    """The :class:`EpochPlan` of global ``epoch`` (0-based; an initialisation stage's epochs
    come first) of a recipe of ``epochs`` whose cross-entropy weight is ``base_ce``: no
    labels in the initialisation stage, else the method's scale of ``base_ce``."""
    init = method.needs.init_epochs
    if epoch < init:
        return EpochPlan(INIT, epoch, init, method.init_term_weights(epoch, init), 0.0)
    e = epoch - init
    return EpochPlan(MAIN, e, epochs, method.term_weights(e, epochs),
                     base_ce * method.ce_scale(e, epochs))


def base_ce_weight(method: Method, recipe_ce_weight: float) -> float:
    """The cross-entropy weight ``method`` trains with: its own ``ce_weight`` if set, else the
    recipe's (each epoch then scales it by :meth:`Method.ce_scale`)."""
    return recipe_ce_weight if method.ce_weight is None else method.ce_weight


def check_batch(method: Method, batch: Batch) -> None:
    """A one-line error where ``batch`` lacks what ``method`` declares it reads."""
    if method.needs.indices and batch.indices is None:
        raise KtBenchError(f"method '{method.name}' needs the samples' indices in the "
                           "training set, and this loop gives none")


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


class Trainee(nn.Module):
    """The student and its method as one module, so data parallelism sees one forward pass."""

    def __init__(self, student: nn.Module, method: Method,
                 memory_format: torch.memory_format | None = None) -> None:
        super().__init__()
        self.student = student
        self.method = method
        self.memory_format = memory_format
        self.recorder = TapRecorder(student, student.tap_map, method.taps)

    def forward(self, x: torch.Tensor, teacher_taps: dict | None, batch: Batch):
        """The student's logits and the method's unweighted loss terms."""
        if self.memory_format is not None:  # in the student's own layout
            x = in_layout(x, self.memory_format)
        logits = self.student(x)
        taps = self.recorder.collect(logits)
        terms = self.method.terms(taps, teacher_taps, batch) if teacher_taps is not None else {}
        return logits, terms


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


@dataclass
class StepLoss:
    """One step's forward pass: the student's logits, the method's terms (with ``ce`` where
    the cross-entropy counts) and the weighted loss."""

    logits: torch.Tensor
    terms: dict[str, torch.Tensor]
    loss: torch.Tensor


def taps_loss(method: Method, taps: dict[str, torch.Tensor], teacher_taps: dict | None,
              batch: Batch, plan: EpochPlan) -> StepLoss:
    """The loss of ``plan`` on a student's ``taps`` (its logits among them), as
    :func:`step_loss` computes it after the forward pass: for a student whose forward pass
    ran elsewhere (a fused cohort's); a one-line error where ``batch`` lacks what the method
    declares it reads."""
    check_batch(method, batch)
    logits = taps[LOGITS]
    terms = method.terms(taps, teacher_taps, batch) if teacher_taps is not None else {}
    return StepLoss(logits, terms,
                    total_loss(logits, batch.labels, terms, plan.weights, plan.ce_weight))


def step_loss(trainee: nn.Module, x: torch.Tensor, batch: Batch, teacher_taps: dict | None,
              plan: EpochPlan) -> StepLoss:
    """The student's forward pass on ``x`` and the loss of ``plan`` on it (``trainee`` a
    :class:`Trainee`, possibly wrapped for data parallelism; run under the caller's
    autocast); a one-line error where ``batch`` lacks what the method declares it reads."""
    check_batch(_method_of(trainee), batch)
    logits, terms = trainee(x, teacher_taps, batch)
    return StepLoss(logits, terms,
                    total_loss(logits, batch.labels, terms, plan.weights, plan.ce_weight))


#: A function giving a fresh autocast context (e.g. ``accelerator.autocast``).
Autocast = Callable[[], contextlib.AbstractContextManager]


def teacher_taps(teacher: nn.Module, recorder: TapRecorder, x: torch.Tensor,
                 autocast: Autocast | None = None) -> dict[str, torch.Tensor]:
    """The teacher's taps on ``x`` under ``autocast()`` (if given), without gradients, as
    tensors autograd may save."""
    with autocast() if autocast else contextlib.nullcontext(), torch.inference_mode():
        taps = recorder.collect(teacher(x))
    # clones leave inference mode, so autograd may save them for backward
    return {k: v.clone() for k, v in taps.items()}


def batch_statistics_teacher(teacher: nn.Module) -> nn.Module:
    """A private copy of the frozen ``teacher`` whose BatchNorm layers normalise with each
    batch's statistics (train mode), for methods whose teacher mode asks for it."""
    return copy.deepcopy(teacher).train().requires_grad_(False)


class TeacherTaps:
    """The frozen teacher as a group of methods reads it: one forward pass per batch for all
    of them, and for methods whose ``needs.teacher_mode`` is ``batch_statistics`` one more
    through a private train-mode copy (made only where such a method is among them)."""

    def __init__(self, teacher: nn.Module, methods: Iterable[Method]) -> None:
        methods = list(methods)
        self.teacher = teacher
        evals = [m for m in methods if not _batch_statistics(m)]
        self.recorder = TapRecorder(teacher, teacher.tap_map,
                                    tuple(dict.fromkeys(t for m in evals for t in m.taps)))
        stats = [m for m in methods if _batch_statistics(m)]
        self.bs_teacher = batch_statistics_teacher(teacher) if stats else None
        self.bs_recorder = (TapRecorder(self.bs_teacher, self.bs_teacher.tap_map,
                                        tuple(dict.fromkeys(t for m in stats for t in m.taps)))
                            if stats else None)

    def read(self, x: torch.Tensor, methods: Iterable[Method], autocast: Autocast | None = None
             ) -> dict[str, dict[str, torch.Tensor]]:
        """The taps on ``x`` for each teacher mode one of ``methods`` needs, by mode (each
        forward pass under ``autocast()``, if given)."""
        methods = [m for m in methods if m.needs_teacher]
        out: dict[str, dict[str, torch.Tensor]] = {}
        if any(not _batch_statistics(m) for m in methods):
            out[TEACHER_EVAL] = teacher_taps(self.teacher, self.recorder, x, autocast)
        if self.bs_teacher is not None and any(_batch_statistics(m) for m in methods):
            out[TEACHER_BATCH_STATISTICS] = teacher_taps(self.bs_teacher, self.bs_recorder, x,
                                                         autocast)
        return out

    @staticmethod
    def of(method: Method, read: Mapping[str, dict[str, torch.Tensor]]
           ) -> dict[str, torch.Tensor] | None:
        """The taps ``method`` reads of what :meth:`read` returned (None: it has no teacher)."""
        if not method.needs_teacher:
            return None
        return read[TEACHER_BATCH_STATISTICS if _batch_statistics(method) else TEACHER_EVAL]

    def remove(self) -> None:
        """Remove the recorders' hooks from the teacher(s)."""
        self.recorder.remove()
        if self.bs_recorder is not None:
            self.bs_recorder.remove()


def _batch_statistics(method: Method) -> bool:
    return method.needs.teacher_mode == TEACHER_BATCH_STATISTICS


def _method_of(trainee: nn.Module) -> Method:
    """The method of a :class:`Trainee`, unwrapped from data parallelism where it is."""
    return getattr(trainee, "module", trainee).method
