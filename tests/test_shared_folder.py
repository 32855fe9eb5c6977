"""A results folder shared between users keeps every row: files are written with the user's
umask, a file that may not be read is reported (never taken for a damaged one, never moved), a
write that fails is one line naming the file, and a teacher checkpoint is known by its content,
not its path.

The tests run as root, whom no permission stops, so a file that may not be read is simulated by
making its opening raise PermissionError (EACCES), as the kernel does for another user."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import stat
from pathlib import Path

import pandas as pd
import pytest
import torch

from kt_bench.api.method import build_method
from kt_bench.commands.main import main
from kt_bench.core import atomic, locks
from kt_bench.core.errors import UnreadableFileError, UnwritableFileError
from kt_bench.core.options import Spec
from kt_bench.data import load_dataset
from kt_bench.models import build_model
from kt_bench.sweep import cells, teachers
from kt_bench.sweep.cells import expand
from kt_bench.sweep.config import Recipe, load_grid
from kt_bench.training import checkpoints
from kt_bench.training.checkpoints import load_checkpoint, log_beside, save_checkpoint
from kt_bench.training.device import make_accelerator
from kt_bench.training.engine import train

from .conftest import write_tiny_grid

DATA = Spec("synthetic", {"n_train": 64, "n_test": 32, "image_size": 8, "noise": 2.0})
TEACHER = Spec("resnet8", {"width": 0.5})


@pytest.fixture
def umask():
    """Set the process umask for a test; the old one comes back after it."""
    old = os.umask(0o022)
    yield os.umask
    os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _denied(path: Path) -> PermissionError:
    return PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))


# -- files are created with the user's umask -------------------------------------------------

def test_atomic_files_take_the_users_umask(tmp_path, umask):
    umask(0o022)
    assert atomic.current_umask() == 0o022
    atomic.write_json(tmp_path / "a.json", {"a": 1})
    atomic.write_text(tmp_path / "b.csv", "x\n")
    atomic.torch_save(tmp_path / "c.pt", {"w": torch.zeros(2)})
    assert [_mode(tmp_path / n) for n in ("a.json", "b.csv", "c.pt")] == [0o644] * 3
    umask(0o027)
    atomic.write_json(tmp_path / "a.json", {"a": 2})  # a new file replaces the old one
    assert _mode(tmp_path / "a.json") == 0o640 and atomic.current_umask() == 0o027
    assert not list(tmp_path.glob(".*.tmp"))


def test_every_file_of_a_run_is_readable_by_others_under_umask_022(tmp_path, umask):
    umask(0o022)
    grid = write_tiny_grid(tmp_path, methods=("student", "kd"))
    out = tmp_path / "out"
    assert main(["run", "--grid", str(grid), "--out", str(out), "--no-report"]) == 0
    written = [p for p in out.rglob("*") if p.is_file()]
    names = {p.name for p in written}
    assert {"results.csv", "manifest.json", "config.json", "result.json", "metrics.jsonl",
            "checkpoint.pt", "log.txt"} <= names
    assert any(p.suffix == ".pt" and p.parent.name == "teachers" for p in written)
    assert {str(p.relative_to(out)): oct(_mode(p)) for p in written
            if _mode(p) != 0o644} == {}


# -- a file that may not be read is reported, not moved aside --------------------------------

def test_read_json_reports_a_file_it_may_not_read(tmp_path, monkeypatch):
    path = tmp_path / "result.json"
    path.write_text('{"status": "ok"}')
    os.chmod(path, 0o600)
    real = Path.read_text

    def read_text(self, *args, **kwargs):
        if self == path:
            raise _denied(path)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", read_text)
    with pytest.raises(UnreadableFileError) as exc:
        atomic.read_json(path)
    message = str(exc.value)
    assert message.startswith(f"cannot read {path}: permission denied (-rw------- owned by ")
    assert "\n" not in message
    assert path.exists() and not list(tmp_path.glob("*.damaged-*"))  # left where it is
    # missing and damaged files are still None, as before
    assert atomic.read_json(tmp_path / "missing.json") is None
    (tmp_path / "bad.json").write_text("{bad")
    assert atomic.read_json(tmp_path / "bad.json") is None


def _deny_torch_load(monkeypatch, *paths: Path) -> None:
    """torch.load of ``paths`` fails as it would for a file of another user's."""
    real = torch.load

    def load(f, *args, **kwargs):
        if isinstance(f, str | os.PathLike) and Path(f) in paths:
            raise _denied(Path(f))
        return real(f, *args, **kwargs)

    monkeypatch.setattr(torch, "load", load)


