"""Teachers: trained once per (dataset, architecture, seed, recipe) and cached by config hash."""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import socket
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from accelerate import Accelerator
from torch import nn

from kt_bench.api.method import CrossEntropyOnly
from kt_bench.core import atomic
from kt_bench.core.durations import time_left
from kt_bench.core.errors import KtBenchError, first_line
from kt_bench.core.locks import FileLock
from kt_bench.data.bundle import DataBundle
from kt_bench.models import build_model
from kt_bench.sweep import progress
from kt_bench.sweep.cells import Cell, config_hash
from kt_bench.training.checkpoints import (
    UnsafeFileError,
    load_checkpoint,
    load_plain,
    log_beside,
    remove_checkpoint,
    state_dict_in,
)
from kt_bench.training.engine import evaluate, train
from kt_bench.training.hooks import (
    EpochClock,
    EpochLines,
    TrainingHooks,
    say,
    standard_hooks,
)
from kt_bench.training.reference_checkpoints import fit_state


def teacher_path(cache_dir: Path, cell: Cell) -> Path:
    """Where the teacher of ``cell`` is cached."""
    name = cell.teacher.name.replace(":", "_")  # timm:resnet18: no ':' in file names
    return cache_dir / f"{name}-{config_hash(cell.teacher_config())}.pt"


def _teacher_file(checkpoint: str, sha256: str | None) -> bytes:
    """The bytes of the user's teacher file ``checkpoint``, checked against ``sha256`` (its
    content when the cells were planned) where given."""
    try:
        blob = Path(checkpoint).read_bytes()
    except FileNotFoundError:
        raise KtBenchError(f"teacher checkpoint {checkpoint} does not exist") from None
    except PermissionError:
        raise atomic.unreadable(checkpoint) from None
    except OSError as exc:
        raise KtBenchError(f"teacher checkpoint {checkpoint} cannot be read: "
                           f"{exc.strerror or first_line(exc)}") from None
    if sha256 is not None and hashlib.sha256(blob).hexdigest() != sha256:
        raise KtBenchError(f"teacher checkpoint {checkpoint} changed after its cells were "
                           f"planned (SHA-256 {sha256[:12]}...); run again to plan cells for "
                           "the file as it is now")
    return blob


def load_state(model: nn.Module, checkpoint: str, sha256: str | None = None) -> None:
    """Load a user's checkpoint into ``model``: a state dict, or a dict holding one under
    ``model``, ``state_dict`` or ``net``, named as kt-bench names the weights or as
    RepDistiller's published teachers do (kt_bench.training.reference_checkpoints); a mismatch is a
    one-line error. The file is read without running code from it: one that holds more than
    plain data is refused in one line. With ``sha256``, the file must still have that
    content."""
    blob = _teacher_file(checkpoint, sha256)
    try:
        state = load_plain(io.BytesIO(blob))
    except UnsafeFileError as exc:
        raise KtBenchError(f"teacher checkpoint {checkpoint} cannot be read: {exc} (a file "
                           "of the model's state_dict() loads)") from None
    except Exception as exc:  # noqa: BLE001 - a broken file is one line
        raise KtBenchError(f"teacher checkpoint {checkpoint} cannot be read: "
                           f"{first_line(exc)}") from None
    state = state_dict_in(state)
    if not isinstance(state, dict):
        raise KtBenchError(f"teacher checkpoint {checkpoint} holds a {type(state).__name__}, "
                           "not a state dict")
    state = {str(k).removeprefix("module."): v for k, v in state.items()}
    state = fit_state(model, state, f"teacher checkpoint {checkpoint}")
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        # torch lists the problems on the lines after a heading; the first one says enough
        lines = [ln.strip() for ln in str(exc).splitlines()[1:] if ln.strip()]
        detail = (lines[0] if lines else str(exc))[:300]
        raise KtBenchError(f"teacher checkpoint {checkpoint} does not fit the teacher "
                           f"architecture: {detail}") from None


def get_teacher(cell: Cell, data: DataBundle, accelerator: Accelerator,
                cache_dir: Path) -> tuple[nn.Module, dict]:
    """The teacher of ``cell`` and its test metrics: from the cache; else loaded (a
    checkpoint, or torchvision weights) and evaluated; else trained (with the ``student``
    baseline method and the teacher recipe); then cached. Runners sharing the cache wait for
    each other rather than train one teacher twice. With several processes, the main one
    holds the lock and all of them load or train the teacher together."""
    path = teacher_path(cache_dir, cell)
    lock = FileLock(path.with_suffix(".lock"))
    if accelerator.is_main_process:
        lock.acquire()
    try:
        accelerator.wait_for_everyone()  # the others look at the cache once the main holds it
        return _get_teacher(cell, data, accelerator, path)
    finally:
        if accelerator.is_main_process:
            lock.release()


