"""Corrections for the many comparisons of one table: Holm's step-down (family-wise error
rate) and Benjamini–Hochberg's step-up (false discovery rate) adjusted p-values, and the
level each comparison's confidence interval is drawn at.

The levels are chosen so that an interval excludes zero exactly when its comparison is
significant after the correction:

- ``holm``: the comparison with the i-th smallest of m p-values is tested at α/(m−i+1) while
  every smaller one was rejected; its interval has that level. From the first comparison not
  rejected on, every later one gets the level at which the procedure stopped. (Holm, 1979.)
- ``bh``: with R of m comparisons rejected, every interval is drawn at level R·α/m (α/m when
  none is), the false-coverage-rate adjusted intervals of Benjamini & Yekutieli (2005).
- ``none``: every interval at α, uncorrected.

Comparisons without a p-value (one seed: no interval) are no part of the family.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from kt_bench.core.errors import KtBenchError

#: The corrections a report may apply; the first is the default.
CORRECTIONS = ("holm", "bh", "none")


def check_correction(name: object, who: str = "--correct") -> str:
    """``name`` checked to be one of :data:`CORRECTIONS`."""
    if name not in CORRECTIONS:
        raise KtBenchError(f"{who} {name!r} is invalid; accepted: {', '.join(CORRECTIONS)}")
    return str(name)


def _family(p_values: Sequence[float]) -> list[int]:
    """Indices of the p-values that are numbers, smallest p first (ties in given order)."""
    present = [i for i, p in enumerate(p_values) if not math.isnan(p)]
    return sorted(present, key=lambda i: p_values[i])


def adjusted_p(p_values: Sequence[float], correction: str) -> list[float]:
    """The p-values adjusted by ``correction`` (NaN stays NaN and is not counted): Holm's
    ``max_{j≤i} min(1, (m−j+1)·p_(j))``, BH's ``min_{j≥i} min(1, m/j·p_(j))``."""
    check_correction(correction)
    out = [math.nan] * len(p_values)
    order = _family(p_values)
    m = len(order)
    if correction == "none":
        return [float(p) for p in p_values]
    if correction == "holm":
        running = 0.0
        for rank, i in enumerate(order, start=1):
            running = max(running, min(1.0, (m - rank + 1) * p_values[i]))
            out[i] = running
    else:
        running = 1.0
        for rank in range(m, 0, -1):
            i = order[rank - 1]
            running = min(running, min(1.0, m / rank * p_values[i]))
            out[i] = running
    return out


def interval_alphas(p_values: Sequence[float], correction: str,
                    alpha: float = 0.05) -> list[float]:
    """The α of each comparison's interval (its level is 1 − α) under ``correction``, as the
    module's docstring sets out; NaN where the p-value is NaN."""
    check_correction(correction)
    order = _family(p_values)
    m = len(order)
    out = [math.nan] * len(p_values)
    if correction == "none":
        for i in order:
            out[i] = alpha
    elif correction == "holm":
        level = alpha / m if m else alpha
        stopped = False
        for rank, i in enumerate(order, start=1):
            if not stopped:
                level = alpha / (m - rank + 1)
                stopped = p_values[i] > level
            out[i] = level
    else:
        rejected = max((rank for rank, i in enumerate(order, start=1)
                        if p_values[i] <= rank * alpha / m), default=0)
        for i in order:
            out[i] = max(rejected, 1) * alpha / m
    return out
