"""What a run is planned with is checked before any cell trains, each problem one line (exit
2) naming what is wrong and what is accepted: method options for no method of the grid, grid
files that are not text, image sizes no dataset or network can take, batches larger than the
training set, empty --seeds and --methods, and unusable teacher checkpoints and caches."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from kt_bench.commands import common
from kt_bench.core.options import Spec
from kt_bench.models import build_model
from kt_bench.sweep.cells import expand
from kt_bench.sweep.config import load_grid

from .conftest import write_tiny_grid
from .test_bad_input import appended, edited, one_error, run_cli

STUDENT_LINE = 'student = { name = "resnet8", width = 0.25 }\n'

# B. Method options for a method the grid does not run


def test_method_options_for_no_method_of_the_grid_is_refused(tmp_path, capsys):
    path = appended(write_tiny_grid(tmp_path), "[method_options.kdd]\nT = 2.0\n")
    err = one_error(capsys, "run", "--grid", path, "--dry-run")
    assert (f"{path}: method_options.kdd is for a method the grid does not run and no "
            "registered one (did you mean 'kd'?); the grid's methods: student, kd") in err


def test_a_pairs_method_options_for_no_method_of_the_grid_is_refused(tmp_path, capsys):
    path = edited(write_tiny_grid(tmp_path), STUDENT_LINE,
                  STUDENT_LINE + "method_options = { kdd = { T = 2.0 } }\n")
    err = one_error(capsys, "run", "--grid", path)
    assert f"{path}: pairs[0].method_options.kdd is for a method the grid does not run" in err
    assert "(did you mean 'kd'?); the grid's methods: student, kd" in err


def test_options_for_members_of_a_combination_are_used(tmp_path, capsys):
    path = appended(write_tiny_grid(tmp_path, methods=("student", "kd+nst_poly")), """
        [method_options.kd]
        T = 2.0

        [method_options."kd+nst_poly".kd]
        T = 3.0

        [method_options.nst_poly]
        weight = 10.0
        """)
    cells = {c.method: c for c in expand(load_grid(path))}
    assert cells["kd+nst_poly"].method_config["kd"]["T"] == 3.0
    assert cells["kd+nst_poly"].method_config["nst_poly"]["weight"] == 10.0
    code, _, err = run_cli(capsys, "run", "--grid", path, "--dry-run")
    assert code == 0, err


def test_options_left_by_methods_flag_or_kept_for_it_are_accepted(tmp_path, capsys):
    # the check is against the grid file's own methods; registered methods outside them may
    # have options kept for --methods (as the demo grid keeps ab's, ft's and fsp's)
    path = appended(write_tiny_grid(tmp_path), """
        [method_options.kd]
        T = 2.0

        [method_options.ab]
        init_epochs = 1
        """)
    code, out, err = run_cli(capsys, "run", "--grid", path, "--methods", "student",
                             "--dry-run")
    assert code == 0 and "1 cells;" in out, err
    assert load_grid("demo").method_options["ab"] == {"init_epochs": 3}


# C. Grid files that are not text


@pytest.mark.parametrize("dry_run", [True, False])
def test_a_grid_file_that_is_not_utf8_text_is_one_line(tmp_path, capsys, dry_run):
    binary = tmp_path / "grid.toml"
    binary.write_bytes(b'name = "\xff\xfe"\n')
    for path in ("/bin/ls", str(binary)):
        err = one_error(capsys, "run", "--grid", path, *(["--dry-run"] if dry_run else []))
        assert f"{path}: not a text file (UTF-8); accepted: a grid file in TOML" in err
    folder = tmp_path / "folder.toml"
    folder.mkdir()
    err = one_error(capsys, "run", "--grid", str(folder))
    assert f"{folder}: cannot be read: Is a directory" in err


# C. Image sizes


@pytest.mark.parametrize("dry_run", [True, False])
@pytest.mark.parametrize("size", [0, -3])
def test_an_image_size_below_one_is_refused(tmp_path, capsys, dry_run, size):
    path = edited(write_tiny_grid(tmp_path), "image_size = 8", f"image_size = {size}")
    out = tmp_path / "out"
    err = one_error(capsys, "run", "--grid", path, "--out", str(out),
                    *(["--dry-run"] if dry_run else []))
    assert (f"{path}: datasets[0].image_size = {size} is invalid; accepted: an integer >= 1"
            in err)
    assert not out.exists()


@pytest.mark.parametrize("dry_run", [True, False])
def test_an_image_size_whose_training_set_cannot_fit_in_memory_is_refused(tmp_path, capsys,
                                                                          dry_run):
    path = edited(write_tiny_grid(tmp_path), "image_size = 8", "image_size = 100000")
    out = tmp_path / "out"
    err = one_error(capsys, "run", "--grid", path, "--out", str(out),
                    *(["--dry-run"] if dry_run else []))
    assert f"{path}: datasets[0].image_size = 100000 is too large: its 96 training images" in err
    assert "GB of memory; accepted: an integer in [1, " in err
    assert not out.exists()


def test_an_image_size_whose_batch_cannot_fit_in_memory_is_refused(tmp_path, capsys):
    # imagenet streams from disk: one batch (here the eval batch of 512) must fit
    path = tmp_path / "big.toml"
    path.write_text('name = "big"\ndatasets = [{ name = "imagenet", image_size = 100000 }]\n'
                    'methods = ["student"]\n[[pairs]]\nteacher = "tv_resnet34"\n'
                    'student = "tv_resnet18"\n')
    err = one_error(capsys, "run", "--grid", str(path), "--dry-run")
    assert f"{path}: datasets[0].image_size = 100000 is too large: its 512 images of a batch" in err


def test_the_dry_run_names_image_size_when_a_network_cannot_take_it(tmp_path, capsys):
    path = edited(write_tiny_grid(tmp_path), 'teacher = { name = "resnet8", width = 0.5 }',
                  'teacher = "vgg8"')
    path = edited(Path(path), "image_size = 8", "image_size = 4")
    err = one_error(capsys, "run", "--grid", path, "--dry-run")
    assert ("image_size = 4 does not suit model vgg8, which runs on 32x32 images but not on "
            "4x4 (RuntimeError: ") in err


# C. Batches larger than the training set


@pytest.mark.parametrize("dry_run", [True, False])
@pytest.mark.parametrize("table,key", [
    ("[recipe]", "recipe.batch_size"),
    ("[teacher_recipe]", "teacher_recipe.batch_size"),
])
def test_a_batch_larger_than_the_training_set_is_refused(tmp_path, capsys, dry_run, table, key):
    path = write_tiny_grid(tmp_path)
    if table == "[recipe]":
        path = edited(path, "batch_size = 32", "batch_size = 1000000000")
    else:
        path = edited(path, "[teacher_recipe]\n", "[teacher_recipe]\nbatch_size = 97\n")
    out = tmp_path / "out"
    err = one_error(capsys, "run", "--grid", path, "--out", str(out),
                    *(["--dry-run"] if dry_run else []))
    assert f"{path}: {key} = " in err
    assert ("is more than the 96 training images of synthetic(image_size=8,n_test=48,"
            "n_train=96,noise=2.0); accepted: an integer in [2, 96]") in err
    assert not out.exists()


def test_a_pairs_batch_larger_than_the_training_set_is_refused(tmp_path, capsys):
    path = edited(write_tiny_grid(tmp_path), STUDENT_LINE,
                  STUDENT_LINE + "recipe = { batch_size = 200 }\n")
    err = one_error(capsys, "run", "--grid", path, "--dry-run")
    assert f"{path}: pairs[0].recipe.batch_size = 200 is more than the 96 training" in err
    path = edited(Path(path), "batch_size = 200", "batch_size = 96")
    assert run_cli(capsys, "run", "--grid", path, "--dry-run")[0] == 0


def test_a_dataset_of_fewer_than_two_training_images_is_refused(tmp_path, capsys):
    path = edited(write_tiny_grid(tmp_path), "n_train = 96", "n_train = 1")
    err = one_error(capsys, "run", "--grid", path, "--dry-run")
    assert (f"{path}: datasets[0]: synthetic(image_size=8,n_test=48,n_train=1,noise=2.0) has "
            "1 training images; accepted: a dataset of at least 2") in err


# C. Empty --seeds and --methods


@pytest.mark.parametrize("flag,value,message", [
    ("--seeds", "", "--seeds needs at least one value"),
    ("--seeds", " , ", "--seeds needs at least one value"),
    ("--methods", "", "--methods needs at least one method name"),
    ("--methods", ",", "--methods needs at least one method name"),
])
def test_an_empty_seeds_or_methods_flag_is_refused(tmp_path, capsys, flag, value, message):
    grid = str(write_tiny_grid(tmp_path))
    for dry_run in ([], ["--dry-run"]):
        err = one_error(capsys, "run", "--grid", grid, flag, value, *dry_run)
        assert err == f"kt-bench: error: {message}\n"


# C. Teacher checkpoints and the teacher cache


def _teacher_file(path: Path, width: float) -> str:
    torch.manual_seed(0)
    torch.save({"state_dict": build_model(Spec("resnet8", {"width": width}), 10).state_dict()},
               path)
    return str(path)


@pytest.mark.parametrize("kind,message", [
    ("missing", "does not exist"),
    ("text", "cannot be read: "),
    ("folder", "cannot be read: Is a directory"),
    ("another architecture", "does not fit the teacher architecture: size mismatch"),
])
def test_the_dry_run_loads_the_teacher_checkpoint(tmp_path, capsys, kind, message):
    ckpt = tmp_path / "teacher.pt"
    if kind == "text":
        ckpt.write_text("not a checkpoint\n")
    elif kind == "folder":
        ckpt.mkdir()
    elif kind == "another architecture":
        _teacher_file(ckpt, 1.0)
    err = one_error(capsys, "run", "--grid", str(write_tiny_grid(tmp_path)), "--dry-run",
                    "--teacher-checkpoint", str(ckpt))
    assert f"teacher checkpoint {ckpt} {message}" in err
    assert "(teacher resnet8(width=0.5) for synthetic(" in err


def test_the_dry_run_accepts_a_teacher_checkpoint_that_fits(tmp_path, capsys):
    ckpt = _teacher_file(tmp_path / "teacher.pt", 0.5)
    code, out, err = run_cli(capsys, "run", "--grid", str(write_tiny_grid(tmp_path)),
                             "--dry-run", "--teacher-checkpoint", ckpt)
    assert code == 0 and "2 cells;" in out, err


@pytest.mark.parametrize("dry_run", [True, False])
def test_a_teacher_cache_that_is_a_file_is_refused(tmp_path, capsys, dry_run):
    cache = tmp_path / "cache"
    cache.write_text("a file")
    out = tmp_path / "out"
    err = one_error(capsys, "run", "--grid", str(write_tiny_grid(tmp_path)), "--out", str(out),
                    "--teacher-cache", str(cache), *(["--dry-run"] if dry_run else []))
    assert f"--teacher-cache folder {cache} cannot be created or written: " in err
    assert not (out / "cells").exists()


def test_a_teacher_cache_without_write_permission_is_refused(tmp_path, capsys, monkeypatch):
    cache = tmp_path / "cache"
    cache.mkdir()
    grid = str(write_tiny_grid(tmp_path))
    out = tmp_path / "out"
    mkstemp = common.tempfile.mkstemp

    def refuse_in_cache(*args, dir=None, **kwargs):
        if Path(dir) == cache:
            raise PermissionError(13, "Permission denied")
        return mkstemp(*args, dir=dir, **kwargs)

    monkeypatch.setattr(common.tempfile, "mkstemp", refuse_in_cache)
    err = one_error(capsys, "run", "--grid", grid, "--out", str(out), "--teacher-cache",
                    str(cache))
    assert f"--teacher-cache folder {cache} cannot be created or written: Permission denied" \
        in err
    assert not (out / "cells").exists()

    access = os.access
    monkeypatch.setattr(common.os, "access",
                        lambda path, mode: False if Path(path) == cache else access(path, mode))
    err = one_error(capsys, "run", "--grid", grid, "--out", str(out), "--teacher-cache",
                    str(cache), "--dry-run")
    assert f"--teacher-cache folder {cache} cannot be created or written: {cache} is not " \
           "writable" in err