def _load_cached(cell: Cell, data: DataBundle, accelerator: Accelerator,
                 path: Path) -> tuple[nn.Module, dict] | None:
    """The cached teacher at ``path`` and its metrics; None when there is none, or when it is
    damaged or holds more than plain data (then it is moved aside, and named on stderr and in
    the cache's log.txt). A cache file this user may not read is an
    :class:`~kt_bench.core.errors.UnreadableFileError`, and stays as it is."""
    if not path.exists():
        return None
    model = build_model(cell.teacher, data.num_classes, data.in_channels, data.image_size)

    def apply(state: dict) -> None:
        model.load_state_dict(state["model"])
        float(state["metrics"]["top1"])  # a cache without its accuracy is no cache

    again = ("loading and evaluating it again" if cell.teacher_is_pretrained
             else "training it again")
    state = load_checkpoint(path, ("model", "metrics"), log_beside(path), apply,
                            accelerator.is_main_process, again)
    return None if state is None else (model.eval(), state["metrics"])


def _get_teacher(cell: Cell, data: DataBundle, accelerator: Accelerator,
                 path: Path) -> tuple[nn.Module, dict]:
    cached = _load_cached(cell, data, accelerator, path)
    if cached is not None:
        return cached
    model = build_model(cell.teacher, data.num_classes, data.in_channels, data.image_size)
    if cell.teacher_is_pretrained:
        if cell.teacher_checkpoint:
            load_state(model, cell.teacher_checkpoint, cell.teacher_sha256)
        model = model.to(accelerator.device)
        metrics = evaluate(accelerator, model, data, cell.teacher_recipe.eval_batch_size)
        if accelerator.is_main_process:
            atomic.torch_save(path, {"model": model.state_dict(), "metrics": metrics,
                                     "config": cell.teacher_config()})
        return model.eval(), metrics
    ckpt = path.with_suffix(".ckpt")
    result = train(data, cell.teacher, CrossEntropyOnly(), cell.teacher_recipe,
                   cell.teacher_training_seed, accelerator, checkpoint=ckpt,
                   hooks=_training_hooks(cell, accelerator, path))
    grid = progress.active()
    if grid is not None:  # the pace of a teacher's epochs, for the grid's time left
        grid.measured_teacher(result.wall_s, len(result.epoch_s))
    metrics = {"top1": result.top1, "top5": result.top5, "wall_s": result.wall_s}
    if accelerator.is_main_process:
        atomic.torch_save(path, {"model": result.model.state_dict(), "metrics": metrics,
                                 "config": cell.teacher_config()})
        remove_checkpoint(ckpt)
    return result.model.eval(), metrics


def teacher_label(cell: Cell) -> str:
    """How progress lines name the teacher of ``cell``: ``teacher resnet20 on digits, seed 0``."""
    return (f"teacher {cell.teacher.label} on {cell.dataset.label}, "
            f"seed {cell.teacher_training_seed}")


def _training_hooks(cell: Cell, accelerator: Accelerator, path: Path) -> list[TrainingHooks]:
    """What training the teacher of ``cell`` (cached at ``path``) reports: a bar (on a
    terminal) and, on the main process, a line per epoch and, within a grid's run, the
    progress file ``kt-bench status`` shows it by."""
    epochs = cell.teacher_recipe.epochs
    label = teacher_label(cell)
    clock = EpochClock()
    hooks: list[TrainingHooks] = [clock, *standard_hooks(accelerator, label, epochs)]
    grid = progress.active()
    if accelerator.is_main_process and grid is not None:
        facts = {"teacher": cell.teacher.label, "dataset": cell.dataset.label,
                 "seed": cell.teacher_training_seed,
                 "lock": str(path.with_suffix(".lock").resolve()),
                 "where": f"{socket.gethostname()} {os.getpid()}"}
        hooks.append(TrainingMarker(progress.teacher_marker(grid.out, path), epochs, clock,
                                    facts))
    if accelerator.is_main_process:
        hooks.append(EpochLines(label, None, [epochs], clock, say))
    return hooks


class TrainingMarker(TrainingHooks):
    """A progress file at ``path`` while a teacher trains: written when training starts and
    after each of its ``epochs`` epochs (with the time spent since ``clock`` started and the
    time left), removed when training stops; ``facts`` name the teacher. It only informs
    ``kt-bench status``: a file that cannot be written stops nothing."""

    def __init__(self, path: Path, epochs: int, clock: EpochClock,
                 facts: dict[str, Any]) -> None:
        self.path, self.epochs, self.clock, self.facts = path, epochs, clock, facts
        self.run = 0  # epochs of this run (a resumed teacher starts after its checkpoint's)

    def start(self, total_steps: int) -> None:
        """Announce the training."""
        progress.write_progress(self.path, progress.progress_record(
            None, self.epochs, 0.0, None, **self.facts))

    def epoch_end(self, step: int, records: Mapping[int, Mapping[str, Any]]) -> None:
        """Say which epoch is done and the time left."""
        self.run += 1
        if not records:
            return
        (record,) = records.values()
        elapsed = self.clock.elapsed()
        progress.write_progress(self.path, progress.progress_record(
            record["epoch"], self.epochs, elapsed,
            time_left(elapsed, self.run, self.epochs - record["epoch"]), **self.facts))

    def end(self) -> None:
        """Take the announcement back."""
        with contextlib.suppress(OSError):
            self.path.unlink(missing_ok=True)
            self.path.parent.rmdir()  # the last teacher training for the run folder
