"""Which arithmetic a run uses: ``--precision auto`` resolved for the device at hand.

bf16 autocast pays where the hardware multiplies bf16 natively: every CUDA GPU with bf16, and
x86 CPUs with AVX512-BF16 or AMX, where oneDNN runs bf16 convolutions well ahead of fp32.
Elsewhere on the CPU bf16 is emulated and slower than fp32, so ``auto`` keeps full precision.
"""

from __future__ import annotations

import functools
from pathlib import Path

PRECISIONS = ("no", "bf16", "fp16")

#: /proc/cpuinfo flags of x86 CPUs that multiply bf16 natively.
BF16_CPU_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})


def _cpuinfo_flags(path: Path = Path("/proc/cpuinfo")) -> set[str]:
    """The feature flags the kernel lists for the first CPU (empty where there is no such
    file, as off Linux)."""
    try:
        text = path.read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.partition(":")[2].split())
    return set()


@functools.cache
def cpu_has_native_bf16() -> bool:
    """Whether this CPU runs bf16 arithmetic natively (AVX512-BF16 or AMX), as PyTorch's own
    CPU feature checks report it, or failing those (an older PyTorch) the kernel's flags."""
    import torch  # here: reading the names of precisions needs no torch

    if not torch.backends.mkldnn.is_available():
        return False  # no oneDNN: PyTorch has no fast bf16 kernels to use
    checks = [getattr(torch.cpu, name, None)
              for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    checks = [check for check in checks if callable(check)]
    if checks:
        return any(check() for check in checks)
    return bool(_cpuinfo_flags() & BF16_CPU_FLAGS)


def resolve_precision(precision: str, device: str = "auto") -> str:
    """``auto``: bf16 autocast where the device runs bf16 natively (a CUDA GPU with bf16, a CPU
    with AVX512-BF16 or AMX), full precision (``no``) elsewhere. Any other value is returned
    as given."""
    if precision != "auto":
        return precision
    import torch

    if device != "cpu" and torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "no"
    if device == "cuda":  # no CUDA: the device check refuses it; no precision to pick
        return "no"
    return "bf16" if cpu_has_native_bf16() else "no"


#: How each precision is named for people (``no`` is Accelerate's name for full precision).
PRECISION_NAMES = {"no": "fp32", "bf16": "bf16", "fp16": "fp16"}


def describe_precision(precision: str) -> str:
    """The precision in words: ``fp32``, ``bf16 autocast`` or ``fp16 autocast``."""
    name = PRECISION_NAMES.get(precision, precision)
    return name if precision == "no" else f"{name} autocast"
