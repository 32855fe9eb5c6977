"""Checkpoints that survive damage: every save keeps the previous good copy beside the new one,
and a load that meets a damaged file keeps it aside, says so, and falls back to the previous
copy or to a fresh start instead of failing every run."""

from __future__ import annotations

import copy
import os
import pickle
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any

import torch
from tqdm.auto import tqdm

from kt_bench.core import atomic
from kt_bench.core.atomic import previous_path
from kt_bench.core.errors import KtBenchError, UnwritableFileError, first_line
from kt_bench.core.plain_data import refusal_reason

Log = Callable[[str], None]

#: What a training checkpoint holds (written after each epoch by the engine).
TRAINING_KEYS = ("trainee", "optimizer", "scheduler", "history", "train_s", "images")


class DamagedFileError(KtBenchError):
    """A file that reads but does not hold what it should."""


class UnsafeFileError(KtBenchError):
    """A file that holds more than plain data (tensors, numbers, strings, lists, dicts): loading
    it could run code, so it is not loaded. The message says what it would need."""


def load_plain(file: str | os.PathLike | IO[bytes]) -> Any:
    """What ``torch.save`` wrote to ``file`` (a path or a binary file), on the CPU, read
    without running any code from it: only tensors, numbers, strings, lists, tuples, sets and
    dicts load; anything else is an :class:`UnsafeFileError`. OSErrors (a missing file, one
    that may not be read) pass through."""
    try:
        with warnings.catch_warnings():
            # torch warns about the pickle protocol of files it did not write itself
            warnings.simplefilter("ignore")
            return torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise UnsafeFileError(refusal_reason(exc)) from None


#: The keys under which published checkpoints keep their state dict (RepDistiller's ``model``,
#: others' ``state_dict`` or ``net``).
STATE_DICT_KEYS = ("model", "state_dict", "net")


