"""What stops a whole run and what fails one cell.

Ctrl-C (SIGINT) and, in ``kt-bench run``, SIGTERM stop the run: what is done stays done and
the next run resumes. So does anything a signal handler raises, such as submitit's exit on
preemption. A plugin that calls ``sys.exit()`` does not stop the run: its cell fails, as if
it had raised any other exception.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from types import CodeType, TracebackType

from kt_bench.core.errors import KtBenchError

#: Exit statuses of a run stopped by SIGINT and by SIGTERM: 128 + the signal's number, as a
#: shell reports a process the signal ended.
EXIT_INTERRUPTED = 128 + signal.SIGINT
EXIT_TERMINATED = 128 + signal.SIGTERM


class Terminated(KeyboardInterrupt):
    """SIGTERM arrived: the run stops exactly as on Ctrl-C (a KeyboardInterrupt, so that every
    place that lets an interrupt through lets this through too)."""


class PluginExit(KtBenchError):
    """A method called ``sys.exit()`` (raised ``SystemExit``): its own cell fails."""


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Within the block, SIGTERM raises :class:`Terminated` in the main thread; the previous
    handler is back afterwards. Off the main thread, where no handler can be set, nothing
    changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _raise_terminated(signum: int, frame: object) -> None:
    raise Terminated(f"signal {signal.Signals(signum).name}")


def stop_reason(exc: BaseException) -> str:
    """How a stopped run names its cause in a cell's log: ``by SIGTERM``, ``by SIGINT
    (Ctrl-C)``, or empty (another stop, e.g. a preempted job's exit)."""
    if isinstance(exc, Terminated):
        return "by SIGTERM"
    if isinstance(exc, KeyboardInterrupt):
        return "by SIGINT (Ctrl-C)"
    return ""


def is_stop(exc: BaseException) -> bool:
    """Whether ``exc`` stops the whole run rather than failing a cell: an interrupt, an exit
    or any other exception that is no ``Exception``, or whatever a signal handler raised."""
    return not isinstance(exc, Exception) or _raised_in_signal_handler(exc)


def cell_failure(exc: BaseException, who: str) -> BaseException:
    """The error that fails one cell for ``exc``, caught around code of ``who`` (e.g.
    ``method 'kd'``): ``exc`` itself for an ordinary exception, a :class:`PluginExit` for a
    ``SystemExit`` the code raised. Raises ``exc`` again when it stops the whole run (see
    :func:`is_stop`)."""
    if isinstance(exc, SystemExit) and not _raised_in_signal_handler(exc):
        code = "" if exc.code is None else repr(exc.code)
        return PluginExit(f"{who} called sys.exit({code})")
    if is_stop(exc):
        raise exc
    return exc


def _raised_in_signal_handler(exc: BaseException) -> bool:
    """Whether the traceback of ``exc`` passes through a Python function installed as a signal
    handler: then a signal raised it wherever the program happened to be, not the code it
    interrupted."""
    handlers = _signal_handler_code()
    return bool(handlers) and any(code in handlers for code in _traceback_code(exc.__traceback__))


def _signal_handler_code() -> set[CodeType]:
    codes = set()
    for signum in signal.valid_signals():
        try:
            handler = signal.getsignal(signum)
        except (OSError, ValueError):
            continue
        code = getattr(getattr(handler, "__func__", handler), "__code__", None)
        if code is not None:
            codes.add(code)
    return codes


def _traceback_code(tb: TracebackType | None) -> Iterator[CodeType]:
    while tb is not None:
        yield tb.tb_frame.f_code
        tb = tb.tb_next
