"""Fetching the published CIFAR-100 teachers: download each file, verify it, lay it out for
``kt-bench run --teachers-dir``.

The manifest (``published_teachers.json`` beside this module) lists RepDistiller's teachers
(R:scripts/fetch_pretrained_teachers.sh): kt-bench's model name, R's, the URL, the path inside
the teachers folder (``<R name>_vanilla/ckpt_epoch_240.pth``), and the size and SHA-256 where
a public source states them or they were computed from the published file (null otherwise).

A file is downloaded to a temporary file in its target folder and renamed into place only once
it arrived whole, matches the manifest's size and hash (or, where the manifest has none, the
hash recorded by an earlier fetch) and loads as a plain-data checkpoint. Then its SHA-256 is
recorded beside it (``ckpt_epoch_240.pth.sha256``, in ``sha256sum -c`` format): where the
manifest gives no hash this record is the reference (trust on first use), which later fetches
and ``run --teachers-dir`` check the file against.

Torch is imported only to check a download: reading the manifest and the records is light.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import os
import re
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from kt_bench.core import atomic
from kt_bench.core.digests import CHUNK, sha256_of_file
from kt_bench.core.errors import ConfigError, KtBenchError, UnwritableFileError, first_line

#: The manifest shipped with the package.
MANIFEST = Path(__file__).with_name("published_teachers.json")

#: What ``teachers fetch`` writes into when given no ``--to`` (relative to the current folder).
DEFAULT_FOLDER = "cifar_teachers"

#: The suffix of the SHA-256 record beside a fetched file.
RECORD_SUFFIX = ".sha256"

#: URL schemes ``--base-url`` takes.
URL_SCHEMES = ("http", "https", "file")

#: Seconds a connection may stay silent before the download is given up.
TIMEOUT_S = 60

_SHA256 = re.compile(r"[0-9a-f]{64}")
_FIELDS = ("model", "r_name", "url", "path", "size", "sha256")

Say = Callable[[str], None]


class FetchError(KtBenchError):
    """A teacher that could not be downloaded or verified; nothing was put in its place."""


@dataclass(frozen=True)
class PublishedTeacher:
    """One row of the manifest: a published teacher and what its file must be."""

    model: str  # kt-bench's model name
    r_name: str  # RepDistiller's model name
    url: str
    path: str  # inside the teachers folder, '/'-separated
    size: int | None  # bytes; None: no figure known
    sha256: str | None  # lowercase hex; None: no figure known

    def url_from(self, base_url: str | None) -> str:
        """The URL to fetch the file from: the manifest's, or ``path`` under ``base_url``."""
        return self.url if base_url is None else f"{base_url.rstrip('/')}/{self.path}"

    def file_in(self, folder: str | os.PathLike) -> Path:
        """Where the file lies in the teachers folder ``folder``."""
        return Path(folder, *PurePosixPath(self.path).parts)


def load_manifest(path: str | os.PathLike | None = None) -> list[PublishedTeacher]:
    """The teachers the manifest ``path`` (default: :data:`MANIFEST`) lists; a malformed
    manifest is a one-line :class:`ConfigError` naming the teacher and field."""
    source = MANIFEST if path is None else Path(path)
    try:
        data = json.loads(source.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"teacher manifest {source} cannot be read: {first_line(exc)}") from None
    rows = data.get("teachers") if isinstance(data, dict) else None
    if not isinstance(rows, list) or not rows:
        raise ConfigError(f"teacher manifest {source}: a 'teachers' list is needed")
    teachers = [_teacher(source, i, row) for i, row in enumerate(rows)]
    names = [n for t in teachers for n in {t.model, t.r_name}]
    paths = [t.path for t in teachers]
    for seen, what in ((names, "name"), (paths, "path")):
        twice = sorted({x for x in seen if seen.count(x) > 1})
        if twice:
            raise ConfigError(f"teacher manifest {source}: {what} '{twice[0]}' appears twice")
    return teachers


