"""Advisory file locks, so several runners (processes or machines) can share one out folder.

``fcntl.flock`` locks are released by the kernel when their holder exits, however it exits
(``kill -9`` included), so a lock never outlives a dead runner. On a shared file system they
work where the file system supports them (NFSv4 and Lustre do).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import time
from pathlib import Path

from kt_bench.core import atomic
from kt_bench.core.errors import UnwritableFileError


class FileLock:
    """An exclusive lock on ``path`` (created if missing); holds the holder's host and pid."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self._fd: int | None = None

    def acquire(self, blocking: bool = True) -> bool:
        """Take the lock; without ``blocking``, return False at once if another holds it. A
        lock file that cannot be opened or locked is a one-line error naming it."""
        fd, writable = self._open()
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            os.close(fd)
            return False
        except OSError as exc:
            os.close(fd)
            raise UnwritableFileError(f"cannot lock {self.path}: "
                                      f"{exc.strerror or type(exc).__name__}") from None
        if writable:
            with contextlib.suppress(OSError):  # who holds it is only information
                os.ftruncate(fd, 0)
                os.write(fd, f"{socket.gethostname()} {os.getpid()} {time.time():.0f}\n"
                         .encode())
        self._fd = fd
        return True

    def _open(self) -> tuple[int, bool]:
        """A descriptor of the lock file (created with the mode the umask gives), and whether
        it was opened for writing: another user's lock file may be readable only, and a
        read-only descriptor locks as well."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            return os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666), True
        except PermissionError:
            pass
        except OSError as exc:
            raise UnwritableFileError(f"cannot write {self.path}: "
                                      f"{exc.strerror or type(exc).__name__}") from None
        try:
            return os.open(self.path, os.O_RDONLY), False
        except PermissionError:
            raise atomic.unreadable(self.path) from None
        except OSError:  # not there, and not ours to create
            raise UnwritableFileError(f"cannot write {self.path}: permission denied") from None

    def release(self) -> None:
        """Give the lock up."""
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> FileLock:
        self.acquire(blocking=True)
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def holder(path: str | os.PathLike) -> str | None:
    """Who holds the lock at ``path`` ("host pid time"), or None if nobody does (a missing
    file is not held). Looking takes a shared lock for an instant. A lock file this user may
    not read is an :class:`~kt_bench.core.errors.UnreadableFileError`."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    except PermissionError:
        raise atomic.unreadable(path) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        with open(path) as fh:
            return fh.read().strip() or "unknown"
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)
