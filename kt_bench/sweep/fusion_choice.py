"""Whether a cohort trains fused (:mod:`kt_bench.training.fused_cohort`): where it pays,
measured once per kind of cohort and run folder (``<out>/fusion.json``), so that every cohort
of a grid, and a resumed run of it, trains the way the first measurement chose."""

from __future__ import annotations

import platform
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator

from kt_bench.core import atomic
from kt_bench.core.errors import KtBenchError
from kt_bench.data.bundle import DataBundle
from kt_bench.sweep.cells import Cell
from kt_bench.training.engine import fusion_refusal
from kt_bench.training.fusion_speed import measure_fusion

#: The file in a run folder that keeps each measured choice.
FUSION_FILE = "fusion.json"


def fusion_key(cell: Cell, data: DataBundle, members: int, accelerator: Accelerator) -> str:
    """What a measurement holds for: the student, the batch's shape, the cohort's size, the
    precision and the machine (device, CPU kind, PyTorch)."""
    device = accelerator.device
    where = (torch.cuda.get_device_name(device) if device.type == "cuda"
             else f"cpu:{platform.machine()}:{torch.backends.cpu.get_cpu_capability()}"
                  f":{torch.get_num_threads()}")
    return "|".join([cell.student.label, f"{data.in_channels}x{data.image_size}",
                     f"batch{cell.recipe.batch_size}", f"members{members}",
                     accelerator.mixed_precision, where, torch.__version__])


def choose_fusion(cell: Cell, data: DataBundle, members: int, accelerator: Accelerator,
                  out: Path, say) -> bool:
    """Whether a cohort of ``members`` students of ``cell``'s kind trains fused: measured
    (:func:`~kt_bench.training.fusion_speed.measure_fusion`) the first time such a cohort
    runs into ``out``, then read back; ``say`` hears the measurement."""
    if members < 2 or fusion_refusal(accelerator, compile=False):
        return False
    path = out / FUSION_FILE
    key = fusion_key(cell, data, members, accelerator)
    known: dict[str, Any] = _read(path)
    if key not in known:
        speed = measure_fusion(cell.student, data, cell.recipe.batch_size, members,
                               accelerator)
        known[key] = {"fused_s": speed.fused_s, "unfused_s": speed.unfused_s,
                      "fuse": speed.pays, "why": speed.why}
        if accelerator.is_main_process:
            try:
                atomic.write_json(path, {**_read(path), key: known[key]})
            except KtBenchError:
                pass  # a folder that cannot keep it measures again next time
        say(_described(known[key], members))
    return bool(known[key]["fuse"])


def _read(path: Path) -> dict[str, Any]:
    try:
        known = atomic.read_json(path)
    except KtBenchError:
        return {}
    return known if isinstance(known, dict) else {}


def _described(entry: dict[str, Any], members: int) -> str:
    if entry["fused_s"] is None:
        return f"fusion: {members} students cannot be fused ({entry['why']}); one by one"
    ratio = entry["unfused_s"] / entry["fused_s"]
    return (f"fusion: a bare step of {members} students takes {entry['fused_s'] * 1e3:.1f} ms "
            f"fused, {entry['unfused_s'] * 1e3:.1f} ms one by one ({ratio:.2f}x): "
            f"{'fused' if entry['fuse'] else 'one by one'}")
