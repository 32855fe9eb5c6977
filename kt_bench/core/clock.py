"""Where a run spends its time before its first training step: a few named marks, in seconds
since the process started, so short runs can be kept short (``kt-bench bench`` reports them).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

_IMPORTED = time.perf_counter()


def _process_age() -> float | None:
    """Seconds since this process started (Linux's /proc), None where that cannot be read."""
    try:
        start_ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return max(uptime - start_ticks / os.sysconf("SC_CLK_TCK"), 0.0)


#: perf_counter() at the process's start (at this module's import where /proc is missing).
_STARTED = _IMPORTED - (_process_age() or 0.0)


class StartupClock:
    """The moments a run reached its phases (``imports``, ``data``, ``teacher``, ...), each in
    seconds since the process started; :meth:`phases` gives each phase's own seconds."""

    #: The last phase: once it is marked, :attr:`on_done` is called with the clock.
    FINAL = "first step"

    def __init__(self) -> None:
        self.marks: dict[str, float] = {}
        self.on_done: Callable[[StartupClock], None] | None = None

    def mark(self, phase: str) -> None:
        """Record that ``phase`` has just ended (the first time only)."""
        if phase in self.marks:
            return
        self.marks[phase] = time.perf_counter() - _STARTED
        if phase == self.FINAL and self.on_done is not None:
            self.on_done(self)

    @property
    def done(self) -> bool:
        """Whether the final phase (the first step) has been marked."""
        return self.FINAL in self.marks

    @property
    def elapsed(self) -> float:
        """Seconds from the process's start to the latest mark."""
        return max(self.marks.values(), default=0.0)

    def phases(self) -> dict[str, float]:
        """Each phase's seconds (from the previous mark to its own), in order of the marks."""
        out, last = {}, 0.0
        for phase, t in self.marks.items():
            out[phase] = t - last
            last = t
        return out

    def summary(self) -> str:
        """One line: each phase's seconds and when the first step ended."""
        parts = ", ".join(f"{p} {s:.2f} s" for p, s in self.phases().items())
        return f"start-up: {parts} (first step done {self.elapsed:.2f} s after launch)"


#: The clock of this process's run (one ``kt-bench run`` per process).
CLOCK = StartupClock()
