"""Atomic file writes: a reader sees the old file or the new one, never half of one.

Files are created with the permissions the user's umask gives (0644 under umask 022), as any
tool's output is, so that whoever shares a results folder can read them. A write that fails is
one line naming the file and the system's reason; a file that may not be read is one line too,
never taken for a damaged one.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import pwd
import shutil
import stat
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

from kt_bench.core.errors import UnreadableFileError, UnwritableFileError, first_line

#: Below this many free bytes a failed write is put down to a full disk.
_NEARLY_FULL = 1 << 20


def current_umask() -> int:
    """The process's file-creation mask (e.g. 0o022)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    # no /proc: os.umask both sets and reads; a strict mask in the instant between the two
    # calls keeps a file another thread creates then from being laxer than meant
    old = os.umask(0o077)
    os.umask(old)
    return old


def _user(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


def unreadable(path: str | os.PathLike) -> UnreadableFileError:
    """The one-line error for ``path``, which exists but which this user may not read: its
    mode and owner, and who kt-bench runs as."""
    try:
        st = os.stat(path)
    except OSError:
        whose = ""
    else:
        whose = (f" ({stat.filemode(st.st_mode)} owned by {_user(st.st_uid)}; kt-bench runs "
                 f"as {_user(os.geteuid())})")
    return UnreadableFileError(f"cannot read {path}: permission denied{whose}; it is left as "
                               "it is")


class _Watched:
    """A binary file that remembers the last exception its writes raised: a writer such as
    torch.save reports it as an exception of its own (a RuntimeError), be it a full disk or
    a Ctrl-C that arrived during the write."""

    def __init__(self, fh: BinaryIO) -> None:
        self._fh = fh
        self.error: BaseException | None = None

    def write(self, data) -> int:
        try:
            return self._fh.write(data)
        except BaseException as exc:
            self.error = exc
            raise

    def flush(self) -> None:
        try:
            self._fh.flush()
        except BaseException as exc:
            self.error = exc
            raise


def _disk_full(folder: Path) -> bool:
    try:
        return shutil.disk_usage(folder).free < _NEARLY_FULL
    except OSError:
        return False


def _cannot_write(path: Path, exc: BaseException,
                  cause: OSError | None = None) -> UnwritableFileError:
    """The one-line error for a write of ``path`` that failed with ``exc`` (after the file
    reported ``cause``)."""
    cause = exc if isinstance(exc, OSError) else cause
    if cause is not None:
        reason = cause.strerror or first_line(cause)
    elif _disk_full(path.parent):
        reason = os.strerror(errno.ENOSPC)
    else:
        reason = f"the write failed, perhaps for want of space ({first_line(exc)})"
    return UnwritableFileError(f"cannot write {path}: {reason}")


def _create_temporary(path: Path) -> tuple[int, str]:
    """A new empty file beside ``path`` (descriptor, name), with the mode the umask gives."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~current_umask())  # mkstemp makes it 0600
    except OSError:
        os.close(fd)
        _discard(tmp)
        raise
    return fd, tmp


def _discard(tmp: str) -> None:
    with contextlib.suppress(OSError):
        Path(tmp).unlink(missing_ok=True)


def write_through(path: Path, write: Callable[[Any], Any],
                    failures: tuple[type[BaseException], ...] = (OSError,)) -> None:
    """Write ``path`` through ``write`` (given a binary file to write to, e.g. chunk by
    chunk) atomically: a temporary file in the same folder, synced, then renamed; ``failures``
    (and any OSError) become one-line :class:`UnwritableFileError`s, and any error leaves
    ``path`` as it was."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = _create_temporary(path)
    except OSError as exc:
        raise _cannot_write(path, exc) from None
    watched: _Watched | None = None
    try:
        with os.fdopen(fd, "wb") as fh:
            watched = _Watched(fh)
            write(watched)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except (OSError, *failures) as exc:
        _discard(tmp)
        seen = watched.error if watched else None
        if seen is not None and not isinstance(seen, Exception):
            raise seen from None  # an interrupt the writer reported as its own failure
        raise _cannot_write(path, exc, seen if isinstance(seen, OSError) else None) from None
    except BaseException:
        _discard(tmp)
        raise


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temporary file in the same folder, then rename).
    A failure is an :class:`UnwritableFileError` naming ``path`` and the reason."""
    write_through(Path(path), lambda fh: fh.write(data))


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON to ``path`` atomically."""
    write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def read_json(path: str | os.PathLike) -> Any | None:
    """The JSON value in ``path``; None when the file is missing or not readable JSON (damaged).
    A file this user may not read raises :class:`UnreadableFileError` (see :func:`unreadable`):
    it is someone else's, not a damaged one."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except PermissionError:
        raise unreadable(path) from None
    except (OSError, ValueError):  # ValueError: bad UTF-8
        return None
    try:
        return json.loads(text)
    except ValueError:
        return None


def append_line(path: str | os.PathLike, text: str) -> None:
    """Append ``text`` as a timestamped line to the log file ``path`` (a log grows line by
    line: no temporary file); OSErrors pass to the caller, which decides what a lost line
    costs."""
    with open(path, "a") as fh:
        fh.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {text}\n")


def move_aside(path: str | os.PathLike) -> Path | None:
    """Rename a damaged ``path`` to ``<name>.damaged-<UTC time>`` beside it, keeping it for a
    look; return the new path, or None when ``path`` is gone (another process moved it)."""
    path = Path(path)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    aside = path.with_name(f"{path.name}.damaged-{stamp}")
    n = 1
    while aside.exists():
        aside = path.with_name(f"{path.name}.damaged-{stamp}-{n}")
        n += 1
    try:
        os.replace(path, aside)
    except FileNotFoundError:
        return None
    return aside


def previous_path(path: Path) -> Path:
    """Where the previous copy of ``path`` is kept when a new one replaces it
    (``checkpoint.prev.pt`` beside ``checkpoint.pt``)."""
    return path.with_name(f"{path.stem}.prev{path.suffix}")


def torch_save(path: str | os.PathLike, obj: Any) -> None:
    """``torch.save`` ``obj`` to ``path`` atomically; a failed write (torch reports some as a
    RuntimeError) is an :class:`UnwritableFileError` naming ``path`` and the reason."""
    import torch  # here: the JSON and text writers serve commands that never load torch

    write_through(Path(path), lambda fh: torch.save(obj, fh), failures=(RuntimeError,))
