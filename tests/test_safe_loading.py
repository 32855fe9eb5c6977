"""No file kt-bench reads can run code: checkpoints, teacher caches, a teacher's training
checkpoint, a user's teacher checkpoint and CIFAR's pickles are read as plain data only; what
kt-bench saves itself loads that way."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch

from kt_bench.api.method import build_method
from kt_bench.commands.main import main
from kt_bench.core.errors import KtBenchError
from kt_bench.core.options import Spec
from kt_bench.data import load_dataset
from kt_bench.models import build_model
from kt_bench.sweep import teachers
from kt_bench.sweep.cells import expand
from kt_bench.sweep.config import Recipe, load_grid
from kt_bench.training.checkpoints import load_checkpoint, load_plain, previous_path
from kt_bench.training.device import make_accelerator
from kt_bench.training.engine import train

from .conftest import set_aside, write_tiny_grid
from .fixtures import write_cifar10

DATA = Spec("synthetic", {"n_train": 96, "n_test": 48, "image_size": 8, "noise": 2.0})
STUDENT = Spec("resnet8", {"width": 0.25})
TEACHER = Spec("resnet8", {"width": 0.5})


class _Payload:
    """Pickles as a call of ``os.system`` that creates ``marker``: what an attacker's file
    would run when unpickled in full."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _crafted(path: Path, marker: Path, torch_format: bool = True) -> Path:
    """Write a file at ``path`` whose loading would create ``marker``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if torch_format:
        torch.save({"model": {"w": torch.zeros(1)}, "payload": _Payload(marker)}, path)
    else:
        with open(path, "wb") as fh:
            pickle.dump({"label_names": _Payload(marker)}, fh)
    return path


def test_the_crafted_file_would_run_its_code_if_unpickled_in_full(tmp_path):
    """The check that the tests below can fail: loading the payload unsafely runs it."""
    marker = tmp_path / "ran"
    torch.load(_crafted(tmp_path / "x.pt", marker), weights_only=False)
    assert marker.exists()
    marker.unlink()
    with open(_crafted(tmp_path / "meta", marker, torch_format=False), "rb") as fh:
        pickle.load(fh)
    assert marker.exists()


def test_a_users_teacher_checkpoint_with_code_is_refused_in_one_line(tmp_path):
    marker = tmp_path / "ran"
    path = _crafted(tmp_path / "teacher.pt", marker)
    with pytest.raises(KtBenchError) as exc:
        teachers.load_state(build_model(TEACHER, 10), str(path))
    message = str(exc.value)
    assert message.startswith(f"teacher checkpoint {path} cannot be read: it needs "
                              "posix.system to load")
    assert "never code" in message and "\n" not in message
    assert not marker.exists()


def test_a_cell_checkpoint_and_its_previous_copy_with_code_start_the_cell_afresh(tmp_path,
                                                                                 capsys):
    marker = tmp_path / "ran"
    ckpt = _crafted(tmp_path / "checkpoint.pt", marker)
    _crafted(previous_path(ckpt), marker)
    result = train(load_dataset(DATA), STUDENT, build_method("student"),
                   Recipe(epochs=1, batch_size=32, lr=0.05), 0, make_accelerator("cpu"),
                   checkpoint=ckpt)
    assert len(result.epoch_s) == 1  # trained from scratch
    assert not marker.exists()
    assert len(set_aside(ckpt)) == 1 and len(set_aside(previous_path(ckpt))) == 1
    log = (tmp_path / "log.txt").read_text()
    assert f"{ckpt} is damaged (it needs posix.system to load" in log
    assert f"{previous_path(ckpt)} is damaged (" in log and "starting from scratch" in log
    err = capsys.readouterr().err
    assert "Traceback" not in err and "posix.system" in err
    assert len(load_plain(ckpt)["history"]) == 1  # the new checkpoint, plain data


def test_load_checkpoint_refuses_code_and_names_the_file(tmp_path):
    marker = tmp_path / "ran"
    path = _crafted(tmp_path / "state.pt", marker)
    lines: list[str] = []
    assert load_checkpoint(path, ("model",), lines.append) is None
    assert not marker.exists()
    (line,) = lines
    assert line.startswith(f"{path} is damaged (it needs posix.system to load")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The cell of a tiny grid whose teacher is trained, its data and an accelerator."""
    folder = tmp_path_factory.mktemp("tiny")
    (cell,) = expand(load_grid(str(write_tiny_grid(folder, methods=("kd",)))))
    return cell, load_dataset(cell.dataset), make_accelerator("cpu")


