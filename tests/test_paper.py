"""The paper's datasets through torchvision's real loaders, its grids, and paper-mini."""

from __future__ import annotations

import math
import re

import pandas as pd
import pytest
import torch

from kt_bench.commands.main import main
from kt_bench.core.errors import KtBenchError
from kt_bench.core.options import Spec
from kt_bench.data import LoaderData, TensorData, load_dataset
from kt_bench.reporting.report import load_reference, summarise
from kt_bench.sweep.cells import expand
from kt_bench.sweep.config import load_grid

from .fixtures import write_cifar10, write_cifar100, write_image_folder


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    write_cifar10(root, per_class_train=20, per_class_test=10)
    write_cifar100(root, per_class_train=3, per_class_test=2)
    write_image_folder(root, classes=12, train_per_class=4, val_per_class=2)
    return root


def test_cifar10_loader_reads_the_python_pickles(data_root):
    import pickle

    data = load_dataset(Spec("cifar10", {"download": False}), str(data_root))
    assert isinstance(data, TensorData)
    assert data.train.images.shape == (200, 3, 32, 32) and data.train.images.dtype == torch.uint8
    assert data.n_test == 100 and data.num_classes == 10
    # channel-major rows: the first 1024 bytes are the red plane of the first image
    with open(data_root / "cifar-10-batches-py" / "data_batch_1", "rb") as fh:
        first = pickle.load(fh)
    red = torch.tensor(first["data"][0][:1024]).view(32, 32)
    assert torch.equal(data.train.images[0, 0], red)
    assert data.train.labels[0].item() == first["labels"][0]
    x, y = next(data.train_batches(0, 0, 16, torch.device("cpu")))
    assert x.shape == (16, 3, 32, 32) and x.dtype == torch.float32
    assert abs(x.mean().item()) < 0.5  # normalised with the training split's statistics


def test_cifar_per_class_keeps_the_first_images_of_each_class(data_root):
    data = load_dataset(Spec("cifar10", {"download": False, "per_class": 3}), str(data_root))
    assert torch.bincount(data.train.labels).tolist() == [3] * 10
    assert data.n_test == 100  # the test split stays whole


def test_cifar100_loader_uses_fine_labels(data_root):
    data = load_dataset(Spec("cifar100", {"download": False}), str(data_root))
    assert data.num_classes == 100 and data.n_train == 300
    assert int(data.train.labels.max()) == 99


def test_missing_cifar_without_download_is_one_line(tmp_path):
    with pytest.raises(KtBenchError) as exc:
        load_dataset(Spec("cifar10", {"download": False}), str(tmp_path))
    msg = str(exc.value)
    assert msg.startswith(f"CIFAR-10 is not in {tmp_path}") and "\n" not in msg


def test_imagenet_folder_loader_streams_transformed_batches(data_root):
    spec = Spec("imagenet", {"classes": 10, "per_class": 3, "image_size": 32, "resize": 36,
                             "workers": 0})
    data = load_dataset(spec, str(data_root))
    assert isinstance(data, LoaderData)
    assert data.num_classes == 10 and data.n_train == 30 and data.n_test == 20
    batches = list(data.train_batches(0, 0, 8, torch.device("cpu")))
    assert [tuple(x.shape) for x, _ in batches[:1]] == [(8, 3, 32, 32)]
    assert int(max(y.max() for _, y in batches)) <= 9
    again = list(data.train_batches(0, 0, 8, torch.device("cpu")))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(batches, again, strict=True))
    assert sum(len(y) for _, y in data.test_batches(7, torch.device("cpu"))) == 20


def test_missing_imagenet_folder_is_one_line(tmp_path):
    with pytest.raises(KtBenchError, match="ImageNet is not at .*imagenet/train; ImageNet "
                                           "cannot be downloaded"):
        load_dataset("imagenet", str(tmp_path))


