"""What the training loop tells the world while it runs — a progress bar, a line per epoch,
a tracker's logs, the start-up clock — as callbacks its caller passes in; the loop itself only
trains."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from kt_bench.core.clock import CLOCK, StartupClock
from kt_bench.core.durations import format_duration, time_left
from kt_bench.training.device import sync_device


def bars_wanted() -> bool:
    """Whether progress bars may be drawn: on a terminal (stderr, where tqdm draws them) or in
    a notebook (a widget). In a file, a pipe or a cluster job's log a bar is only a stream of
    carriage-return frames, and the epoch lines say what it would."""
    if any(c.__module__ == "tqdm.notebook" for c in tqdm.__mro__):
        return True
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # no stderr, or a closed one
        return False


def say(line: str) -> None:
    """Print a progress line on stdout at once, above any progress bar (a terminal's bar
    is drawn again below it)."""
    tqdm.write(line)
    if sys.stdout is not None:
        sys.stdout.flush()


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
    """A tqdm bar of the run's steps named ``desc``, with the last epoch done (of ``epochs``,
    where given) and a lone student's loss and top-1; drawn only where
    :func:`bars_wanted`."""

    def __init__(self, desc: str = "", disable: bool = False, epochs: int | None = None) -> None:
        self.desc, self.disable, self.epochs = desc, disable or not bars_wanted(), epochs
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
        """Show the epoch done and a lone student's loss and top-1."""
        if self.bar is None or not records:
            return
        shown = {"epoch": f"{max(r['epoch'] for r in records.values())}"
                          f"{f'/{self.epochs}' if self.epochs else ''}"}
        if len(records) == 1:
            (record,) = records.values()
            shown.update(loss=f"{record['loss']:.3f}", top1=f"{record['top1']:.1f}")
        self.bar.set_postfix(shown)

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


class EpochClock(TrainingHooks):
    """When training started (its first epoch, after the networks were built), for what
    reports a run's progress to tell the time spent and estimate the time left."""

    def __init__(self) -> None:
        self.started: float | None = None

    def start(self, total_steps: int) -> None:
        """Start the clock."""
        self.started = time.monotonic()

    def elapsed(self) -> float:
        """Seconds since training started (0 before)."""
        return 0.0 if self.started is None else time.monotonic() - self.started


def timing(elapsed: float, eta: float | None, finished: bool) -> str:
    """The time part of a progress line: ``2m10s, ETA 6m30s``, or ``done in 2m10s``."""
    if finished:
        return f"done in {format_duration(elapsed)}"
    return f"{format_duration(elapsed)}, ETA {'?' if eta is None else format_duration(eta)}"


class EpochLines(TrainingHooks):
    """A line per epoch saying where training is: ``[label] epoch k/N``, each student's test
    top-1 and loss (by ``names``, the students' names by their position; None for one that
    ``label`` names already), the time spent and the time left at the pace of the epochs run
    so far. ``epochs``: each student's global epochs (an initialisation stage's included); a
    student that had records in this run and is missing from an epoch's before its last epoch
    stopped early (its row says why). One without records yet is left out of the line (in a
    resumed cohort it may be waiting for the others to reach the epoch its checkpoint holds)."""

    def __init__(self, label: str, names: Sequence[str] | None, epochs: Sequence[int],
                 clock: EpochClock, write: Callable[[str], None] = say) -> None:
        self.label, self.names, self.epochs = label, names, list(epochs)
        self.clock, self.write = clock, write
        self.run = 0  # epochs ended in this run (a resumed one starts after its checkpoint)
        self.seen: set[int] = set()  # the students with records in this run

    def epoch_end(self, step: int, records: Mapping[int, Mapping[str, Any]]) -> None:
        """Write the epoch's line."""
        self.run += 1
        self.seen.update(records)
        if not records:
            return  # every student stopped: their rows say why
        epoch = max(r["epoch"] for r in records.values())
        last = max(self.epochs)
        elapsed = self.clock.elapsed()
        eta = time_left(elapsed, self.run, last - epoch)
        self.write(f"[{self.label}] epoch {epoch}/{last}  {self._results(records, epoch)}  "
                   f"{timing(elapsed, eta, epoch >= last)}")

    def _results(self, records: Mapping[int, Mapping[str, Any]], epoch: int) -> str:
        """Each student's top-1 and loss, in order; ``stopped`` for one that stopped early."""
        if self.names is None:
            return "top-1 " + _result(next(iter(records.values())))
        parts = []
        for i, name in enumerate(self.names):
            if i in records:
                parts.append(f"{name} {_result(records[i])}")
            elif i in self.seen and self.epochs[i] >= epoch:
                parts.append(f"{name} stopped")
        return ", ".join(parts)


def _result(record: Mapping[str, Any]) -> str:
    """An epoch's test top-1 and training loss: ``91.2% (loss 0.412)``, marked in an
    initialisation stage."""
    stage = ", init" if record.get("stage") == "init" else ""
    return f"{record['top1']:.1f}% (loss {record['loss']:.3g}{stage})"


def standard_hooks(accelerator, desc: str = "", epochs: int | None = None,
                   tracking: TrainingHooks | None = None) -> list[TrainingHooks]:
    """The hooks of a run from the command line: a progress bar of ``epochs`` epochs on the
    local main process (on a terminal), the start-up clock, and ``tracking``, the hook of the
    cells' tracker runs where there are any
    (:meth:`kt_bench.training.tracking.CellRuns.hook`)."""
    hooks: list[TrainingHooks] = [ProgressBar(desc, not accelerator.is_local_main_process,
                                              epochs),
                                  StartupTimer(accelerator.device)]
    if tracking is not None:
        hooks.append(tracking)
    return hooks
