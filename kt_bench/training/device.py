"""Where training runs: the device and precision (through Accelerate), the memory layout
networks train in, ``torch.compile``, and the two private settings of Accelerate and Dynamo
the engine depends on, wrapped here with the reason for each."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import DistributedDataParallelKwargs
from torch import nn

from kt_bench.core.errors import KtBenchError
from kt_bench.core.precision import PRECISIONS


def reset_accelerator_state() -> None:
    """Forget Accelerate's process-wide state, so that an Accelerator for another device or
    precision can be made in the same process (a grid's cells, tests and the bench make
    several; Accelerate offers no public way to do this)."""
    AcceleratorState._reset_state(reset_partial_state=False)


def configure_dynamo_for_cohorts() -> None:
    """Settings of Dynamo (module globals, no public API) that compiling a cohort needs."""
    # Instances of one class share their compiled code unless Dynamo also guards on the
    # modules' hooks; without these guards a student would run another's tap hooks.
    torch._dynamo.config.skip_nnmodule_hook_guards = False
    # Each student (its hooks) and each mode (train, eval) is a compilation of the same code;
    # past the default limit of 8, Dynamo would fall back to eager for the rest, unseen.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)


DEVICES = ("auto", "cpu", "cuda")


def check_device_and_precision(device: str, precision: str) -> None:
    """Raise a one-line error for what the accelerator would refuse or not really run: an
    unknown device or precision (``precision`` already resolved from ``auto``), CUDA where
    there is none, or fp16 off CUDA."""
    if device not in DEVICES:
        raise KtBenchError(f"unknown device '{device}'; accepted: {', '.join(DEVICES)}")
    if precision not in PRECISIONS:
        raise KtBenchError(f"unknown precision '{precision}'; accepted: auto, "
                           f"{', '.join(PRECISIONS)}")
    if device == "cuda" and not torch.cuda.is_available():
        raise KtBenchError("--device cuda was asked for, but no CUDA device is available")
    if precision == "fp16" and (device == "cpu" or not torch.cuda.is_available()):
        # Accelerate accepts fp16 on the CPU but runs no autocast there: fp32 under its name
        raise KtBenchError("--precision fp16 needs a CUDA device; on the CPU use bf16 or no")


def make_accelerator(device: str = "auto", precision: str = "no") -> Accelerator:
    """An Accelerator for ``device`` (auto|cpu|cuda) and ``precision`` (no|bf16|fp16).
    It has no trackers: ``--log-with`` opens a run per cell itself
    (:mod:`kt_bench.training.tracking`)."""
    check_device_and_precision(device, precision)
    reset_accelerator_state()
    # A method's parameters, or part of the student, may sit out a stage (FitNet's hint
    # stage, a loss term weighted 0 in some epochs): DDP must not wait for their grads.
    ddp = DistributedDataParallelKwargs(find_unused_parameters=True)
    return Accelerator(cpu=device == "cpu", mixed_precision=precision, kwargs_handlers=[ddp])


def channels_last(x: torch.Tensor) -> torch.Tensor:
    """Images in the channels-last layout, which convolutions run faster in on both CUDA and
    the CPU (oneDNN); models are converted to it too."""
    return x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x


#: Channels per vector of AVX-512 in float32: PyTorch's channels-last CPU kernels vectorise
#: over channels, and a BatchNorm narrower than this runs its backward pass on a slow path.
CPU_VECTOR_CHANNELS = 16


def training_memory_format(model: nn.Module, device: torch.device) -> torch.memory_format:
    """The layout ``model`` trains fastest in on ``device``, and correctly: channels_last,
    except on the CPU for a network with a BatchNorm narrower than
    :data:`CPU_VECTOR_CHANNELS` channels, whose backward pass is several times slower there in
    channels_last (7x at 8 channels, measured on AVX-512) than in the default layout, or with
    a strided 1x1 convolution of fewer than :data:`ONEDNN_SAFE_CHANNELS` input channels, whose
    weight gradient oneDNN gets wrong in channels_last on some CPUs (off by 13-59% on an AVX2
    AMD EPYC, PyTorch 2.14; tests/test_compile.py). Such a network trains in the default
    layout on the CPU."""
    if device.type == "cpu" and any(_slow_or_wrong_in_channels_last(m)
                                    for m in model.modules()):
        return torch.contiguous_format
    return torch.channels_last


#: Input channels from which oneDNN's channels-last weight gradient of a strided 1x1
#: convolution is right on every CPU measured (2 to 7 were wrong on an AVX2 one).
ONEDNN_SAFE_CHANNELS = 8


def _slow_or_wrong_in_channels_last(module: nn.Module) -> bool:
    if isinstance(module, nn.BatchNorm2d):
        return module.num_features < CPU_VECTOR_CHANNELS
    return (isinstance(module, nn.Conv2d) and module.kernel_size == (1, 1)
            and module.stride != (1, 1) and module.in_channels < ONEDNN_SAFE_CHANNELS)


def sync_device(device: torch.device) -> None:
    """Wait for the work queued on ``device`` (a GPU runs asynchronously), so that a clock
    read after it measures the work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def compile_model(model: nn.Module,
                  memory_format: torch.memory_format = torch.channels_last) -> None:
    """Compile ``model``'s forward in place with ``torch.compile`` (its state dict keeps its
    keys, so checkpoints are unchanged); a model that trains in ``memory_format``
    ``contiguous_format`` keeps that layout inside the compiled code too."""
    configure_dynamo_for_cohorts()
    # Inductor moves convolutions to channels_last on its own; for a network the engine keeps
    # in the default layout (see training_memory_format) that would bring back the slow and
    # the wrong kernels it avoids.
    keep = memory_format == torch.contiguous_format
    model.compile(options={"layout_optimization": False} if keep else None)


class StepTimer:
    """Seconds spent in blocks of code on ``device``, summed per key: the wall clock on the
    CPU (which has finished a block's work when it returns); on CUDA, events recorded around
    each block on the current stream and read only when asked, so timing adds no
    synchronisation to the steps."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self._seconds: dict[int, float] = {}
        self._events: dict[int, list[tuple[torch.cuda.Event, torch.cuda.Event]]] = {}

    @contextlib.contextmanager
    def timing(self, key: int) -> Iterator[None]:
        """Time the block under ``key`` (also when it raises)."""
        if self.cuda:
            start, end = (torch.cuda.Event(enable_timing=True),
                          torch.cuda.Event(enable_timing=True))
            start.record()
            try:
                yield
            finally:
                end.record()
                self._events.setdefault(key, []).append((start, end))
            return
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self._seconds[key] = self._seconds.get(key, 0.0) + time.perf_counter() - t0

    def seconds(self, key: int) -> float:
        """The seconds timed under ``key`` (on CUDA, after its last block finished)."""
        events = self._events.get(key, [])
        if events:
            events[-1][1].synchronize()
        return (self._seconds.get(key, 0.0)
                + sum(start.elapsed_time(end) for start, end in events) / 1000)
