"""Experiment trackers (``--log-with``): one run per cell in TensorBoard, Weights & Biases
(offline) and MLflow (a local file store), also where several cells train at once as a
cohort, each into its own run.

Each run gets its cell's identity and resolved config as flat parameters and, per epoch (at
step = the epoch's number), the test top-1/top-5, each unweighted loss term
(``term/<name>``, its mean over the epoch's steps), the weighted total (``loss_total``) and
the learning rate (``lr``); a cell training alone also logs every step's terms
(``train/<name>``, at the global step).

Accelerate's trackers are not used: an Accelerator holds one set of trackers under one run
name and logs every value to all of them, while a cohort needs a run per cell at once;
Accelerate's MLflow tracker also goes through mlflow's one active run per process. The
libraries are called directly instead, each run an object of its own.

Tracking never stops training: a run that cannot be opened or written is named in a warning
on stderr and left out for the rest of its cell.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import torch

from kt_bench.core.errors import KtBenchError, first_line
from kt_bench.training.hooks import TrainingHooks

#: The trackers ``--log-with`` accepts; each is also the name of the module its library
#: provides and of the kt-bench extra that installs it.
TRACKERS = ("tensorboard", "wandb", "mlflow")

#: The keys of an epoch's history record that are not loss terms.
RECORD_KEYS = ("epoch", "lr", "top1", "top5", "loss", "stage")

#: Where a run's step axis is the epoch (W&B needs it named; the others take any step).
EPOCH_KEYS = ("test/*", "term/*", "loss_total", "lr")


def tracker_names(text: str | None, flag: str = "--log-with") -> tuple[str, ...]:
    """The trackers ``text`` names (comma-separated; ``none`` or nothing: none), each once;
    an unknown one is a one-line error naming ``flag`` and the accepted names."""
    names = [n.strip() for n in (text or "").split(",") if n.strip()]
    if names == ["none"]:
        return ()
    for name in names:
        if name not in TRACKERS:
            raise KtBenchError(f"{flag}: unknown tracker '{name}'; accepted: "
                               f"{', '.join(TRACKERS)} (comma-separated), or none")
    return tuple(dict.fromkeys(names))


def check_trackers(names: Sequence[str], flag: str = "--log-with") -> None:
    """Raise a one-line error, before any training, for a tracker whose library is missing,
    naming the extra that installs it."""
    for name in names:
        try:
            importlib.import_module(name)
        except ImportError:
            raise KtBenchError(f"{flag} {name} needs the {name} package: pip install "
                               f"'kt-bench[{name}]'") from None
        except Exception as exc:  # noqa: BLE001 - e.g. a protobuf of another version
            raise KtBenchError(f"{flag} {name}: the {name} package cannot be imported "
                               f"({first_line(exc)})") from None


def flat_params(nested: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``nested`` as one level of ``prefix``-ed dotted keys (``recipe.lr``); numbers, text
    and booleans kept, lists as JSON text, None left out."""
    flat: dict[str, Any] = {}
    for key, value in nested.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flat_params(value, f"{name}."))
        elif isinstance(value, (list, tuple)):
            flat[name] = json.dumps(value, default=str)
        elif isinstance(value, (bool, int, float, str)):
            flat[name] = value
        elif value is not None:
            flat[name] = str(value)
    return flat


def epoch_values(record: Mapping[str, Any]) -> dict[str, float]:
    """The values a run logs for one epoch's history record: ``test/top1``, ``test/top5``,
    ``lr``, ``loss_total`` (the weighted loss) and ``term/<name>`` for each unweighted term."""
    values = {"test/top1": record["top1"], "test/top5": record["top5"], "lr": record["lr"]}
    if "loss" in record:
        values["loss_total"] = record["loss"]
    values.update({f"term/{k}": v for k, v in record.items() if k not in RECORD_KEYS})
    return {k: float(v) for k, v in values.items()}


class TrackedCell(Protocol):
    """What a run is opened for: a cell of a grid (:class:`kt_bench.sweep.cells.Cell`)."""

    grid: str

    @property
    def cell_id(self) -> str:
        """The cell's id: the run's name."""

    def identity(self) -> dict[str, Any]:
        """The cell's identifying columns."""

    def config(self) -> dict[str, Any]:
        """The cell's resolved config."""


def cell_params(cell: TrackedCell) -> dict[str, Any]:
    """A run's parameters: the cell's identity (less its config as one JSON text) and its
    resolved config as ``config.<dotted key>``."""
    identity = {k: v for k, v in cell.identity().items() if k != "config"}
    return {**flat_params(identity), **flat_params(cell.config(), "config.")}