def test_a_teacher_cache_with_code_is_set_aside_and_the_teacher_made_again(tiny, tmp_path,
                                                                           capsys):
    cell, data, accelerator = tiny
    marker = tmp_path / "ran"
    path = _crafted(teachers.teacher_path(tmp_path / "cache", cell), marker)
    assert teachers._load_cached(cell, data, accelerator, path) is None
    assert not marker.exists() and len(set_aside(path)) == 1
    err = capsys.readouterr().err
    assert f"kt-bench: {path} is damaged (it needs posix.system to load" in err
    assert "training it again" in err
    assert "posix.system" in (path.parent / "log.txt").read_text()


def test_a_teachers_training_checkpoint_with_code_is_not_resumed(tiny, tmp_path, capsys):
    cell, data, accelerator = tiny
    marker = tmp_path / "ran"
    cache = tmp_path / "cache"
    ckpt = _crafted(teachers.teacher_path(cache, cell).with_suffix(".ckpt"), marker)
    _, metrics = teachers.get_teacher(cell, data, accelerator, cache)
    assert not marker.exists()
    assert len(set_aside(ckpt)) == 1 and not ckpt.exists()  # trained afresh, then removed
    assert f"{ckpt} is damaged (it needs posix.system" in (cache / "log.txt").read_text()
    cached = load_plain(teachers.teacher_path(cache, cell))  # the new cache is plain data
    assert cached["metrics"]["top1"] == metrics["top1"]
    assert "Traceback" not in capsys.readouterr().err


def test_what_a_run_saves_loads_as_plain_data(tmp_path):
    """Cell checkpoints (with a contrastive memory bank and an initialisation stage's
    optimiser under a multistep schedule) and teacher caches load with weights_only=True."""
    data = load_dataset(DATA)
    accelerator = make_accelerator("cpu")
    teacher = build_model(TEACHER, data.num_classes, data.in_channels).to(accelerator.device)
    method = build_method("crd+ab", {"crd": {"nce_k": 8, "feat_dim": 16},
                                     "ab": {"init_epochs": 1}})
    recipe = Recipe(epochs=3, batch_size=32, lr=0.05, schedule="multistep", milestones=(2,))
    ckpt = tmp_path / "checkpoint.pt"
    train(data, STUDENT, method, recipe, 0, accelerator, teacher.eval(), checkpoint=ckpt)
    state = torch.load(ckpt, weights_only=True)
    assert state["init_optimizer"] is not None and len(state["history"]) == 4
    assert any("memory" in key for key in state["trainee"])  # CRD's memory banks
    assert torch.load(previous_path(ckpt), weights_only=True)["scheduler"]["milestones"]

    grid = write_tiny_grid(tmp_path, methods=("student", "kd"))
    out = tmp_path / "out"
    assert main(["run", "--grid", str(grid), "--out", str(out), "--no-report"]) == 0
    saved = [*(out / "cells").glob("*/checkpoint.pt"), *(out / "teachers").glob("*.pt")]
    assert len(saved) == 3
    for path in saved:
        assert isinstance(torch.load(path, weights_only=True), dict)


