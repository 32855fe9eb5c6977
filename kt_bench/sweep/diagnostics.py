"""Measuring what each trained student of a cohort took from its teacher, on the test set.

:func:`measure_transfer` makes one pass over the test split: the teacher's forward once per
batch for the whole cohort, then each student's, under the accelerator's autocast and
inference mode, the maps read through :class:`~kt_bench.models.taps.TapRecorder`. For each
student it gives top-1 agreement with the teacher, the mean KL(p_teacher ‖ p_student) at
T = 1, the student's expected calibration error (15 bins) and, per stage
(:func:`~kt_bench.training.transfer.pair_stages`), the linear CKA and NST's polynomial MMD²
between the teacher's and the student's maps. :func:`measure_cells` is the runner's side:
the cells that trained, their ``diagnostics.json`` and their row columns.

Agreement, KL, ECE and MMD² cover every test image, each counted once over all processes (the
test split is sharded as :func:`~kt_bench.training.engine.evaluate` shards it, and the sums
are reduced). CKA compares Gram matrices over a fixed subset of the test images, every k-th
image by test index, at most :data:`CKA_IMAGES` of them and fewer where the compared maps of
the teacher and one student would take more than :data:`CKA_MEMORY_BYTES` for them (a bound
per pair, so a student gets the same subset in a cohort as alone; a cohort of k students keeps
the teacher's maps and k students'). The maps of the subset are kept (in the dtype they come
in) and gathered from all processes, so a distributed run compares the same images as a
single process.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from torch import nn

from kt_bench.core import atomic
from kt_bench.core.errors import KtBenchError, first_line
from kt_bench.core.interrupts import is_stop
from kt_bench.data.bundle import DataBundle
from kt_bench.models.taps import TapRecorder
from kt_bench.training.device import training_memory_format
from kt_bench.training.engine import TrainResult
from kt_bench.training.lifecycle import in_layout
from kt_bench.training.transfer import (
    ECE_BINS,
    agreement_count,
    calibration_bins,
    centred_gram,
    cka_from_grams,
    ece_from_bins,
    kl_per_image,
    nst_poly_mmd2,
    pair_stages,
    stage_taps,
)

#: Most test images CKA's Gram matrices are built over.
CKA_IMAGES = 1000
#: Most bytes the compared maps of CKA's images may take for the teacher and one student.
CKA_MEMORY_BYTES = 1024**3
#: A cell's measurements, beside its ``result.json``.
DIAGNOSTICS_FILE = "diagnostics.json"
#: The row columns the measurements add (``diagnostics_s``: the seconds they took).
ROW_COLUMNS = ("agreement", "kl_teacher", "ece", "diagnostics_s")

# Where a student's sums sit in its vector: agreeing images, summed KL, images, ECE's bin
# sums (3 x ECE_BINS), then the summed MMD² of each stage.
_AGREE, _KL, _IMAGES = 0, 1, 2
_BINS = slice(3, 3 + 3 * ECE_BINS)
_MMD = _BINS.stop


@dataclass
class _Network:
    """One network of the pass: its recorder of the stage taps compared, its layout."""

    model: nn.Module
    recorder: TapRecorder
    layout: torch.memory_format
    #: The subset's maps by tap, batch by batch.
    kept: dict[str, list[torch.Tensor]] = field(default_factory=dict)

    def forward(self, x: torch.Tensor, accelerator: Accelerator) -> dict[str, torch.Tensor]:
        """Logits and the recorded taps of ``x``."""
        with accelerator.autocast():
            logits = self.model(in_layout(x, self.layout))
        return self.recorder.collect(logits)

    def keep(self, read: dict[str, torch.Tensor], chosen: torch.Tensor) -> None:
        """Keep the maps of the ``chosen`` images of a batch's ``read`` for CKA."""
        for tap in self.recorder.wanted:
            self.kept.setdefault(tap, []).append(read[tap].index_select(0, chosen))

    def map_bytes(self, x: torch.Tensor, accelerator: Accelerator) -> int:
        """Bytes per image of the compared maps, from a forward pass of ``x``."""
        read = self.forward(x, accelerator)
        return sum(read[k].element_size() * read[k][0].numel() for k in self.recorder.wanted)


def _network(model: nn.Module, taps: list[str], device: torch.device) -> _Network:
    model.to(device).eval()
    return _Network(model, TapRecorder(model, model.tap_map, taps),
                    training_memory_format(model, device))


@contextlib.contextmanager
def _eager() -> Iterator[None]:
    """Run compiled networks eagerly: the taps' new hooks would make them compile again.
    (Without the compiler loaded no network is compiled, and loading it takes seconds.)"""
    stance = getattr(torch.compiler, "set_stance", None)
    if stance is None or "torch._dynamo" not in sys.modules:
        yield
        return
    with stance("force_eager"):
        yield