class TrackerRun:
    """One cell's run in one tracker. :meth:`log` and :meth:`finish` never raise: a failure
    is a warning on stderr, and the run is left out from then on."""

    tracker = ""

    def __init__(self, cell_id: str) -> None:
        self.cell_id = cell_id
        self.broken = False

    def log(self, values: Mapping[str, float], step: int, per_epoch: bool) -> None:
        """Log ``values`` at ``step``: an epoch's number (``per_epoch``) or a global step."""
        if not self.broken:
            try:
                self._write(values, step, per_epoch)
            except Exception as exc:  # noqa: BLE001 - tracking never stops training
                self._give_up("logging", exc)

    def finish(self, stopped: bool, failed: bool = False) -> None:
        """Close the run, marked as stopped (interrupted), failed (its cell did not finish
        ok) or finished."""
        if not self.broken:
            self.broken = True  # nothing more goes in
            try:
                self._close(stopped, failed)
            except Exception as exc:  # noqa: BLE001
                self._give_up("closing", exc)

    def _give_up(self, doing: str, exc: BaseException) -> None:
        self.broken = True
        print(f"kt-bench: warning: {self.tracker} run of cell {self.cell_id}: {doing} failed "
              f"({first_line(exc)}); that run is left out", file=sys.stderr)

    def _write(self, values: Mapping[str, float], step: int, per_epoch: bool) -> None:
        raise NotImplementedError

    def _close(self, stopped: bool, failed: bool) -> None:
        raise NotImplementedError


#: The metrics TensorBoard's HPARAMS tab shows beside each run's parameters (their values
#: are the run's own scalars of these names).
HPARAM_METRICS = ("test/top1", "test/top5", "loss_total")


class TensorBoardRun(TrackerRun):
    """A cell's TensorBoard run: one event file in ``<root>/<cell_id>``, its parameters as
    hparams (``SummaryWriter.add_hparams`` is not used: it writes them into a second event
    file, and TensorBoard polls only the last file of a run's folder for new values)."""

    tracker = "tensorboard"

    def __init__(self, root: Path, cell: TrackedCell) -> None:
        super().__init__(cell.cell_id)
        from torch.utils.tensorboard import SummaryWriter
        from torch.utils.tensorboard.summary import hparams

        self.writer = SummaryWriter(str(root / cell.cell_id))
        for summary in hparams(cell_params(cell), dict.fromkeys(HPARAM_METRICS, 0.0)):
            self.writer.file_writer.add_summary(summary)

    def _write(self, values: Mapping[str, float], step: int, per_epoch: bool) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)
        if per_epoch:
            self.writer.flush()

    def _close(self, stopped: bool, failed: bool) -> None:
        self.writer.close()


class WandbRun(TrackerRun):
    """A cell's Weights & Biases run, offline (never synced by kt-bench): under
    ``<root>/wandb/offline-run-*``, in the project named after the grid; ``wandb sync``
    uploads it later. Several runs are open at once in one process (``reinit="create_new"``,
    wandb >= 0.19.10)."""

    tracker = "wandb"

    def __init__(self, root: Path, cell: TrackedCell) -> None:
        super().__init__(cell.cell_id)
        import wandb

        os.environ["WANDB_MODE"] = "offline"  # also for anything else wandb starts here
        root.mkdir(parents=True, exist_ok=True)
        # console off: with several runs open, each would capture the others' output
        settings = wandb.Settings(console="off", silent=True, disable_git=True,
                                  save_code=False)
        self.run = wandb.init(project=cell.grid, name=cell.cell_id, dir=str(root),
                              mode="offline", reinit="create_new", config=cell_params(cell),
                              settings=settings)
        self.run.define_metric("epoch")
        self.run.define_metric("train/step")
        for key in EPOCH_KEYS:
            self.run.define_metric(key, step_metric="epoch")
        self.run.define_metric("train/*", step_metric="train/step")

    def _write(self, values: Mapping[str, float], step: int, per_epoch: bool) -> None:
        # W&B's own step must only grow, and epochs and steps count differently: each value
        # is logged against its axis (see define_metric above) instead
        self.run.log({**values, "epoch" if per_epoch else "train/step": step})

    def _close(self, stopped: bool, failed: bool) -> None:
        self.run.finish(exit_code=1 if stopped or failed else 0)


def mlflow_key(name: str) -> str:
    """``name`` as MLflow accepts a parameter's or metric's name: characters other than
    letters, digits, ``_ - . / :`` and spaces become ``_``."""
    return re.sub(r"[^\w\-./: ]", "_", name)