def test_a_checkpoint_that_may_not_be_read_fails_the_cell_and_stays(tmp_path, monkeypatch):
    data = load_dataset(DATA)
    recipe = Recipe(epochs=1, batch_size=32, lr=0.05)
    ckpt = tmp_path / "checkpoint.pt"
    train(data, Spec("resnet8", {"width": 0.25}), build_method("student"), recipe, 0,
          make_accelerator("cpu"), checkpoint=ckpt)
    before = ckpt.read_bytes()
    _deny_torch_load(monkeypatch, ckpt)
    with pytest.raises(UnreadableFileError, match=f"^cannot read {ckpt}: permission denied"):
        train(data, Spec("resnet8", {"width": 0.25}), build_method("student"), recipe, 0,
              make_accelerator("cpu"), checkpoint=ckpt)
    assert ckpt.read_bytes() == before  # not retrained over, not moved
    assert not list(tmp_path.glob("*.damaged-*"))
    log = tmp_path / "log.txt"
    assert not log.exists() or "damaged" not in log.read_text()


def test_load_checkpoint_does_not_fall_back_over_a_file_it_may_not_read(tmp_path, monkeypatch):
    path = tmp_path / "state.pt"
    save_checkpoint(path, {"model": 1})
    save_checkpoint(path, {"model": 2})  # the first is now the previous copy
    _deny_torch_load(monkeypatch, path)
    lines: list[str] = []
    with pytest.raises(UnreadableFileError, match=f"^cannot read {path}: permission denied"):
        load_checkpoint(path, ("model",), lines.append)
    assert lines == [] and path.exists() and checkpoints.previous_path(path).exists()


def test_a_teacher_cache_that_may_not_be_read_is_reported_not_replaced(tmp_path, monkeypatch):
    (cell,) = expand(load_grid(str(write_tiny_grid(tmp_path, methods=("kd",)))))
    data = load_dataset(cell.dataset)
    path = teachers.teacher_path(tmp_path / "cache", cell)
    model = build_model(cell.teacher, data.num_classes, data.in_channels)
    atomic.torch_save(path, {"model": model.state_dict(), "metrics": {"top1": 1.0}})
    before = path.read_bytes()
    _deny_torch_load(monkeypatch, path)
    with pytest.raises(UnreadableFileError, match=f"^cannot read {path}: permission denied"):
        teachers._load_cached(cell, data, make_accelerator("cpu"), path)
    assert path.read_bytes() == before and not list(path.parent.glob("*.damaged-*"))


def test_a_log_that_may_not_be_written_is_named_once_and_the_run_goes_on(tmp_path, monkeypatch,
                                                                         capsys):
    log_file = tmp_path / "log.txt"

    def denied_open(file, *args, **kwargs):
        raise _denied(Path(file))

    monkeypatch.setattr(atomic, "open", denied_open, raising=False)  # its log lines' file
    log = log_beside(tmp_path / "checkpoint.pt")
    log("first line")
    log("second line")
    err = capsys.readouterr().err
    assert "kt-bench: first line" in err and "kt-bench: second line" in err
    assert err.count(f"warning: cannot append to {log_file}: Permission denied") == 1
    assert "Traceback" not in err


def test_a_lock_file_of_another_user_still_locks(tmp_path, monkeypatch):
    """Another user's lock file opens read-only (O_RDWR is refused), which locks as well."""
    path = tmp_path / ".results.lock"
    path.write_text("alice-host 1 0\n")
    real = os.open

    def open_(file, flags, *args, **kwargs):
        if Path(file) == path and flags & os.O_RDWR:
            raise _denied(path)
        return real(file, flags, *args, **kwargs)

    monkeypatch.setattr(locks.os, "open", open_)
    lock = locks.FileLock(path)
    assert lock.acquire(blocking=False)
    assert locks.holder(path) == "alice-host 1 0"  # held (by us), its text untouched
    other = locks.FileLock(path)
    assert not other.acquire(blocking=False)
    lock.release()
    assert locks.holder(path) is None


def test_a_lock_file_created_takes_the_umask(tmp_path, umask):
    umask(0o002)
    with locks.FileLock(tmp_path / "x.lock"):
        pass
    assert _mode(tmp_path / "x.lock") == 0o664


# -- a write that fails is one line naming the file ------------------------------------------

