"""Whether fusing a cohort's students pays, measured: a few bare training steps of the
students fused and one by one, on a batch of the cohort's shape, on the cohort's device and
precision. Small students on a GPU or a CPU gain (their steps are overhead); large ones on a
CPU can lose (the fused activations outgrow the caches), so the choice is measured, not read
from the device's name."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch import nn

from kt_bench.core.options import Spec
from kt_bench.data.bundle import DataBundle
from kt_bench.models import build_model
from kt_bench.models.taps import LOGITS
from kt_bench.training.device import sync_device, training_memory_format
from kt_bench.training.fusion import (
    FusedStudents,
    NotFusable,
    check_fusable,
    fused_memory_format,
)
from kt_bench.training.lifecycle import in_layout

#: Fusion is chosen where its steps take at most this share of the unfused ones' time (a
#: margin for the measurement's noise).
PAYS_BELOW = 0.95


@dataclass(frozen=True)
class FusionSpeed:
    """Seconds per step of ``members`` bare students, fused and one by one (``fused_s`` None
    where they cannot be fused: ``why`` says why)."""

    members: int
    fused_s: float | None
    unfused_s: float
    why: str = ""

    @property
    def pays(self) -> bool:
        """Whether the fused step is faster by the margin :data:`PAYS_BELOW`."""
        return self.fused_s is not None and self.fused_s <= PAYS_BELOW * self.unfused_s

    @property
    def speedup(self) -> float | None:
        """Unfused over fused seconds per step."""
        return self.unfused_s / self.fused_s if self.fused_s else None


def measure_fusion(student: Spec, data: DataBundle, batch_size: int, members: int,
                   accelerator: Accelerator, steps: int = 3, warmup: int = 1) -> FusionSpeed:
    """Time ``steps`` bare training steps (forward, cross-entropy, backward, SGD) of
    ``members`` students of ``student`` on a batch of ``batch_size`` of ``data``'s shape,
    fused and one by one, under the accelerator's autocast; the fastest step of each."""
    device = accelerator.device
    students, layout, opts = bare_students(student, data, members, device)
    x = data.probe(1).to(device).expand(batch_size, -1, -1, -1).contiguous()
    y = torch.arange(batch_size, device=device) % data.num_classes

    def one_by_one() -> None:
        for s, opt in zip(students, opts, strict=True):
            with accelerator.autocast():
                loss = F.cross_entropy(s(in_layout(x, layout)).float(), y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

    unfused = _fastest(one_by_one, steps, warmup, device)
    try:
        fused_layout = fused_memory_format(students, device)
        check_fusable(students, (), data.probe().to(device), fused_layout)
        fused = FusedStudents(students, (), fused_layout)
    except NotFusable as exc:
        return FusionSpeed(members, None, unfused, str(exc))
    step = fused_bare_step(fused, fused_layout, opts, accelerator)
    try:
        return FusionSpeed(members, _fastest(lambda: step(x, y), steps, warmup, device),
                           unfused)
    finally:
        fused.release()


def bare_students(student: Spec, data: DataBundle, members: int, device: torch.device
                  ) -> tuple[list[nn.Module], torch.memory_format, list[torch.optim.SGD]]:
    """``members`` freshly built students of ``student`` for ``data`` on ``device`` in the
    layout the engine trains them in, in training mode, each with an SGD optimiser."""
    with torch.random.fork_rng(devices=[]):  # the caller's random state is left as it was
        torch.manual_seed(0)
        students = [build_model(student, data.num_classes, data.in_channels, data.image_size)
                    for _ in range(members)]
    layout = training_memory_format(students[0], device)
    students = [s.to(device, memory_format=layout).train() for s in students]
    opts = [torch.optim.SGD(s.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
            for s in students]
    return students, layout, opts


def fused_bare_step(fused: FusedStudents, layout: torch.memory_format,
                    optimizers: Sequence[torch.optim.Optimizer], accelerator: Accelerator
                    ) -> Callable[[torch.Tensor, torch.Tensor], None]:
    """``step(x, y)``: the fused students' bare training step on images ``x`` and labels
    ``y``: one forward pass, the sum of the members' cross-entropies, one backward pass, each
    member's optimiser on its slice of the gradients; under the accelerator's autocast."""

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        with accelerator.autocast():
            taps = fused.forward(in_layout(x, layout))
            loss = sum(F.cross_entropy(t[LOGITS].float(), y) for t in taps)
        loss.backward()
        fused.share_grads()
        for opt in optimizers:
            opt.step()
            opt.zero_grad(set_to_none=True)

    return step


def _fastest(step, steps: int, warmup: int, device: torch.device) -> float:
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        sync_device(device)
        t0 = time.perf_counter()
        step()
        sync_device(device)
        times.append(time.perf_counter() - t0)
    return min(times)
