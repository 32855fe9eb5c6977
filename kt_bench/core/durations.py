"""Durations as progress lines show them, and the time that work still left will take at the
pace measured so far. Pure functions, light to import."""

from __future__ import annotations


def format_duration(seconds: float) -> str:
    """``seconds`` as a person reads a duration, to the precision that matters at its size:
    ``45s``, ``2m10s``, ``12m``, ``1h05m``, ``3d04h`` (negative values read as ``0s``)."""
    s = max(0, round(seconds))
    if s < 60:
        return f"{s}s"
    m, s = divmod(s, 60)
    if m < 10:
        return f"{m}m{s:02d}s"
    if m < 60:
        return f"{m}m"
    h, m = divmod(m, 60)
    if h < 24:
        return f"{h}h{m:02d}m"
    d, h = divmod(h, 24)
    return f"{d}d{h:02d}h"


def time_left(seconds: float, units_done: float, units_left: float) -> float | None:
    """The seconds ``units_left`` more units of work take at the pace of ``units_done`` units
    in ``seconds``; None before any unit is done (no pace to go by)."""
    if units_done <= 0:
        return None
    return seconds / units_done * max(units_left, 0)