def _teacher(source: Path, index: int, row: object) -> PublishedTeacher:
    """Row ``index`` of the manifest ``source``, checked."""
    where = f"teacher manifest {source}: teacher {index}"
    if not isinstance(row, dict) or set(row) != set(_FIELDS):
        raise ConfigError(f"{where} must have exactly the keys {', '.join(_FIELDS)}")
    where += f" ({row['model']})"
    for key in ("model", "r_name", "url", "path"):
        if not isinstance(row[key], str) or not row[key]:
            raise ConfigError(f"{where}: '{key}' must be a non-empty string")
    rel = PurePosixPath(row["path"])
    if rel.is_absolute() or ".." in rel.parts or "\\" in row["path"]:
        raise ConfigError(f"{where}: 'path' must be relative, inside the teachers folder; "
                          f"got '{row['path']}'")
    size = row["size"]
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 0):
        raise ConfigError(f"{where}: 'size' must be a number of bytes or null; got {size!r}")
    digest = row["sha256"]
    if digest is not None and not (isinstance(digest, str) and _SHA256.fullmatch(digest)):
        raise ConfigError(f"{where}: 'sha256' must be 64 lowercase hex digits or null; "
                          f"got {digest!r}")
    return PublishedTeacher(**row)


def select(teachers: Sequence[PublishedTeacher], only: Sequence[str] | None) -> list[
        PublishedTeacher]:
    """The teachers named in ``only`` (kt-bench's or R's model names; all when empty), in
    manifest order; an unknown name is a one-line error listing the names accepted."""
    if not only:
        return list(teachers)
    known = {n for t in teachers for n in (t.model, t.r_name)}
    unknown = [n for n in only if n not in known]
    if unknown:
        raise KtBenchError(f"--only: no published teacher '{unknown[0]}'; known: "
                           f"{', '.join(t.model for t in teachers)}")
    return [t for t in teachers if {t.model, t.r_name} & set(only)]