@pytest.mark.slow  # 15-50 s on 2 cores: in `pytest -m slow`, not the default run
def test_paper_mini_runs_end_to_end_on_the_real_formats(data_root, tmp_path, capsys):
    out = tmp_path / "mini"
    code = main(["run", "--grid", "paper-mini", "--data-root", str(data_root), "--out", str(out),
                 "--epochs", "1"])
    assert code == 0
    rows = pd.read_csv(out / "results.csv")
    assert len(rows) == 33 and set(rows["status"]) == {"ok"}
    assert set(rows["dataset"]) == {"cifar10(per_class=300)", "cifar100(per_class=30)",
                                    "imagenet(classes=10,image_size=32,per_class=30,resize=36,"
                                    "workers=0)"}
    assert rows.groupby("dataset")["teacher_top1"].nunique().eq(1).all()
    assert "kd+nst_gauss" in capsys.readouterr().out


def test_crd_dry_run_lists_seven_pairs_times_every_method(capsys):
    assert main(["run", "--grid", "crd-cifar100", "--dry-run"]) == 0
    out = capsys.readouterr().out
    methods = ("student", "kd", "fitnet", "at", "sp", "cc", "vid", "rkd", "pkt", "ab", "ft",
               "fsp", "nst_poly", "crd", "crd\\+kd", "dkd", "reviewkd", "ofd", "dist", "kd_ls")
    assert f"{7 * len(methods)} cells" in out and re.search(r"estimate: [0-9.]+ GPU-hours", out)
    for m in methods:
        assert len(re.findall(rf"cifar100\s+\S+\s+\S+\s+{m}\s", out)) == 7, m
    pairs = set(re.findall(r"cifar100\s+(\S+)\s+(\S+)\s+(?:student|kd|fitnet|at|nst_poly)\s", out))
    # the CRD paper's transfer probes: every method of wrn_40_2 -> wrn_16_2, two datasets
    assert re.search(r"40 downstream units; estimate: [0-9.]+ GPU-hours", out)
    for unit, dataset in (("probe-stl10", "stl10"), ("probe-tiny-imagenet", "tiny_imagenet")):
        assert len(re.findall(rf"{unit}\s+linear_probe\s+{dataset}\(image_size=32\)\s+"
                              r"[0-9.e-]+\n", out)) == 20
    assert pairs == {("wrn_40_2", "wrn_16_2"), ("wrn_40_2", "wrn_40_1"),
                     ("resnet56", "resnet20"), ("resnet110", "resnet20"),
                     ("resnet110", "resnet32"), ("resnet32x4", "resnet8x4"), ("vgg13", "vgg8")}


