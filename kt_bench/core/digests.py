"""SHA-256 digests: of a file's content, and of a JSON-able value (for ids and cache keys)."""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

from kt_bench.core import atomic

#: How much of a file is read at a time (a teacher checkpoint may be large).
CHUNK = 1 << 20


def sha256_of_file(path: str | os.PathLike) -> str:
    """The SHA-256 (hex) of the content of the file ``path``, read in chunks. A file this
    user may not read is an :class:`~kt_bench.core.errors.UnreadableFileError`; other
    OSErrors pass through."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as fh:
            while chunk := fh.read(CHUNK):
                digest.update(chunk)
    except PermissionError:
        raise atomic.unreadable(path) from None
    return digest.hexdigest()


def json_hash(value: Any, length: int) -> str:
    """The first ``length`` hex digits of the SHA-256 of ``value`` as compact, key-sorted
    JSON (what JSON cannot hold, as ``str``)."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:length]