def check_base_url(url: str) -> str:
    """``url`` when it can serve as ``--base-url``; a one-line error otherwise."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in URL_SCHEMES or not (parts.netloc or parts.scheme == "file"):
        raise KtBenchError(f"--base-url takes an {', '.join(s + '://' for s in URL_SCHEMES)} "
                           f"URL (the folder holding <name>_vanilla/...); got '{url}'")
    return url


# -- records of verified files ---------------------------------------------------------------

def record_path(file: str | os.PathLike) -> Path:
    """Where the SHA-256 of the fetched ``file`` is recorded (``<file>.sha256``)."""
    file = Path(file)
    return file.with_name(file.name + RECORD_SUFFIX)


def read_record(file: str | os.PathLike) -> str | None:
    """The SHA-256 recorded beside ``file`` when it was fetched; None without a record. A
    record that is no ``sha256sum`` line for ``file`` is a one-line error."""
    record = record_path(file)
    try:
        text = record.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except PermissionError:
        raise atomic.unreadable(record) from None
    except (OSError, ValueError) as exc:
        raise KtBenchError(f"{record} cannot be read: {first_line(exc)}") from None
    lines = [ln for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]
    fields = lines[0].split(maxsplit=1) if len(lines) == 1 else []
    if (len(fields) != 2 or not _SHA256.fullmatch(fields[0])
            or fields[1].lstrip("*") != Path(file).name):
        raise KtBenchError(f"{record} is no SHA-256 record of {Path(file).name} (one line "
                           f"'<sha256>  {Path(file).name}'); delete it to record the file again "
                           "on the next fetch")
    return fields[0]


def write_record(file: Path, sha256: str, size: int, url: str, first_use: bool) -> None:
    """Record ``file``'s SHA-256 (and, as a comment, its size and origin) beside it,
    atomically; ``sha256sum -c`` checks the file against it."""
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    why = ("the manifest gives no hash: this record is the reference (trust on first use)"
           if first_use else "verified against the manifest")
    atomic.write_text(record_path(file),
                      f"# kt-bench teachers fetch: {size} bytes from {url} on {stamp}\n"
                      f"# {why}\n{sha256}  {file.name}\n")


def record_mismatch(file: str | os.PathLike, sha256: str | None) -> str | None:
    """Why ``file``, whose content has the SHA-256 ``sha256``, may not be used: it differs from
    the hash recorded beside it when it was fetched (None when it matches or has no record)."""
    recorded = read_record(file)
    if recorded is None or sha256 == recorded:
        return None
    now = f"{sha256[:12]}..." if sha256 else "unreadable"
    return (f"{file} differs from the SHA-256 recorded beside it when it was fetched "
            f"({record_path(file).name}: {recorded[:12]}..., the file: {now}); "
            "`kt-bench teachers fetch --force` fetches it again, or delete the record to use "
            "the file as it is")


# -- status of a teachers folder -------------------------------------------------------------

def state_of(teacher: PublishedTeacher, folder: str | os.PathLike) -> str:
    """Where ``teacher`` stands in ``folder``: missing; present but unverified (no hash to
    check it against); verified (against the manifest or the recorded hash); or ALTERED."""
    file = teacher.file_in(folder)
    if not file.is_file():
        return "missing"
    recorded = read_record(file)
    expected = teacher.sha256 or recorded
    if expected is None:
        return "present, unverified (no hash recorded)"
    digest, size = sha256_of_file(file), file.stat().st_size
    against = "the manifest" if teacher.sha256 else "recorded hash"
    if digest != expected or (teacher.size is not None and size != teacher.size):
        return f"ALTERED (differs from the {against})"
    return f"verified ({against})"


# -- fetching -------------------------------------------------------------------------------

def fetch(teachers: Sequence[PublishedTeacher], folder: str | os.PathLike,
          base_url: str | None = None, force: bool = False,
          say: Say = print) -> dict[str, str]:
    """Download ``teachers`` into ``folder`` (from their URLs, or from ``base_url`` with the
    same relative paths), verify each, record its hash, and return each model's outcome
    (``fetched`` or ``skipped``). A file already present and verified is skipped unless
    ``force``. The first teacher that fails stops the fetch with a one-line
    :class:`FetchError`; the teachers placed before it stay."""
    if base_url is not None:
        check_base_url(base_url)
    return {t.model: _fetch_one(t, Path(folder), base_url, force, say) for t in teachers}


def _fetch_one(teacher: PublishedTeacher, folder: Path, base_url: str | None, force: bool,
               say: Say) -> str:
    """Fetch one teacher into ``folder``: ``fetched`` or ``skipped``."""
    file = teacher.file_in(folder)
    recorded = read_record(file)
    expected = teacher.sha256 or recorded
    against = ("the manifest's SHA-256" if teacher.sha256
               else f"the SHA-256 recorded in {record_path(file)}")
    if file.is_file() and not force:
        if expected is not None:
            digest, size = sha256_of_file(file), file.stat().st_size
            if digest != expected or (teacher.size is not None and size != teacher.size):
                raise FetchError(f"{file} differs from {against} ({digest[:12]}..., expected "
                                 f"{expected[:12]}...): it was altered after it was fetched; "
                                 "`kt-bench teachers fetch --force` fetches it again")
            if recorded != digest:
                write_record(file, digest, size, teacher.url, first_use=False)
            say(f"{teacher.model}: {file} is present and verified: skipped")
            return "skipped"
        say(f"{teacher.model}: {file} is present with no hash to verify it against: "
            "fetching it again")
    url = teacher.url_from(base_url)
    digest, size = _download(url, file, teacher, expected, against)
    write_record(file, digest, size, url, first_use=expected is None)
    how = ("SHA-256 recorded (trust on first use: the manifest gives no hash)"
           if expected is None else f"matches {against}")
    say(f"{teacher.model}: fetched {file} ({size:,} bytes), {how}")
    return "fetched"


def _download(url: str, file: Path, teacher: PublishedTeacher, expected: str | None,
              against: str) -> tuple[str, int]:
    """Download ``url`` to ``file`` through a temporary file beside it, which is renamed into
    place only once the download is whole, matches ``expected`` (and the manifest's size) and
    loads as a checkpoint; (SHA-256, size) of the placed file."""
    made = not file.parent.exists()
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{file.name}.", suffix=".part", dir=file.parent)
    except OSError as exc:
        raise UnwritableFileError(f"cannot write {file}: {exc.strerror or first_line(exc)}") \
            from None
    not_placed = f"nothing was placed at {file}"
    try:
        with os.fdopen(fd, "wb") as out:
            digest, size, length = _stream(url, out, file, not_placed)
            out.flush()
            os.fsync(out.fileno())
        if length is not None and size != length:
            raise FetchError(f"{url} was cut short: {size:,} of {length:,} bytes arrived; "
                             f"{not_placed}")
        if teacher.size is not None and size != teacher.size:
            raise FetchError(f"{url} has {size:,} bytes, the manifest says {teacher.size:,}; "
                             f"{not_placed}")
        if expected is not None and digest != expected:
            raise FetchError(f"{url} differs from {against} ({digest[:12]}..., expected "
                             f"{expected[:12]}...): altered; {not_placed}")
        _check_loadable(Path(tmp), url, not_placed)
        os.chmod(tmp, 0o666 & ~atomic.current_umask())  # mkstemp makes it 0600
        os.replace(tmp, file)
    except BaseException:
        with contextlib.suppress(OSError):
            Path(tmp).unlink(missing_ok=True)
            if made:  # leave no empty <name>_vanilla folder that looks like a teacher
                file.parent.rmdir()
        raise
    return digest, size


def _stream(url: str, out, file: Path, not_placed: str) -> tuple[str, int, int | None]:
    """Copy ``url`` into the binary file ``out``: (SHA-256, bytes received, Content-Length or
    None), with a progress bar on a terminal."""
    from tqdm import tqdm  # here: reading the manifest and records needs no progress bar

    response = _open(url)
    digest, size = hashlib.sha256(), 0
    with response:
        header = response.headers.get("Content-Length")
        length = int(header) if header and header.isdigit() else None
        with tqdm(total=length, unit="B", unit_scale=True, unit_divisor=1024, leave=False,
                  desc=file.parent.name, disable=not sys.stderr.isatty()) as bar:
            while True:
                try:
                    chunk = response.read(CHUNK)
                except (OSError, http.client.HTTPException) as exc:
                    raise FetchError(f"{url} was cut short after {size:,} bytes "
                                     f"({first_line(exc)}); {not_placed}") from None
                if not chunk:
                    break
                try:
                    out.write(chunk)
                except OSError as exc:
                    raise UnwritableFileError(f"cannot write {file}: "
                                              f"{exc.strerror or first_line(exc)}") from None
                digest.update(chunk)
                size += len(chunk)
                bar.update(len(chunk))
    return digest.hexdigest(), size, length


def _open(url: str):
    """The response to a GET of ``url``; a one-line error when the server cannot be reached or
    refuses."""
    request = urllib.request.Request(url, headers={"User-Agent": "kt-bench"})
    try:
        return urllib.request.urlopen(request, timeout=TIMEOUT_S)
    except urllib.error.HTTPError as exc:
        exc.close()
        raise FetchError(f"{url}: the server answered HTTP {exc.code} {exc.reason}") from None
    except urllib.error.URLError as exc:
        reason = exc.reason
        if isinstance(reason, OSError) and reason.strerror:
            reason = reason.strerror
        elif not isinstance(reason, str):
            reason = first_line(reason)
        raise FetchError(f"cannot reach {url}: {reason}") from None
    except (OSError, ValueError, http.client.HTTPException) as exc:
        raise FetchError(f"cannot reach {url}: {first_line(exc)}") from None


def _check_loadable(path: Path, url: str, not_placed: str) -> None:
    """A one-line error unless ``path`` loads as plain data (never running code from it) and
    holds a state dict of tensors, alone or under ``model``, ``state_dict`` or ``net``."""
    import torch

    from kt_bench.training.checkpoints import UnsafeFileError, load_plain, state_dict_in

    try:
        state = load_plain(path)
    except UnsafeFileError as exc:
        raise FetchError(f"{url} cannot be loaded safely: {exc}; {not_placed}") from None
    except Exception as exc:  # noqa: BLE001 - a broken file is one line
        raise FetchError(f"{url} is no loadable checkpoint ({first_line(exc)}); "
                         f"{not_placed}") from None
    state = state_dict_in(state)
    if (not isinstance(state, dict) or not state
            or not all(torch.is_tensor(v) for v in state.values())):
        raise FetchError(f"{url} loads but holds no state dict of tensors; {not_placed}")
