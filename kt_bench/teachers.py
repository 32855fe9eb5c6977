"""Teachers: trained once per (dataset, architecture, seed, recipe) and cached by config hash."""

from __future__ import annotations

from pathlib import Path

import torch
from accelerate import Accelerator
from torch import nn

from kt_bench import atomic
from kt_bench.cells import Cell, config_hash
from kt_bench.data.bundle import DataBundle
from kt_bench.engine import train
from kt_bench.method import build_method
from kt_bench.models import build_model


def teacher_path(cache_dir: Path, cell: Cell) -> Path:
    """Where the teacher of ``cell`` is cached."""
    return cache_dir / f"{cell.teacher.name}-{config_hash(cell.teacher_config())}.pt"


def get_teacher(cell: Cell, data: DataBundle, accelerator: Accelerator,
                cache_dir: Path) -> tuple[nn.Module, dict]:
    """The teacher of ``cell`` and its test metrics: loaded from the cache, or trained (with
    the ``student`` baseline method and the teacher recipe) and cached."""
    path = teacher_path(cache_dir, cell)
    model = build_model(cell.teacher, data.num_classes, data.in_channels)
    if path.exists():
        state = torch.load(path, map_location="cpu", weights_only=False)
        model.load_state_dict(state["model"])
        return model.eval(), state["metrics"]
    ckpt = path.with_suffix(".ckpt")
    result = train(data, cell.teacher, build_method("student"), cell.teacher_recipe, cell.seed,
                   accelerator, checkpoint=ckpt, desc=f"teacher {cell.teacher.label}")
    metrics = {"top1": result.top1, "top5": result.top5, "wall_s": result.wall_s}
    if accelerator.is_main_process:
        atomic.torch_save(path, {"model": result.model.state_dict(), "metrics": metrics,
                                 "config": cell.teacher_config()})
        ckpt.unlink(missing_ok=True)
    return result.model.eval(), metrics
