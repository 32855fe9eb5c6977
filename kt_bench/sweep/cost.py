"""Rough compute estimates for a grid, from the networks' multiply-adds (for ``--dry-run``)."""

from __future__ import annotations

import functools
import json

from kt_bench.api.method import build_method
from kt_bench.core.options import Spec, without_downloads
from kt_bench.data import dataset_info
from kt_bench.models import build_model
from kt_bench.models.macs import forward_macs
from kt_bench.sweep.cells import Cell, config_hash

#: Assumed sustained throughput of one GPU on these networks (FLOP/s); a rough figure for
#: mixed-precision training of convolutional networks, not a measurement.
ASSUMED_FLOPS = 20e12


@functools.cache
def _model_macs(spec_json: str, name: str, num_classes: int, channels: int, size: int) -> int:
    spec = without_downloads(Spec(name, json.loads(spec_json)))  # counting needs no download
    model = build_model(spec, num_classes, channels, size)
    return forward_macs(model, (channels, size, size))


def model_macs(spec: Spec, dataset: Spec) -> int:
    """Forward multiply-adds of ``spec`` on one image of ``dataset``."""
    info = dataset_info(dataset)
    return _model_macs(json.dumps(dict(spec.options), sort_keys=True), spec.name,
                       info.num_classes, info.in_channels, info.image_size)


def cell_flops(cell: Cell) -> float:
    """Training FLOPs of one cell: student forward + backward (3x forward) and, where the
    method needs one, the teacher's forward, for every training image of every epoch (an
    initialisation stage's included)."""
    info = dataset_info(cell.dataset)
    per_image = 3 * model_macs(cell.student, cell.dataset)
    method = build_method(cell.method, cell.method_config)
    if method.needs_teacher:
        per_image += model_macs(cell.teacher, cell.dataset)
    # an initialisation stage (AB, FT, FSP) adds its epochs
    return 2.0 * per_image * info.n_train * (cell.recipe.epochs + method.needs.init_epochs)


def teacher_flops(cell: Cell) -> float:
    """Training FLOPs of the cell's teacher (zero for a loaded teacher)."""
    if cell.teacher_is_pretrained:
        return 0.0
    info = dataset_info(cell.dataset)
    macs = model_macs(cell.teacher, cell.dataset)
    return 2.0 * 3 * macs * info.n_train * cell.teacher_recipe.epochs


def grid_gpu_hours(cells: list[Cell]) -> tuple[float, float]:
    """(students' GPU-hours, teachers' GPU-hours) at :data:`ASSUMED_FLOPS`, each distinct
    teacher counted once."""
    students = sum(cell_flops(c) for c in cells)
    teachers = {config_hash(c.teacher_config()): teacher_flops(c) for c in cells}
    return students / ASSUMED_FLOPS / 3600, sum(teachers.values()) / ASSUMED_FLOPS / 3600
