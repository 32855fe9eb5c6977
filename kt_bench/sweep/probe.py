"""Checks made before anything trains: every method and model of a grid built and set up on
a probe batch (for ``run`` and ``run --dry-run``)."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator

import torch
from torch import nn

from kt_bench.core.errors import KtBenchError, first_line
from kt_bench.core.options import Spec, without_downloads
from kt_bench.models.taps import LOGITS
from kt_bench.sweep.cells import Cell, config_hash


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Run torch on one CPU thread inside the block: probe batches are tiny, and on a busy
    machine several threads wait on each other far longer than they compute."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


class _BuildFailed(Exception):
    """A model could not be built; ``args[0]`` is the whole report line."""


def _probe_batch(dataset: Spec) -> torch.Tensor:
    """Zero images of ``dataset``'s shape, two of them (as the engine probes)."""
    from kt_bench.data import dataset_info

    info = dataset_info(dataset)
    return torch.zeros(2, info.in_channels, info.image_size, info.image_size)


class _Networks:
    """The grid's models, each built once per (spec, classes, channels), and their tap
    shapes, each found by one forward pass per probe size that records every tap."""

    def __init__(self) -> None:
        self._models: dict[str, nn.Module | _BuildFailed] = {}
        self._shapes: dict[str, dict[str, torch.Size] | None] = {}

    def model(self, spec: Spec, dataset: Spec) -> tuple[str, nn.Module]:
        """``spec`` built for ``dataset``'s classes and channels (no pretrained weights
        fetched) and its cache key; a failure raises :class:`_BuildFailed` every time."""
        from kt_bench.data import dataset_info
        from kt_bench.models import build_model

        info = dataset_info(dataset)
        bare = without_downloads(spec)  # probing shapes needs no download
        key = json.dumps([bare.name, bare.options, info.num_classes, info.in_channels,
                          info.image_size], sort_keys=True)
        if key not in self._models:
            try:
                self._models[key] = build_model(bare, info.num_classes, info.in_channels,
                                                info.image_size)
            except Exception as exc:  # noqa: BLE001 - a plugin model may raise anything
                self._models[key] = _BuildFailed(f"model {spec.label} for {dataset.label} "
                                                 f"cannot be built: {first_line(exc)}")
        found = self._models[key]
        if isinstance(found, _BuildFailed):
            raise found
        return key, found

    def tap_shapes(self, spec: Spec, dataset: Spec, taps: tuple[str, ...]
                   ) -> dict[str, torch.Size]:
        """What :func:`~kt_bench.training.lifecycle.tap_shapes` gives for ``spec`` on
        ``dataset``'s probe batch: the shapes of ``taps`` and of the logits (its own error for a
        tap the model lacks)."""
        from kt_bench.training.lifecycle import tap_shapes

        key, model = self.model(spec, dataset)
        probe = _probe_batch(dataset)
        key = f"{key}{list(probe.shape)}"
        if key not in self._shapes:
            try:
                self._shapes[key] = tap_shapes(model, tuple(model.tap_map), probe)
            except Exception:  # noqa: BLE001 - asked for tap by tap below, with its own error
                self._shapes[key] = None
        known = self._shapes[key]
        wanted = [t for t in taps if t != LOGITS]
        if known is None or not all(t in known for t in wanted):
            return tap_shapes(model, taps, probe)
        return {**{t: known[t] for t in wanted}, LOGITS: known[LOGITS]}


def check_teacher_checkpoints(cells: list[Cell]) -> list[str]:
    """Load each teacher checkpoint of ``cells`` (``--teacher-checkpoint``, a pair's own, a
    published one) into its teacher's architecture, built for the cell's dataset, as a run
    would; one line per checkpoint that is missing, is no checkpoint or does not fit."""
    from kt_bench.sweep.teachers import load_state

    networks = _Networks()
    seen: set[str] = set()
    problems: dict[str, None] = {}
    for cell in cells:
        if not cell.teacher_checkpoint:
            continue
        key = json.dumps([cell.teacher_checkpoint, cell.teacher.to_dict(),
                          cell.dataset.to_dict()], sort_keys=True)
        if key in seen:
            continue
        seen.add(key)
        try:
            model = networks.model(cell.teacher, cell.dataset)[1]
            load_state(model, cell.teacher_checkpoint, cell.teacher_sha256)
        except _BuildFailed:
            continue  # the probe names it
        except KtBenchError as exc:
            problems[f"{exc} (teacher {cell.teacher.label} for {cell.dataset.label})"] = None
    return list(problems)


