"""What the training loop tells the world while it runs — a progress bar, a tracker's logs,
the start-up clock — as callbacks its caller passes in; the loop itself only trains."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from kt_bench.core.clock import CLOCK, StartupClock
from kt_bench.training.device import sync_device


class TrainingHooks:
    """Callbacks of one training run (a cohort); each does nothing unless overridden."""

    #: Whether :meth:`step_values` is wanted (reading a step's values back costs a sync).
    wants_step_values: bool = False

    def networks_ready(self) -> None:
        """The networks are built and set up; the first epoch starts next."""

    def start(self, total_steps: int) -> None:
        """Training starts; ``total_steps`` steps remain over all epochs."""

    def step(self) -> None:
        """Every student took its step on one batch."""

    def step_values(self, step: int, values: Mapping[str, torch.Tensor]) -> None:
        """The loss terms and loss of the only student's global ``step`` (1-based)."""

    def epoch_end(self, step: int, records: Mapping[int, Mapping[str, Any]]) -> None:
        """An epoch ended at global ``step``; ``records`` are the epoch's history records of
        the students still training, by each student's position among the run's methods."""

    def end(self) -> None:
        """Training stopped (finished, failed or interrupted)."""


class HookList(TrainingHooks):
    """Several hooks called in order as one."""

    def __init__(self, hooks: Sequence[TrainingHooks] = ()) -> None:
        self.hooks = list(hooks)
        self.wants_step_values = any(h.wants_step_values for h in self.hooks)

    def networks_ready(self) -> None:
        """Each hook's :meth:`TrainingHooks.networks_ready`."""
        for h in self.hooks:
            h.networks_ready()

    def start(self, total_steps: int) -> None:
        """Each hook's :meth:`TrainingHooks.start`."""
        for h in self.hooks:
            h.start(total_steps)

    def step(self) -> None:
        """Each hook's :meth:`TrainingHooks.step`."""
        for h in self.hooks:
            h.step()

    def step_values(self, step: int, values: Mapping[str, torch.Tensor]) -> None:
        """Each hook's :meth:`TrainingHooks.step_values`, where it wants them."""
        for h in self.hooks:
            if h.wants_step_values:
                h.step_values(step, values)

    def epoch_end(self, step: int, records: Mapping[int, Mapping[str, Any]]) -> None:
        """Each hook's :meth:`TrainingHooks.epoch_end`."""
        for h in self.hooks:
            h.epoch_end(step, records)

    def end(self) -> None:
        """Each hook's :meth:`TrainingHooks.end`."""
        for h in self.hooks:
            h.end()


class ProgressBar(TrainingHooks):
    """A tqdm bar of the run's steps, with the loss and top-1 of a lone student."""

    def __init__(self, desc: str = "", disable: bool = False) -> None:
        self.desc, self.disable = desc, disable
        self.bar: tqdm | None = None

    def start(self, total_steps: int) -> None:
        """Open the bar."""
        self.bar = tqdm(total=total_steps, desc=self.desc, leave=False, disable=self.disable,
                        unit="step")

    def step(self) -> None:
        """Advance the bar."""
        if self.bar is not None:
            self.bar.update(1)

    def epoch_end(self, step: int, records: Mapping[int, Mapping[str, Any]]) -> None:
        """Show a lone student's loss and top-1."""
        if self.bar is not None and len(records) == 1:
            (record,) = records.values()
            self.bar.set_postfix(loss=f"{record['loss']:.3f}", top1=f"{record['top1']:.1f}")

    def end(self) -> None:
        """Close the bar."""
        if self.bar is not None:
            self.bar.close()


class StartupTimer(TrainingHooks):
    """Marks the start-up clock: networks built, and the first step done (after the device
    finished it)."""

    def __init__(self, device: torch.device, clock: StartupClock = CLOCK) -> None:
        self.device, self.clock = device, clock

    def networks_ready(self) -> None:
        """Mark the networks' stage."""
        self.clock.mark("networks")

    def step(self) -> None:
        """Mark the first step, once."""
        if not self.clock.done:
            sync_device(self.device)
            self.clock.mark(self.clock.FINAL)


class TrackerLog(TrainingHooks):
    """Logs to the accelerator's trackers (``--log-with``): every epoch's test accuracy and,
    with ``steps`` (one student per run), every step's loss terms."""

    def __init__(self, accelerator, steps: bool) -> None:
        self.accelerator = accelerator
        self.wants_step_values = steps

    def step_values(self, step: int, values: Mapping[str, torch.Tensor]) -> None:
        """Log the step's loss terms."""
        self.accelerator.log({f"train/{k}": v.item() for k, v in values.items()}, step=step)

    def epoch_end(self, step: int, records: Mapping[int, Mapping[str, Any]]) -> None:
        """Log each record's test accuracy."""
        for record in records.values():
            self.accelerator.log({f"test/{k}": record[k] for k in ("top1", "top5")}, step=step)


def standard_hooks(accelerator, desc: str = "", students: int = 1) -> list[TrainingHooks]:
    """The hooks of a run from the command line: a progress bar on the local main process,
    the start-up clock, and the trackers where the accelerator has any (per-step values only
    for one student)."""
    hooks: list[TrainingHooks] = [ProgressBar(desc, not accelerator.is_local_main_process),
                                  StartupTimer(accelerator.device)]
    if accelerator.trackers:
        hooks.append(TrackerLog(accelerator, students == 1))
    return hooks