def _cka_stride(n_test: int, per_image_bytes: int, images: int, memory: int) -> int:
    """Every how many test images one joins CKA's subset."""
    most = max(1, min(images, n_test, memory // max(per_image_bytes, 1)))
    return math.ceil(n_test / most)


def _gathered(accelerator: Accelerator, x: torch.Tensor) -> torch.Tensor:
    """``x`` (n, ...) of every process stacked along the first dimension (n may differ)."""
    if accelerator.num_processes == 1:
        return x
    x = x.float()  # not every backend gathers bfloat16 (gloo)
    n = torch.tensor([x.shape[0]], device=x.device)
    counts = accelerator.gather(n).tolist()
    padded = accelerator.gather(accelerator.pad_across_processes(x, dim=0))
    most = max(counts)
    return torch.cat([padded[r * most:r * most + c] for r, c in enumerate(counts)])


def _subset_gram(accelerator: Accelerator, parts: list[torch.Tensor]) -> torch.Tensor:
    return centred_gram(_gathered(accelerator, torch.cat(parts)))


@torch.inference_mode()
def measure_transfer(teacher: nn.Module, students: list[nn.Module], data: DataBundle,
                     accelerator: Accelerator, batch_size: int = 512,
                     cka_images: int = CKA_IMAGES,
                     cka_memory: int = CKA_MEMORY_BYTES) -> list[dict[str, Any]]:
    """What each of ``students`` took from ``teacher``, on the test split of ``data``.

    One dict per student: ``agreement`` (percent of test images with the teacher's top-1
    class), ``kl_teacher`` (mean KL(p_t ‖ p_s) at T = 1, nats), ``ece`` (the student's expected
    calibration error, 15 bins, percent), ``seconds`` (the whole pass, for all students),
    ``cka_images`` (the images CKA compared) and ``stages``: per student stage, shallow to
    deep, ``{"stage", "teacher_tap", "student_tap", "cka", "mmd2_poly"}`` (a value that is
    undefined, e.g. CKA of a map that never varies, is None). The networks are put in eval
    mode on the accelerator's device; on every process the same numbers come back. A batch's
    maps are held for the teacher and one student at a time.
    """
    started = time.perf_counter()
    device = accelerator.device
    pairs = [pair_stages(stage_taps(s.tap_map), stage_taps(teacher.tap_map)) for s in students]
    t_net = _network(teacher, list(dict.fromkeys(t for p in pairs for _, t in p)), device)
    s_nets = [_network(s, [s_tap for s_tap, _ in p], device)
              for s, p in zip(students, pairs, strict=True)]
    sums = [torch.zeros(_MMD + len(p), dtype=torch.float64, device=device) for p in pairs]
    rank, world = accelerator.process_index, accelerator.num_processes
    stride, seen, failure = 0, 0, None
    try:
        with _eager():
            for x, y in data.test_batches(batch_size, device, rank, world):
                if not stride:
                    stride = _cka_stride(data.n_test, _pair_bytes(t_net, s_nets, x, accelerator),
                                         cka_images, cka_memory)
                index = rank + world * torch.arange(seen, seen + x.shape[0], device=device)
                chosen = (index % stride == 0).nonzero().squeeze(1)
                seen += x.shape[0]
                t_read = t_net.forward(x, accelerator)
                t_net.keep(t_read, chosen)
                for net, total, p in zip(s_nets, sums, pairs, strict=True):
                    s_read = net.forward(x, accelerator)
                    net.keep(s_read, chosen)
                    _add_batch(total, t_read, s_read, y, p)
    except Exception as exc:  # noqa: BLE001 - agreed on below, then raised on every process
        failure = exc
    finally:
        for net in (t_net, *s_nets):
            net.recorder.remove()
    if world > 1:  # a process that failed alone would leave the others waiting in a reduce
        failed = torch.tensor([float(failure is not None)], device=device)
        if accelerator.reduce(failed, reduction="sum").item() > 0 and failure is None:
            failure = KtBenchError("the measurement failed on another process")
    if failure is not None:
        raise failure
    if world > 1:
        sums = [accelerator.reduce(s, reduction="sum") for s in sums]
    out = _summaries(accelerator, t_net, s_nets, sums, pairs)
    seconds = time.perf_counter() - started
    for d in out:
        d["seconds"] = seconds
    return out


def _pair_bytes(t_net: _Network, s_nets: list[_Network], x: torch.Tensor,
                accelerator: Accelerator) -> int:
    """Bytes per image of the compared maps of the teacher and the largest student, from one
    image of ``x``."""
    one = x[:1]
    return t_net.map_bytes(one, accelerator) + max(
        (net.map_bytes(one, accelerator) for net in s_nets), default=0)


def _summaries(accelerator: Accelerator, t_net: _Network, s_nets: list[_Network],
               sums: list[torch.Tensor], pairs: list[list[tuple[str, str]]]
               ) -> list[dict[str, Any]]:
    """Each student's measurements from its reduced sums and the kept maps (which are freed
    as their Gram matrices are made)."""
    t_grams = {tap: _subset_gram(accelerator, parts) for tap, parts in t_net.kept.items()}
    t_net.kept.clear()
    images = next(iter(t_grams.values())).shape[0] if t_grams else 0
    out = []
    for net, total, p in zip(s_nets, sums, pairs, strict=True):
        n = total[_IMAGES].item()
        if n == 0:
            raise KtBenchError("the test split has no images to measure the students on")
        stages = []
        for k, (s_tap, t_tap) in enumerate(p):
            gram = _subset_gram(accelerator, net.kept.pop(s_tap))
            stages.append({"stage": s_tap, "teacher_tap": t_tap, "student_tap": s_tap,
                           "cka": _defined(cka_from_grams(gram, t_grams[t_tap])),
                           "mmd2_poly": _defined(total[_MMD + k].item() / n)})
        out.append({"agreement": 100.0 * total[_AGREE].item() / n,
                    "kl_teacher": total[_KL].item() / n,
                    "ece": ece_from_bins(total[_BINS].view(3, ECE_BINS)), "stages": stages,
                    "cka_images": images})
    return out


def _add_batch(total: torch.Tensor, t_read: dict[str, torch.Tensor],
               s_read: dict[str, torch.Tensor], labels: torch.Tensor,
               pairs: list[tuple[str, str]]) -> None:
    """Add one batch's sums of one student to ``total`` (see :func:`measure_transfer`)."""
    t_logits, s_logits = t_read["logits"], s_read["logits"]
    b = t_logits.shape[0]
    total[_AGREE] += agreement_count(t_logits, s_logits)
    total[_KL] += kl_per_image(t_logits, s_logits).sum().double()
    total[_IMAGES] += b
    total[_BINS] += calibration_bins(s_logits, labels).flatten()
    for k, (s_tap, t_tap) in enumerate(pairs):
        total[_MMD + k] += nst_poly_mmd2(s_read[s_tap], t_read[t_tap]).double() * b


def _defined(value: float) -> float | None:
    return value if math.isfinite(value) else None


def row_columns(diagnostics: dict[str, Any] | None) -> dict[str, float]:
    """The row columns of one student's measurements (those that are finite numbers)."""
    if not diagnostics:
        return {}
    values = dict(zip(ROW_COLUMNS, (diagnostics["agreement"], diagnostics["kl_teacher"],
                                    diagnostics["ece"], diagnostics["seconds"]), strict=True))
    return {k: float(v) for k, v in values.items() if v is not None and math.isfinite(v)}


def measure_cells(results: dict[int, TrainResult], dirs: list[Path], teacher: nn.Module,
                  data: DataBundle, accelerator: Accelerator,
                  batch_size: int = 512) -> dict[int, dict[str, Any]]:
    """Measure the students that trained to the end (by cell index) in one pass and write
    each one's ``diagnostics.json`` into its cell folder ``dirs[i]`` (the main process writes).

    A measurement that fails costs the measurements, never the cells: one warning line on
    stderr, and none come back (a stale ``diagnostics.json`` of those cells is removed). An
    interrupt is raised again."""
    ok = {i: r.model for i, r in results.items() if r.error is None and r.model is not None}
    if not ok:
        return {}
    main = accelerator.is_main_process
    try:
        measured = dict(zip(ok, measure_transfer(teacher, list(ok.values()), data, accelerator,
                                                 batch_size), strict=True))
        if main:
            for i, d in measured.items():
                try:
                    atomic.write_json(dirs[i] / DIAGNOSTICS_FILE, d)
                except OSError as exc:
                    raise KtBenchError(f"cannot write {dirs[i] / DIAGNOSTICS_FILE}: "
                                       f"{exc.strerror or first_line(exc)}") from None
        return measured
    except BaseException as exc:  # noqa: BLE001 - the cells trained; only the measure fails
        if is_stop(exc):
            raise
        if main:
            for i in ok:
                with contextlib.suppress(OSError):
                    (dirs[i] / DIAGNOSTICS_FILE).unlink(missing_ok=True)
            cells = ", ".join(dirs[i].name for i in ok)
            print(f"kt-bench: warning: transfer diagnostics failed ({first_line(exc)}); the "
                  f"rows of {cells} have no agreement, kl_teacher or ece", file=sys.stderr)
        return {}
