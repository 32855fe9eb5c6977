"""Your own networks on your own data: a timm CNN and a timm ViT, teacher and student either
way round, on an image folder and on a Hugging Face dataset saved to disk, under the CRD
table's methods and OFA. Every row is ``ok``, or ``n/a`` with its reason."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from tests.conftest import run_cli, sorted_rows
from tests.test_user_datasets import _hf_dict, write_folder

pytest.importorskip("timm")

METHODS = ["student", "kd", "fitnet", "at", "nst_poly", "sp", "vid", "crd", "dkd", "reviewkd",
           "ofa"]
CNN = '{ name = "timm:resnet18" }'
#: ViT-tiny's width at four blocks (one a stage), 4-pixel patches: 4x4 tokens at 16 pixels.
VIT = '{ name = "timm:vit_tiny_patch16_224", patch_size = 4, depth = 4 }'


def run_grid(tmp_path: Path, capsys, dataset: str, teacher: str, student: str):
    """Run the methods for one epoch on ``dataset``; the rows."""
    grid = tmp_path / "byo.toml"
    grid.write_text(textwrap.dedent(f"""
        name = "byo"
        datasets = [{dataset}]
        methods = {METHODS!r}
        [[pairs]]
        teacher = {teacher}
        student = {student}
        [recipe]
        epochs = 1
        batch_size = 16
        [teacher_recipe]
        epochs = 1
        [method_options]
        crd = {{ nce_k = 16 }}
    """).replace("'", '"'))
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "run", "--grid", str(grid), "--out", str(out), "--no-report",
                           "--device", "cpu", "--data-root", str(tmp_path / "data"))
    rows = sorted_rows(out)
    assert sorted(rows["method"]) == sorted(METHODS), err
    bad = rows[~rows["status"].isin(["ok", "n/a"])]
    assert bad.empty, bad[["method", "status", "error"]].to_string()
    assert rows.loc[rows["status"] == "n/a", "error"].notna().all()  # each says why
    assert code == 0, err
    return rows


@pytest.fixture
def folder(tmp_path: Path) -> str:
    """A 3-class image folder of 20 PNGs a class (one folder, split by a seeded fraction)."""
    root = write_folder(tmp_path / "pics", 20)
    return f'{{ name = "imagefolder", root = "{root}", image_size = 16 }}'


def test_cnn_teacher_vit_student_on_an_image_folder(tmp_path, capsys, folder):
    rows = run_grid(tmp_path, capsys, folder, CNN, VIT)
    # every method of the list applies across the two families
    assert set(rows["status"]) == {"ok"}


@pytest.mark.slow
def test_vit_teacher_cnn_student_on_an_image_folder(tmp_path, capsys, folder):
    rows = run_grid(tmp_path, capsys, folder, VIT, CNN)
    assert set(rows["status"]) == {"ok"}


@pytest.mark.slow
def test_cnn_teacher_vit_student_on_a_hugging_face_dataset(tmp_path, capsys):
    pytest.importorskip("datasets")
    _hf_dict().save_to_disk(str(tmp_path / "hf"))
    dataset = f'{{ name = "hf", path = "{tmp_path / "hf"}", image_size = 16 }}'
    rows = run_grid(tmp_path, capsys, dataset, CNN, VIT)
    assert set(rows["status"]) == {"ok"}


@pytest.mark.slow
def test_hetero_cifar100_dry_run_lists_its_cells_and_gpu_hours(tmp_path, capsys):
    code, out, err = run_cli(capsys, "run", "--grid", "hetero-cifar100", "--dry-run",
                             "--out", str(tmp_path / "out"))
    assert code == 0, err
    assert "210 cells" in out and "timm:swin_tiny_patch4_window7_224(pretrained=True)" in out
    assert "estimate: " in out and "GPU-hours" in out


def test_hetero_digits_dry_run_builds_every_cell(tmp_path, capsys):
    code, out, err = run_cli(capsys, "run", "--grid", "hetero-digits", "--dry-run",
                             "--out", str(tmp_path / "out"))
    assert code == 0, err
    assert "42 cells" in out


def test_imagenet_style_cache_builds_transformers_at_the_trained_size(tmp_path, capsys):
    # the cache holds the larger resize square the crops are cut from: the ViT must still be
    # built for image_size (a ViT built for the stored side refuses every batch)
    root = write_folder(tmp_path / "pics", 6)
    grid = tmp_path / "in.toml"
    CACHED = 'augment = "imagenet", cache = "memory"'  # noqa: N806
    grid.write_text(textwrap.dedent(f"""
        name = "in"
        datasets = [{{ name = "imagefolder", root = "{root}", image_size = 16, {CACHED} }}]
        methods = ["student"]
        [[pairs]]
        teacher = "resnet8"
        student = {VIT}
        [recipe]
        epochs = 1
        batch_size = 8
        [teacher_recipe]
        epochs = 1
    """))
    code, _, err = run_cli(capsys, "run", "--grid", str(grid), "--out", str(tmp_path / "out"),
                           "--no-report", "--device", "cpu", "--data-root", str(tmp_path / "d"))
    assert code == 0, err
    assert sorted_rows(tmp_path / "out")["status"].tolist() == ["ok"]