class MlflowRun(TrackerRun):
    """A cell's MLflow run in the file store ``<root>/mlruns``, in the experiment named after
    the grid. Runs are addressed by id through an ``MlflowClient``, so that several are open
    at once without mlflow's one active run. MLflow 3 keeps the file store in maintenance
    mode and refuses it unless ``MLFLOW_ALLOW_FILE_STORE`` is true, which is set here."""

    tracker = "mlflow"

    def __init__(self, root: Path, cell: TrackedCell) -> None:
        super().__init__(cell.cell_id)
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"
        store = root / "mlruns"
        store.mkdir(parents=True, exist_ok=True)
        self.client = MlflowClient(tracking_uri=store.resolve().as_uri())
        run = self.client.create_run(self._experiment(cell.grid), run_name=cell.cell_id,
                                     tags={"kt_bench.cell_id": cell.cell_id})
        self.run_id = run.info.run_id
        values = {mlflow_key(k): str(v)[:6000] for k, v in cell_params(cell).items()}
        params = [Param(k, v) for k, v in values.items()]
        for start in range(0, len(params), 100):  # MLflow takes 100 parameters a batch
            self.client.log_batch(self.run_id, params=params[start:start + 100])

    def _experiment(self, name: str) -> str:
        """The id of the experiment ``name``, made if new (another process may make it at
        the same time)."""
        found = self.client.get_experiment_by_name(name)
        if found is not None:
            return found.experiment_id
        try:
            return self.client.create_experiment(name)
        except Exception:  # noqa: BLE001 - made meanwhile by another job
            found = self.client.get_experiment_by_name(name)
            if found is None:
                raise
            return found.experiment_id

    def _write(self, values: Mapping[str, float], step: int, per_epoch: bool) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(mlflow_key(k), v, now, step)
                                                    for k, v in values.items()])

    def _close(self, stopped: bool, failed: bool) -> None:
        status = "KILLED" if stopped else "FAILED" if failed else "FINISHED"
        self.client.set_terminated(self.run_id, status)


RUN_CLASSES: dict[str, type[TrackerRun]] = {"tensorboard": TensorBoardRun, "wandb": WandbRun,
                                            "mlflow": MlflowRun}


def _open(tracker: str, root: Path, cell: TrackedCell) -> TrackerRun | None:
    """The cell's run in ``tracker``, or None (with a warning) where it cannot be opened."""
    try:
        return RUN_CLASSES[tracker](root, cell)
    except Exception as exc:  # noqa: BLE001 - tracking never stops training
        print(f"kt-bench: warning: cannot open the {tracker} run of cell {cell.cell_id} "
              f"({first_line(exc)}); it trains without", file=sys.stderr)
        return None


class CellRuns:
    """The tracker runs of a cohort's cells, by the cell's index in the cohort: one run per
    tracker for each cell. Empty without trackers."""

    def __init__(self, runs: Mapping[int, Sequence[TrackerRun]] | None = None) -> None:
        self.runs = {i: list(r) for i, r in (runs or {}).items()}

    @classmethod
    def open(cls, trackers: Sequence[str], root: Path, cells: Sequence[TrackedCell],
             skip: Sequence[int] = ()) -> CellRuns:
        """A run in each of ``trackers`` for each of ``cells`` but those at ``skip``,
        written under ``root`` (``<out>/tracking``)."""
        runs = {i: [r for r in (_open(t, root, cell) for t in trackers) if r is not None]
                for i, cell in enumerate(cells) if i not in skip}
        return cls(runs)

    def hook(self, members: Sequence[int]) -> TrackerLog | None:
        """The hook logging a cohort's training into these runs, where ``members`` are the
        indices of the cells that train, in the order of the cohort's students; None
        without runs."""
        by_member = [self.runs.get(i, []) for i in members]
        return TrackerLog(by_member) if any(by_member) else None

    def finish(self, stopped: bool = False, failed: Sequence[int] = ()) -> None:
        """Close every run, marked as stopped (interrupted), failed (the cells at ``failed``
        did not finish ok) or finished."""
        for i, runs in self.runs.items():
            for run in runs:
                run.finish(stopped, i in failed)


class TrackerLog(TrainingHooks):
    """Logs a cohort's training to its cells' runs: each student's epoch records into its
    own cell's runs (see :func:`epoch_values`) and, for a student training alone, every
    step's loss terms (``train/<name>``)."""

    def __init__(self, runs: Sequence[Sequence[TrackerRun]]) -> None:
        self.runs = [list(r) for r in runs]  # by the student's position in the cohort
        self.wants_step_values = len(self.runs) == 1

    def step_values(self, step: int, values: Mapping[str, torch.Tensor]) -> None:
        """Log the lone student's loss terms at the global ``step``."""
        logged = {f"train/{k}": v.item() for k, v in values.items()}
        for run in self.runs[0]:
            run.log(logged, step, per_epoch=False)

    def epoch_end(self, step: int, records: Mapping[int, Mapping[str, Any]]) -> None:
        """Log each student's record into its own cell's runs, at the epoch's number."""
        for member, record in records.items():
            values = epoch_values(record)
            for run in self.runs[member]:
                run.log(values, record["epoch"], per_epoch=True)
