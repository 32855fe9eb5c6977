"""The one training loop: a student (plus its method's parameters) learns from a frozen teacher.

Accelerate owns the device, mixed precision, the backward pass and data parallelism. Every
random choice derives from the cell's seed: the student's initialisation (the same for every
method of a seed), the data order and the augmentation of each epoch, so a cell run twice on
the CPU gives the same numbers, and a cell resumed from its checkpoint continues exactly.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import set_seed
from torch import nn
from tqdm.auto import tqdm

from kt_bench import atomic
from kt_bench.config import Recipe
from kt_bench.data.bundle import DataBundle, derived_seed
from kt_bench.errors import KtBenchError
from kt_bench.method import Method
from kt_bench.models import build_model
from kt_bench.spec import Spec
from kt_bench.taps import TapRecorder

DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("no", "bf16", "fp16")


class DivergedError(KtBenchError):
    """The training loss became NaN or infinite."""


def make_accelerator(device: str = "auto", precision: str = "no", log_with: str | None = None,
                     project_dir: str | None = None) -> Accelerator:
    """An Accelerator for ``device`` (auto|cpu|cuda) and ``precision`` (no|bf16|fp16);
    ``log_with`` names an Accelerate tracker (e.g. ``tensorboard``) writing under
    ``project_dir``."""
    if device not in DEVICES:
        raise KtBenchError(f"unknown device '{device}'; accepted: {', '.join(DEVICES)}")
    if precision not in PRECISIONS:
        raise KtBenchError(f"unknown precision '{precision}'; accepted: {', '.join(PRECISIONS)}")
    if device == "cuda" and not torch.cuda.is_available():
        raise KtBenchError("--device cuda was asked for, but no CUDA device is available")
    # Accelerate keeps one process-wide state; a new device or precision needs it reset.
    AcceleratorState._reset_state(reset_partial_state=False)
    try:
        accelerator = Accelerator(cpu=device == "cpu", mixed_precision=precision,
                                  log_with=log_with, project_dir=project_dir)
    except (ValueError, ImportError, RuntimeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise KtBenchError(f"cannot log with '{log_with}': {first}") from None
    if log_with and not accelerator.log_with:
        raise KtBenchError(f"--log-with {log_with}: that tracker's package is not installed "
                           f"(for TensorBoard: pip install tensorboard)")
    return accelerator


class Trainee(nn.Module):
    """The student and its method as one module, so data parallelism sees one forward pass."""

    def __init__(self, student: nn.Module, method: Method) -> None:
        super().__init__()
        self.student = student
        self.method = method
        self.recorder = TapRecorder(student, student.tap_map, method.taps)

    def forward(self, x: torch.Tensor, teacher_taps: dict | None):
        """The student's logits and the method's unweighted loss terms."""
        logits = self.student(x)
        taps = self.recorder.collect(logits)
        terms = self.method.loss_terms(taps, teacher_taps) if teacher_taps is not None else {}
        return logits, terms


@dataclass
class TrainResult:
    """What one training run produced."""

    model: nn.Module
    history: list[dict[str, Any]] = field(default_factory=list)
    wall_s: float = 0.0
    train_s: float = 0.0
    images: int = 0

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
        return max(h["top1"] for h in self.history)

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
    correct = torch.zeros(2, dtype=torch.float64, device=accelerator.device)
    for x, y in data.test_batches(batch_size, accelerator.device, rank, world):
        with accelerator.autocast():
            logits = model(x)
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hit = top.eq(y[:, None])
        correct[0] += hit[:, 0].sum()
        correct[1] += hit.any(dim=1).sum()
    total = accelerator.reduce(correct, reduction="sum") if world > 1 else correct
    top1, top5 = (100.0 * total / data.n_test).tolist()
    return {"top1": top1, "top5": top5}


def _tap_shapes(model: nn.Module, taps: tuple[str, ...], x: torch.Tensor) -> dict[str, torch.Size]:
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
) -> TrainResult:
    """Train ``student_spec`` on ``data`` under ``method`` (taught by ``teacher``, if the method
    needs one) with ``recipe``; evaluate after every epoch.

    With ``checkpoint``, the state after each epoch is written there atomically, and a run
    that finds one resumes after its epoch. ``on_epoch`` gets the history after each epoch.
    With trackers on the accelerator (``--log-with``), every step's loss terms are logged.
    """
    started = time.perf_counter()
    if method.needs_teacher and teacher is None:
        raise KtBenchError(f"method '{method.name}' needs a teacher")
    set_seed(seed)
    student = build_model(student_spec, data.num_classes, data.in_channels)
    probe = data.probe()
    teacher_rec = None
    if method.needs_teacher:
        teacher = teacher.to(accelerator.device).eval().requires_grad_(False)
        set_seed(derived_seed(seed, 2))  # the method's own parameters
        method.setup(_tap_shapes(student, method.taps, probe),
                     _tap_shapes(teacher, method.taps, probe.to(accelerator.device)))
        teacher_rec = TapRecorder(teacher, teacher.tap_map, method.taps)
    trainee = Trainee(student, method)
    optimizer = torch.optim.SGD(trainee.parameters(), lr=recipe.lr, momentum=recipe.momentum,
                                nesterov=recipe.nesterov, weight_decay=recipe.weight_decay)
    scheduler = make_scheduler(optimizer, recipe)
    history: list[dict[str, Any]] = []
    start_epoch, train_s, images = 0, 0.0, 0
    if checkpoint is not None and checkpoint.exists():
        state = torch.load(checkpoint, map_location="cpu", weights_only=False)
        trainee.load_state_dict(state["trainee"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        history, train_s, images = state["history"], state["train_s"], state["images"]
        start_epoch = len(history)
    trainee, optimizer = accelerator.prepare(trainee, optimizer)
    device = accelerator.device
    rank, world = accelerator.process_index, accelerator.num_processes
    steps = math.ceil(data.n_train / recipe.batch_size)
    base_ce = recipe.ce_weight if method.ce_weight is None else method.ce_weight
    bar = tqdm(total=steps * (recipe.epochs - start_epoch), desc=desc, leave=False,
               disable=not accelerator.is_local_main_process, unit="step")
    try:
        for epoch in range(start_epoch, recipe.epochs):
            weights = method.term_weights(epoch, recipe.epochs)
            ce_weight = base_ce * method.ce_scale(epoch, recipe.epochs)
            sums: dict[str, torch.Tensor] = {}
            n_steps = 0
            trainee.train()
            t0 = time.perf_counter()
            for x, y in data.train_batches(epoch, seed, recipe.batch_size, device, rank, world):
                with accelerator.autocast():
                    t_taps = None
                    if teacher_rec is not None:
                        with torch.inference_mode():
                            t_taps = teacher_rec.collect(teacher(x))
                        # clones leave inference mode, so autograd may save them for backward
                        t_taps = {k: v.clone() for k, v in t_taps.items()}
                    logits, terms = trainee(x, t_taps)
                    loss_parts = {}
                    if ce_weight:
                        terms["ce"] = F.cross_entropy(logits.float(), y)
                        loss_parts["ce"] = ce_weight * terms["ce"]
                    for name, w in weights.items():
                        if w:
                            loss_parts[name] = w * terms[name]
                    loss = sum(loss_parts.values())
                accelerator.backward(loss)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                for name, value in {**terms, "loss": loss}.items():
                    sums[name] = sums.get(name, 0) + value.detach().float()
                n_steps += 1
                if accelerator.trackers:  # only when asked: logging reads the values back
                    accelerator.log({f"train/{k}": v.item() for k, v in terms.items()}
                                    | {"train/loss": loss.item()}, step=epoch * steps + n_steps)
                images += x.shape[0] * world
                bar.update(1)
            train_s += time.perf_counter() - t0
            record: dict[str, Any] = {"epoch": epoch + 1, "lr": optimizer.param_groups[0]["lr"]}
            record.update({k: v.item() / max(n_steps, 1) for k, v in sums.items()})
            if not math.isfinite(record.get("loss", 0.0)):
                raise DivergedError(f"loss became {record['loss']} in epoch {epoch + 1}")
            scheduler.step()
            record.update(evaluate(accelerator, accelerator.unwrap_model(trainee).student,
                                   data, recipe.eval_batch_size))
            history.append(record)
            if accelerator.trackers:
                accelerator.log({f"test/{k}": record[k] for k in ("top1", "top5")},
                                step=(epoch + 1) * steps)
            if on_epoch is not None and accelerator.is_main_process:
                on_epoch(history)
            bar.set_postfix(loss=f"{record['loss']:.3f}", top1=f"{record['top1']:.1f}")
            if checkpoint is not None and accelerator.is_main_process:
                atomic.torch_save(checkpoint, {
                    "trainee": accelerator.unwrap_model(trainee).state_dict(),
                    "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "history": history, "train_s": train_s, "images": images,
                })
    finally:
        bar.close()
        if teacher_rec is not None:
            teacher_rec.remove()
    model = accelerator.unwrap_model(trainee).student
    return TrainResult(model, history, time.perf_counter() - started, train_s, images)
