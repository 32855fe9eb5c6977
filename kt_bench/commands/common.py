"""What several commands share: the ``--plugins`` option and the checks of the folders a
command is told to write to. Light to import (no torch): ``report`` uses it."""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

from kt_bench.core.errors import KtBenchError, first_line


def add_plugins_arg(parser: argparse.ArgumentParser) -> None:
    """Give ``parser`` the repeatable ``--plugins DIR`` option."""
    parser.add_argument("--plugins", action="append", default=[], metavar="DIR",
                        help="folder of method plugin files (repeatable; also KT_BENCH_PLUGINS)")


def _unwritable(folder: Path, what: str, reason: str) -> KtBenchError:
    """The one-line error for a folder ``what`` (e.g. ``--out folder``) that cannot be used."""
    return KtBenchError(f"{what} {folder} cannot be created or written: {reason}; accepted: "
                        "a folder you can write to")


def check_writable(folder: Path, what: str) -> None:
    """Create ``folder`` (and its parents) and write and remove a file in it; a one-line
    error naming ``what`` (e.g. ``--out folder``) if that fails."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        handle, name = tempfile.mkstemp(dir=folder, prefix=".kt-bench-write-check-")
        os.close(handle)
        os.unlink(name)
    except OSError as exc:
        raise _unwritable(folder, what, exc.strerror or first_line(exc)) from None


def check_could_write(folder: Path, what: str) -> None:
    """Like :func:`check_writable`, but creating nothing: the nearest existing folder on
    ``folder``'s path must be a folder this process may write to."""
    existing = folder.absolute()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise _unwritable(folder, what, f"{existing} is not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise _unwritable(folder, what, f"{existing} is not writable")