#: Image sizes tried on a model that fails on a dataset's, to tell whether the size is why.
_OTHER_SIZES = (32, 64, 224)


def _size_problem(spec: Spec, dataset: Spec, networks: _Networks,
                  exc: Exception) -> str | None:
    """The line for model ``spec`` failing (with ``exc``) on ``dataset``'s probe batch when
    it runs on images of another size: the dataset's ``image_size`` does not suit it. None
    when it fails on those too (not the size's fault)."""
    from kt_bench.data import dataset_info
    from kt_bench.training.lifecycle import tap_shapes

    info = dataset_info(dataset)
    model = networks.model(spec, dataset)[1]
    for size in (s for s in _OTHER_SIZES if s != info.image_size):
        try:
            tap_shapes(model, (), torch.zeros(2, info.in_channels, size, size))
        except Exception:  # noqa: BLE001 - any failure: try the next size
            continue
        n = info.image_size
        return (f"dataset {dataset.label}: image_size = {n} does not suit model {spec.label}, "
                f"which runs on {size}x{size} images but not on {n}x{n} ({first_line(exc)})")
    return None


def _forward_problem(cell: Cell, networks: _Networks, seen: dict[str, str | None]
                     ) -> str | None:
    """A line naming ``image_size`` when the cell's student or teacher cannot run on the
    dataset's probe batch for the size of its images; None otherwise (other failures are
    reported by the method's probe). ``seen`` keeps the answer per network and dataset."""
    for spec in (cell.student, cell.teacher):
        key = json.dumps([spec.to_dict(), cell.dataset.to_dict()], sort_keys=True)
        if key not in seen:
            try:
                networks.tap_shapes(spec, cell.dataset, ())
                seen[key] = None
            except _BuildFailed:
                seen[key] = None  # the method's probe names it
            except Exception as exc:  # noqa: BLE001 - a model may raise anything
                seen[key] = _size_problem(spec, cell.dataset, networks, exc)
        if seen[key]:
            return seen[key]
    return None


def _probe_one(cell: Cell, networks: _Networks, sizes: dict[str, str | None]) -> str | None:
    """Build ``cell``'s method and networks and prepare the method on a probe batch as the
    engine does (:func:`~kt_bench.training.lifecycle.prepare_method`); the failure as one line
    naming the method and the pair, or None."""
    from kt_bench.api.method import NotApplicable, build_method

    size_problem = _forward_problem(cell, networks, sizes)
    if size_problem:
        return size_problem
    try:
        networks.tap_shapes(cell.student, cell.dataset, ())  # the student's forward works
        method = build_method(cell.method, cell.method_config)
        if method.needs_teacher:
            from kt_bench.data import dataset_info
            from kt_bench.training.lifecycle import prepare_method

            info = dataset_info(cell.dataset)  # stand-in labels: every class, balanced
            prepare_method(method, networks.model(cell.teacher, cell.dataset)[1],
                           torch.arange(info.n_train) % info.num_classes, info.num_classes,
                           lambda taps: networks.tap_shapes(cell.student, cell.dataset, taps),
                           lambda taps: networks.tap_shapes(cell.teacher, cell.dataset, taps))
    except _BuildFailed as exc:
        return str(exc)
    except NotApplicable:  # a finished n/a row when it runs, as the published tables say
        return None
    except Exception as exc:  # noqa: BLE001 - a plugin's constructor or setup may raise anything
        return (f"method {cell.method} ({cell.dataset.label}: {cell.teacher.label} -> "
                f"{cell.student.label}): {first_line(exc)}")
    return None


def probe_cells(cells: list[Cell]) -> list[str]:
    """Build every distinct (dataset, teacher, student, method configuration) of ``cells``
    and set its method up on a probe batch, as training would; one line per failure (a
    network that cannot take the dataset's image_size, a tap a model lacks, a plugin whose
    constructor or setup raises), each once."""
    networks = _Networks()
    seen: set[str] = set()
    sizes: dict[str, str | None] = {}
    problems: dict[str, None] = {}
    with one_thread():
        for cell in cells:
            key = config_hash([cell.dataset.to_dict(), cell.teacher.to_dict(),
                               cell.student.to_dict(), cell.method, cell.method_config])
            if key in seen:
                continue
            seen.add(key)
            line = _probe_one(cell, networks, sizes)
            if line is not None:
                problems[line] = None
    return list(problems)