@pytest.mark.slow  # probes every network of the paper's grids (10 s on 2 cores)
def test_paper_dry_run_lists_cifar_and_imagenet_cells_and_a_slice(capsys):
    assert main(["run", "--grid", "paper", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "28 cells" in out
    for ds in ("cifar10 ", "cifar100 ", "imagenet "):
        assert ds in out
    assert len(re.findall(r"preact_resnet1001\s+inception_bn_cifar\s+kd\+nst_poly", out)) == 2
    assert main(["run", "--grid", "paper", "--dry-run", "--only", "dataset=cifar10"]) == 0
    assert "11 cells" in capsys.readouterr().out
    assert main(["run", "--grid", "paper", "--dry-run", "--only", "colour=red"]) == 2
    assert "--only takes key=value" in capsys.readouterr().err


def test_teacher_from_a_checkpoint_is_evaluated_not_trained(tmp_path, capsys):
    from kt_bench.models import build_model

    from .conftest import write_tiny_grid

    torch.manual_seed(0)
    teacher = build_model(Spec("resnet8", {"width": 0.5}), num_classes=10)
    ckpt = tmp_path / "teacher.pt"
    torch.save({"state_dict": teacher.state_dict()}, ckpt)
    grid = write_tiny_grid(tmp_path, methods=("kd",))
    out = tmp_path / "out"
    assert main(["run", "--grid", str(grid), "--out", str(out),
                 "--teacher-checkpoint", str(ckpt)]) == 0
    assert not list((out / "teachers").glob("*.ckpt"))  # nothing was trained
    assert len(list((out / "teachers").glob("*.pt"))) == 1
    bad = tmp_path / "bad.pt"
    torch.save({"fc.weight": torch.zeros(1)}, bad)
    assert main(["run", "--grid", str(grid), "--out", str(tmp_path / "o2"),
                 "--teacher-checkpoint", str(bad)]) == 1
    row = pd.read_csv(tmp_path / "o2" / "results.csv").iloc[0]
    assert row["status"] == "failed"
    assert row["error"].startswith(f"teacher checkpoint {bad} does not fit the teacher")


def test_reference_rows_and_the_published_column():
    ref = load_reference()
    crd = ref[ref["grid"] == "crd-cifar100"]
    # every figure of RepDistiller's same-architecture table (15 rows x 7 pairs, FSP's N/A
    # included) and mdistiller's 6 DKD figures
    assert len(crd) == 14 * 7 + 6
    row = crd[(crd["student"] == "resnet8x4") & (crd["method"] == "kd")].iloc[0]
    assert row["top1"] == 73.33 and row["teacher_top1"] == 79.42
    paper = ref[ref["grid"] == "paper-cifar"]
    assert paper["top1"].isna().all()  # not readable here: left empty, never guessed
    measured = pd.DataFrame([{"dataset": "cifar100", "teacher": "resnet32x4",
                              "student": "resnet8x4", "method": "kd", "top1": 72.0,
                              "top1_best": 72.5, "top5": 90.0, "teacher_top1": 79.0,
                              "wall_s": 1.0, "status": "ok"}])
    table = summarise(measured, reference=ref)
    assert table.loc[0, "published_top1"] == 73.33
    assert table.loc[0, "published_teacher_top1"] == 79.42
    empty = measured.assign(teacher="preact_resnet1001", student="inception_bn_cifar")
    assert math.isnan(summarise(empty, reference=ref).loc[0, "published_top1"])  # shown n/a


def test_imagenet_r34_r18_has_mdistillers_recipes_per_method():
    cells = expand(load_grid("imagenet-r34-r18"))
    by_method = {}
    for c in cells:
        by_method.setdefault(c.method, []).append(c)
    assert sorted(by_method) == ["at", "crd", "dkd", "kd", "student"]
    assert len(by_method["student"]) == 2  # a baseline under each recipe
    for m in ("kd", "at", "dkd"):
        (c,) = by_method[m]
        assert (c.recipe.batch_size, c.recipe.lr, c.recipe.epochs) == (512, 0.2, 100)
    (crd,) = by_method["crd"]
    assert (crd.recipe.batch_size, crd.recipe.lr) == (256, 0.1)
    assert by_method["kd"][0].method_config["kd"] == {"weight": 0.5, "ce_weight": 0.5, "T": 1.0,
                                                      "standardize": False}
    assert by_method["dkd"][0].method_config["dkd"]["beta"] == 0.5
    assert all(c.teacher_is_pretrained for c in cells)


def test_crd_hetero_lists_six_pairs_times_every_method_with_the_students_rates(capsys):
    assert main(["run", "--grid", "crd-cifar100-hetero", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "120 cells" in out and re.search(r"estimate: [0-9.]+ GPU-hours", out)
    cells = expand(load_grid("crd-cifar100-hetero"))
    pairs = {(c.teacher.name, c.student.name) for c in cells}
    assert pairs == {("vgg13", "mobilenetv2"), ("resnet50", "mobilenetv2"), ("resnet50", "vgg8"),
                     ("resnet32x4", "shufflev1"), ("resnet32x4", "shufflev2"),
                     ("wrn_40_2", "shufflev1")}
    for c in cells:  # RepDistiller: lr 0.01 for MobileNet and ShuffleNet students
        assert c.recipe.lr == (0.05 if c.student.name == "vgg8" else 0.01)
        assert c.recipe.epochs == 240 and c.recipe.milestones == (150, 180, 210)
    four = [c for c in cells if c.teacher.name in ("vgg13", "resnet50") and c.method == "at"]
    assert all(len(c.method_config["at"]["layers"]) == 4 for c in four)


def test_paper_imagenet_dry_run_lists_the_voc_detection_of_each_student(capsys):
    assert main(["run", "--grid", "paper-imagenet", "--dry-run"]) == 0
    out = capsys.readouterr().out
    lines = re.findall(r"(\S+)\s+0\s+detection-voc2007\s+detection\s+voc2007\s+([0-9.]+)\n",
                       out)
    assert [m for m, _ in lines] == ["student", "kd", "fitnet", "at", "nst_poly", "kd+nst_poly"]
    assert all(float(h) > 0 for _, h in lines)
    assert re.search(r"6 downstream units; estimate: [0-9.]+ GPU-hours", out)