@pytest.fixture
def full_disk(monkeypatch, tmp_path):
    """Atomic writes go to /dev/full, which fails every write with ENOSPC."""
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full")

    def create(path: Path) -> tuple[int, str]:
        tmp = path.with_name(f".{path.name}.fake.tmp")
        tmp.write_bytes(b"")
        return os.open("/dev/full", os.O_WRONLY), str(tmp)

    monkeypatch.setattr(atomic, "_create_temporary", create)


@pytest.mark.parametrize("write", [
    lambda p: atomic.write_json(p, {"rows": list(range(5000))}),
    lambda p: atomic.write_text(p, "x\n"),
    lambda p: atomic.torch_save(p, {"w": torch.zeros(100_000)}),
])
def test_a_write_to_a_full_disk_is_one_line_and_keeps_the_old_file(tmp_path, full_disk, write):
    path = tmp_path / "results.csv"
    path.write_text("old\n")
    with pytest.raises(UnwritableFileError) as exc:
        write(path)
    assert str(exc.value) == f"cannot write {path}: No space left on device"
    assert path.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["results.csv"]  # no temporary left


def test_torch_saves_own_error_for_a_failed_write_names_the_file(tmp_path, full_disk,
                                                                 monkeypatch):
    """torch.save may report a failed write as ``RuntimeError: [enforce fail at
    inline_container.cc:672] . unexpected pos``; the OSError behind it gives the reason."""
    def save(obj, fh):
        try:
            fh.write(b"x" * 100_000)
        except OSError:
            pass
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")

    monkeypatch.setattr(torch, "save", save)
    path = tmp_path / "checkpoint.pt"
    with pytest.raises(UnwritableFileError, match=f"^cannot write {path}: No space left on "
                                                  "device$"):
        atomic.torch_save(path, {})


def test_a_failed_torch_save_without_an_os_error_still_names_the_file(tmp_path, monkeypatch):
    def save(obj, fh):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")

    monkeypatch.setattr(torch, "save", save)
    path = tmp_path / "checkpoint.pt"
    with pytest.raises(UnwritableFileError) as exc:
        atomic.torch_save(path, {})
    assert str(exc.value) == (f"cannot write {path}: the write failed, perhaps for want of space "
                              "(RuntimeError: [enforce fail at inline_container.cc:672] . "
                              "unexpected pos 64 vs 0)")
    assert not path.exists() and not list(tmp_path.iterdir())


def test_an_io_error_and_a_folder_that_cannot_be_made_are_one_line(tmp_path, monkeypatch):
    def fsync(fd):
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(atomic.os, "fsync", fsync)
    with pytest.raises(UnwritableFileError, match="^cannot write .*a.json: Input/output error$"):
        atomic.write_json(tmp_path / "a.json", {})
    monkeypatch.undo()
    (tmp_path / "file").write_text("")
    with pytest.raises(UnwritableFileError, match="^cannot write .*: Not a directory$"):
        atomic.write_json(tmp_path / "file" / "sub" / "b.json", {})


# -- a teacher checkpoint is known by its content --------------------------------------------