def test_repdistillers_published_teacher_as_torch_1_wrote_it_loads(tmp_path):
    """RepDistiller's ckpt_epoch_240.pth: the model, the epoch, the accuracy as a tensor and
    the optimiser's state, in torch's legacy (pre-zip) format."""
    model = build_model(TEACHER, 10)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    path = tmp_path / "resnet8_vanilla" / "ckpt_epoch_240.pth"
    path.parent.mkdir()
    torch.save({"epoch": 240, "model": model.state_dict(), "accuracy": torch.tensor(73.1),
                "optimizer": optimizer.state_dict()}, path,
               _use_new_zipfile_serialization=False)
    fresh = build_model(TEACHER, 10)
    teachers.load_state(fresh, str(path))
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(),
                                                 model.state_dict().values(), strict=True))


@pytest.mark.parametrize("name", ["batches.meta", "data_batch_1"])
def test_a_cifar_file_with_code_is_refused_in_one_line(tmp_path, name):
    write_cifar10(tmp_path, per_class_train=2, per_class_test=1)
    marker = tmp_path / "ran"
    path = _crafted(tmp_path / "cifar-10-batches-py" / name, marker, torch_format=False)
    with pytest.raises(KtBenchError) as exc:
        load_dataset(Spec("cifar10", {"download": False}), str(tmp_path))
    message = str(exc.value)
    assert message.startswith(f"{path} cannot be read: it refers to posix.system; ")
    assert "\n" not in message
    assert not marker.exists()


def test_a_damaged_cifar_file_is_one_line(tmp_path):
    write_cifar10(tmp_path, per_class_train=2, per_class_test=1)
    path = tmp_path / "cifar-10-batches-py" / "test_batch"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(KtBenchError, match=f"^{path} cannot be read: "):
        load_dataset(Spec("cifar10", {"download": False}), str(tmp_path))


def test_cifar_pickled_by_python_2_with_protocol_2_loads(tmp_path):
    """The real files are protocol-2 pickles (bytes come through ``_codecs.encode``)."""
    write_cifar10(tmp_path, per_class_train=2, per_class_test=1)
    folder = tmp_path / "cifar-10-batches-py"
    originals = {}
    for path in folder.iterdir():
        with open(path, "rb") as fh:
            originals[path.name] = pickle.load(fh)
        with open(path, "wb") as fh:
            pickle.dump(originals[path.name], fh, protocol=2)
    data = load_dataset(Spec("cifar10", {"download": False, "augment": False}), str(tmp_path))
    first = originals["data_batch_1"]
    assert data.train.labels[: len(first["labels"])].tolist() == first["labels"]
    red = torch.tensor(first["data"][0][:1024]).view(32, 32)
    assert torch.equal(data.train.images[0, 0], red)


def _hub_file(torch_home: Path) -> Path:
    """Where torch's download cache under ``torch_home`` keeps resnet18's IMAGENET1K_V1."""
    return torch_home / "hub" / "checkpoints" / "resnet18-f37072fd.pth"


def test_torchvision_weights_load_from_the_download_cache_as_plain_data(tmp_path,
                                                                         monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    torch.manual_seed(0)
    published = build_model("tv_resnet18", num_classes=1000)
    _hub_file(tmp_path).parent.mkdir(parents=True)
    torch.save(published.state_dict(), _hub_file(tmp_path))
    model = build_model(Spec("tv_resnet18", {"weights": "IMAGENET1K_V1"}), num_classes=1000)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(),
                                                 published.state_dict().values(), strict=True))

    marker = tmp_path / "ran"
    _crafted(_hub_file(tmp_path), marker)
    with pytest.raises(KtBenchError) as exc:
        build_model(Spec("tv_resnet18", {"weights": "IMAGENET1K_V1"}), num_classes=1000)
    assert str(exc.value).startswith("torchvision weights ResNet18_Weights.IMAGENET1K_V1 "
                                     "(torch's download cache) cannot be read: it needs "
                                     "posix.system")
    assert not marker.exists()