def state_dict_in(checkpoint: Any) -> Any:
    """The state dict a loaded checkpoint holds: the dict under the first of
    :data:`STATE_DICT_KEYS` it has, else the checkpoint itself."""
    for key in STATE_DICT_KEYS:
        if isinstance(checkpoint, dict) and isinstance(checkpoint.get(key), dict):
            return checkpoint[key]
    return checkpoint


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write ``state`` to ``path`` atomically; the file it replaces becomes the previous copy.
    At every instant at least one of the two is complete."""
    if path.exists():
        try:
            os.replace(path, previous_path(path))
        except OSError as exc:
            raise UnwritableFileError(f"cannot write {previous_path(path)}: "
                                      f"{exc.strerror or first_line(exc)}") from None
    atomic.torch_save(path, own_storage(state))


def own_storage(state: Any) -> Any:
    """``state`` with every tensor that views a larger storage copied out of it (a fused
    cohort's student views its slice of the fused network's tensors), so that a checkpoint
    holds each tensor's own values, not the storage around them: ``torch.save`` writes the
    whole storage of a view."""
    if isinstance(state, torch.Tensor):
        whole = state.untyped_storage().nbytes()
        return state.clone() if whole > state.numel() * state.element_size() else state
    if isinstance(state, dict):
        # a shallow copy keeps the dict's type and attributes (a state dict's layer versions,
        # a Counter's counts: a MultiStepLR's milestones), then each value is replaced
        out = copy.copy(state)
        for key, value in state.items():
            out[key] = own_storage(value)
        return out
    if isinstance(state, list | tuple):
        return type(state)(own_storage(v) for v in state)
    return state


def remove_checkpoint(path: Path) -> None:
    """Delete checkpoint ``path`` and its previous copy."""
    path.unlink(missing_ok=True)
    previous_path(path).unlink(missing_ok=True)


#: The log files this process could not append to (each is named once on stderr).
_unwritable_logs: set[Path] = set()


def log_beside(path: Path) -> Log:
    """A log that prints each line to stderr and appends it to ``log.txt`` beside ``path``. A
    log file that cannot be written (another user's, a full disk) is named once on stderr and
    the lines go to stderr alone."""
    log_file = path.parent / "log.txt"

    def log(line: str) -> None:
        tqdm.write(f"kt-bench: {line}", file=sys.stderr)
        try:
            atomic.append_line(log_file, line)
        except OSError as exc:
            if log_file not in _unwritable_logs:
                _unwritable_logs.add(log_file)
                tqdm.write(f"kt-bench: warning: cannot append to {log_file}: "
                           f"{exc.strerror or first_line(exc)}; its lines go to stderr only",
                           file=sys.stderr)
    return log


def _read(path: Path, required_keys: Sequence[str]) -> dict[str, Any]:
    state = load_plain(path)
    if not isinstance(state, dict):
        raise DamagedFileError(f"holds a {type(state).__name__}, not a checkpoint")
    missing = [k for k in required_keys if k not in state]
    if missing:
        raise DamagedFileError(f"lacks {', '.join(missing)}")
    return state


def _reason(exc: BaseException) -> str:
    """``exc`` in one line; under a heading that lists problems (torch's load_state_dict), the
    heading and the first problem."""
    line = first_line(exc)
    details = [ln.strip() for ln in str(exc).splitlines()[1:] if ln.strip()]
    return f"{line} {details[0][:200]}" if line.endswith(":") and details else line


def load_checkpoint(path: Path, required_keys: Sequence[str], log: Log,
                    apply: Callable[[dict[str, Any]], None] | None = None, main: bool = True,
                    otherwise: str = "starting from scratch") -> dict[str, Any] | None:
    """The state in checkpoint ``path``, else in its previous copy, else None. A file that
    cannot be read, lacks one of ``required_keys`` or that ``apply`` rejects (e.g. weights
    that do not fit the model) is moved aside and named in ``log``, ending with what happens
    next (``otherwise`` once no copy is left). A file that holds more than plain data counts
    as damaged (:func:`load_plain`). A file this user may not read is no damage: it stays where
    it is, and an :class:`~kt_bench.core.errors.UnreadableFileError` names it. With several
    processes, only the ``main`` one moves files and logs; the others reach the same verdict on
    the same files."""
    candidates = [p for p in (path, previous_path(path)) if p.exists()]
    for i, candidate in enumerate(candidates):
        try:
            state = _read(candidate, required_keys)
            if apply is not None:
                apply(state)
        except PermissionError:  # someone else's file: not ours to replace
            raise atomic.unreadable(candidate) from None
        except Exception as exc:  # noqa: BLE001 - whatever is wrong, the file is unusable
            if main:
                then = (f"trying {candidates[i + 1].name}" if i + 1 < len(candidates)
                        else otherwise)
                aside = atomic.move_aside(candidate)
                kept = f"; kept as {aside.name}" if aside is not None else ""
                log(f"{candidate} is damaged ({_reason(exc)}){kept}; {then}")
            continue
        if candidate != path and main:
            log(f"resuming from {candidate}, the previous copy")
        return state
    return None


def _check_progress(state: dict[str, Any]) -> None:
    history = state["history"]
    if not (isinstance(history, list) and all(isinstance(h, dict) for h in history)):
        raise DamagedFileError("its history is not a list of epochs")
    if not all(isinstance(state[k], int | float) for k in ("train_s", "images")):
        raise DamagedFileError("its train_s or images is not a number")


def load_states(pairs: Sequence[tuple[Any, Any]]) -> None:
    """Load each ``(object, state)`` pair's state into its object (``load_state_dict``), all or
    none: where one does not fit, every object gets its state from before back (a state that
    half fits would leave half of it loaded) and the error is raised."""
    before = [copy.deepcopy(obj.state_dict()) for obj, _ in pairs]
    try:
        for obj, state in pairs:
            obj.load_state_dict(state)
    except Exception:
        for (obj, _), original in zip(pairs, before, strict=True):
            obj.load_state_dict(original)
        raise


def restore_training(path: Path, trainee: torch.nn.Module, optimizer: torch.optim.Optimizer,
                     scheduler: Any, main: bool = True,
                     init_optimizer: torch.optim.Optimizer | None = None
                     ) -> dict[str, Any] | None:
    """Load the training checkpoint ``path`` (or its previous copy) into ``trainee``,
    ``optimizer``, ``scheduler`` (and the initialisation stage's ``init_optimizer``, where
    the checkpoint has one) and return it; None, with them untouched, when there is none or
    none is usable. Damaged copies are handled as in :func:`load_checkpoint`, logged beside
    ``path``."""
    if not (path.exists() or previous_path(path).exists()):
        return None

    def apply(state: dict[str, Any]) -> None:
        _check_progress(state)
        pairs = [(trainee, state["trainee"]), (optimizer, state["optimizer"]),
                 (scheduler, state["scheduler"])]
        if init_optimizer is not None and state.get("init_optimizer") is not None:
            pairs.append((init_optimizer, state["init_optimizer"]))
        load_states(pairs)

    return load_checkpoint(path, TRAINING_KEYS, log_beside(path), apply, main)