def _teacher_file(path: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(build_model(TEACHER, 10).state_dict(), path)
    return path


def _ids(grid, checkpoint: str | None = None, teachers_dir: str | None = None) -> list[str]:
    return [c.cell_id for c in expand(grid, teacher_checkpoint=checkpoint,
                                      teachers_dir=teachers_dir)]


def test_the_same_teacher_file_by_any_path_gives_the_same_cells(tmp_path, monkeypatch):
    grid = load_grid(str(write_tiny_grid(tmp_path)))
    path = _teacher_file(tmp_path / "t" / "teacher.pt", 0)
    copy = tmp_path / "elsewhere" / "copy.pt"
    copy.parent.mkdir()
    shutil.copy(path, copy)
    monkeypatch.chdir(tmp_path)
    ids = _ids(grid, str(path))
    assert _ids(grid, "t/teacher.pt") == ids and _ids(grid, "./t/../t/teacher.pt") == ids
    assert _ids(grid, str(copy)) == ids
    assert _ids(grid) != ids  # a trained teacher is another

    cell = expand(grid, teacher_checkpoint="t/teacher.pt")[0]
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    config = cell.config()
    assert config["teacher"]["checkpoint_sha256"] == sha
    assert config["teacher"]["checkpoint"] == str(path)  # absolute, for information
    assert "checkpoint" not in cell.teacher_config()  # the cache key: the content alone
    identity = cell.identity()
    assert identity["teacher_checkpoint"] == str(path) and identity["teacher_sha256"] == sha
    assert str(path) not in identity["config"]


def test_a_changed_teacher_file_gives_new_cells(tmp_path):
    grid = load_grid(str(write_tiny_grid(tmp_path)))
    path = _teacher_file(tmp_path / "teacher.pt", 0)
    first = path.read_bytes()
    ids = _ids(grid, str(path))
    _teacher_file(path, 1)  # the same size, other weights
    assert path.stat().st_size == len(first)
    new = _ids(grid, str(path))
    assert set(new).isdisjoint(ids)
    replacement = tmp_path / "replacement.pt"
    replacement.write_bytes(first)
    os.replace(replacement, path)  # back to the first content, by rename
    assert _ids(grid, str(path)) == ids


def test_published_teachers_are_known_by_content_too(tmp_path):
    grid = load_grid(str(write_tiny_grid(tmp_path)))
    _teacher_file(tmp_path / "a" / "resnet8_vanilla" / "ckpt_epoch_240.pth", 0)
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    assert _ids(grid, teachers_dir=str(tmp_path / "a")) == _ids(grid, teachers_dir=str(
        tmp_path / "b"))
    _teacher_file(tmp_path / "b" / "resnet8_vanilla" / "ckpt_epoch_240.pth", 1)
    assert _ids(grid, teachers_dir=str(tmp_path / "a")) != _ids(grid, teachers_dir=str(
        tmp_path / "b"))


def test_a_teacher_file_is_hashed_once_and_a_missing_one_keeps_its_path(tmp_path, monkeypatch):
    grid = load_grid(str(write_tiny_grid(tmp_path, methods=("student", "kd"), seeds=(0, 1))))
    path = _teacher_file(tmp_path / "teacher.pt", 0)
    reads = []
    real = cells.sha256_of_file
    monkeypatch.setattr(cells, "sha256_of_file", lambda file: reads.append(file) or real(file))
    assert len(expand(grid, teacher_checkpoint=str(path))) == 4
    expand(grid, teacher_checkpoint=str(path))
    assert reads == [str(path)]  # once in this process

    (missing,) = {c.teacher_config().get("checkpoint")
                  for c in expand(grid, teacher_checkpoint="no/such.pt")}
    assert missing == "no/such.pt"


def test_a_teacher_file_changed_after_planning_is_refused(tmp_path):
    from kt_bench.core.errors import KtBenchError

    grid = load_grid(str(write_tiny_grid(tmp_path)))
    path = _teacher_file(tmp_path / "teacher.pt", 0)
    cell = expand(grid, teacher_checkpoint=str(path))[0]
    _teacher_file(path, 1)
    with pytest.raises(KtBenchError, match=f"^teacher checkpoint {path} changed after its "
                                           "cells were planned"):
        teachers.load_state(build_model(TEACHER, 10), cell.teacher_checkpoint,
                            cell.teacher_sha256)


def test_a_run_finds_its_cells_by_the_teachers_content(tmp_path, monkeypatch, capsys):
    grid = write_tiny_grid(tmp_path, methods=("kd",))
    path = _teacher_file(tmp_path / "t" / "teacher.pt", 0)
    out = tmp_path / "out"
    argv = ["run", "--grid", str(grid), "--out", str(out), "--no-report",
            "--teacher-checkpoint"]
    monkeypatch.chdir(tmp_path)
    assert main([*argv, "t/teacher.pt"]) == 0
    copy = tmp_path / "copy.pt"
    shutil.copy(path, copy)
    assert main([*argv, str(copy)]) == 0
    rows = pd.read_csv(out / "results.csv")
    assert len(rows) == 1  # the copy is the same teacher: the cell was done
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    assert rows.loc[0, "teacher_sha256"] == sha and rows.loc[0, "teacher_checkpoint"] == str(path)
    _teacher_file(path, 1)
    assert main([*argv, str(path)]) == 0
    rows = pd.read_csv(out / "results.csv")
    assert len(rows) == 2 and set(rows["status"]) == {"ok"}
    configs = [json.loads(p.read_text()) for p in (out / "cells").glob("*/config.json")]
    assert {c["teacher"]["checkpoint_sha256"] for c in configs} == {
        sha, hashlib.sha256(path.read_bytes()).hexdigest()}
    assert {c["teacher"]["checkpoint"] for c in configs} == {str(path)}
    capsys.readouterr()
