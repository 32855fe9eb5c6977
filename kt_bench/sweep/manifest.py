"""A run folder's manifest: the cells asked for in it, so that ``kt-bench status`` shows the
ones not started yet as pending."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from kt_bench.core import atomic
from kt_bench.core.errors import UnreadableFileError
from kt_bench.core.locks import FileLock
from kt_bench.sweep.cells import Cell
from kt_bench.sweep.rows import warn_once

#: The manifest's file name in a run folder.
MANIFEST = "manifest.json"


def write_manifest(out: Path, cells: list[Cell]) -> None:
    """Add ``cells`` to ``out/manifest.json`` (the cells asked for in this folder), so that
    cells not started yet show as pending."""
    with FileLock(out / ".manifest.lock"):
        known = read_manifest(out, "rewritten", "status finds the cells by their config.json")
        if known is None:  # another user's: not replaced
            return
        known.update({c.cell_id: c.identity() for c in cells})
        atomic.write_json(out / MANIFEST, known)


def read_manifest(out: Path, then: str, unreadable: str) -> dict[str, dict[str, Any]] | None:
    """The cells of ``out/manifest.json``; none (with a warning saying ``then``) when it is
    damaged; None (with a warning saying ``unreadable``) when this user may not read it."""
    path = out / MANIFEST
    if not path.exists():
        return {}
    try:
        known = atomic.read_json(path)
    except UnreadableFileError as exc:
        warn_once(f"{exc}; {unreadable}")
        return None
    if not isinstance(known, dict):
        print(f"kt-bench: warning: {path} is damaged (not a JSON object); {then}",
              file=sys.stderr)
        return {}
    return {k: v for k, v in known.items() if isinstance(v, dict)}
