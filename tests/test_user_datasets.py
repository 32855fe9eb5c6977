"""Your own data: the ``imagefolder`` and ``hf`` datasets (small real PNG files and a saved
DatasetDict), their memory-mapped cache against streaming, the seeded split, the errors for bad
input, the batched random resized crop, and one grid run end to end."""

from __future__ import annotations

import math
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kt_bench.core.errors import KtBenchError
from kt_bench.core.options import Spec
from kt_bench.data import dataset_info, load_dataset
from kt_bench.data.augment import crop_resize, random_resized_crop, resized_crop_boxes
from kt_bench.data.bundle import LoaderData, TensorData
from kt_bench.data.image_cache import stratified_split

CLASSES = ("cat", "dog", "fox")


def _image(rng: np.random.Generator, label: int, k: int):
    """A small PIL image of class ``label``: a class colour plus noise; every third one is
    grayscale, one in seven RGBA, and the sizes vary (not all square)."""
    from PIL import Image

    h, w = (20, 20) if k % 2 == 0 else (18, 24)
    base = np.zeros((h, w, 3), dtype=np.float64)
    base[..., label] = 180
    pixels = np.clip(base + rng.normal(0, 40, (h, w, 3)), 0, 255).astype(np.uint8)
    img = Image.fromarray(pixels, "RGB")
    if k % 3 == 0:
        return img.convert("L")
    if k % 7 == 0:
        return img.convert("RGBA")
    return img


def write_folder(folder: Path, per_class: int, seed: int = 0,
                 classes: tuple[str, ...] = CLASSES) -> Path:
    """``folder/<class>/<k>.png`` images, ``per_class`` of each class."""
    rng = np.random.default_rng(seed)
    for label, name in enumerate(classes):
        (folder / name).mkdir(parents=True, exist_ok=True)
        for k in range(per_class):
            _image(rng, label, k).save(folder / name / f"{k:02d}.png")
    return folder


@pytest.fixture
def split_tree(tmp_path: Path) -> Path:
    """An ImageFolder tree split into train/ (8 a class) and val/ (3 a class)."""
    write_folder(tmp_path / "pics" / "train", 8, seed=1)
    write_folder(tmp_path / "pics" / "val", 3, seed=2)
    return tmp_path / "pics"


def load(spec: dict, data_root: Path):
    """The dataset ``spec`` loaded with its cache under ``data_root``."""
    return load_dataset(Spec(spec["name"], {k: v for k, v in spec.items() if k != "name"}),
                        str(data_root))


def test_imagefolder_reads_the_split_tree_with_torchvisions_classes(split_tree, tmp_path):
    from PIL import Image

    spec = {"name": "imagefolder", "root": str(split_tree), "image_size": 16,
            "cache": "memory"}
    data = load(spec, tmp_path / "data")
    assert isinstance(data, TensorData)
    assert data.classes == sorted(CLASSES) and data.num_classes == 3
    assert data.train.images.shape == (24, 3, 16, 16) and data.train.images.dtype == torch.uint8
    assert data.test.images.shape == (9, 3, 16, 16)
    assert data.train.labels.tolist() == [0] * 8 + [1] * 8 + [2] * 8  # folder order
    assert data.test.labels.tolist() == [0] * 3 + [1] * 3 + [2] * 3
    assert data.split_file is None  # nothing was split
    # a grayscale file becomes three equal channels; a colour one is resized as PIL does
    assert torch.equal(data.train.images[0, 0], data.train.images[0, 2])
    rgb = Image.open(split_tree / "train" / "cat" / "01.png").convert("RGB").resize((16, 16),
                                                                                     Image.BILINEAR)
    assert torch.equal(data.train.images[1], torch.from_numpy(np.array(rgb)).permute(2, 0, 1))
    info = dataset_info(Spec("imagefolder", {k: v for k, v in spec.items() if k != "name"}))
    assert (info.num_classes, info.in_channels, info.image_size, info.n_train) == (3, 3, 16, 24)


@pytest.mark.parametrize("augment", ["cifar", "imagenet"])
def test_cached_and_streamed_forms_give_the_same_images(split_tree, tmp_path, augment):
    spec = {"name": "imagefolder", "root": str(split_tree), "image_size": 12,
            "augment": augment, "workers": 0}
    cached = load({**spec, "cache": "memory"}, tmp_path / "data")
    streamed = load({**spec, "cache": "stream"}, tmp_path / "data")
    assert isinstance(streamed, LoaderData)
    assert len(list((tmp_path / "data" / "cache").glob("*.npy"))) == 2  # the cached form's
    cpu = torch.device("cpu")
    a = torch.cat([x for x, _ in cached.test_batches(4, cpu)])
    b = torch.cat([x for x, _ in streamed.test_batches(4, cpu)])
    assert a.shape == b.shape == (9, 3, 12, 12)
    assert torch.allclose(a, b, atol=1e-5)
    assert torch.equal(cached.train_labels(), streamed.train_labels())
    side = 14 if augment == "imagenet" else 12  # resize defaults to image_size * 8 / 7
    assert cached.train.images.shape[-1] == side
    # networks are built for (and probed with) image_size, whatever side is stored
    assert cached.probe(2).shape == streamed.probe(2).shape == (2, 3, 12, 12)
    assert torch.allclose(cached.probe(2), streamed.probe(2), atol=1e-5)
    for bundle in (cached, streamed):  # training batches: augmented to image_size, repeatable
        first = [x for x, _ in bundle.train_batches(0, 7, 8, cpu)]
        again = [x for x, _ in bundle.train_batches(0, 7, 8, cpu)]
        assert [x.shape for x in first] == [(8, 3, 12, 12)] * 3
        assert all(torch.equal(x, y) for x, y in zip(first, again, strict=True))


def test_the_cache_is_reused_until_a_file_changes(split_tree, tmp_path, monkeypatch):
    from kt_bench.data.imagefolder import FileSource

    spec = {"name": "imagefolder", "root": str(split_tree), "image_size": 8, "cache": "auto"}
    first = load(spec, tmp_path / "data")
    assert isinstance(first, TensorData)  # auto: a few KB fit the default budget
    files = sorted((tmp_path / "data" / "cache").glob("imagefolder-*.npy"))
    assert [f.name.split(".", 1)[1] for f in files] == ["test.npy", "train.npy"]
    stamps = [f.stat().st_mtime_ns for f in files]
    decoded = []
    original = FileSource.load
    monkeypatch.setattr(FileSource, "load", lambda self, i: decoded.append(i) or original(self, i))
    again = load(spec, tmp_path / "data")
    assert decoded == [] and [f.stat().st_mtime_ns for f in files] == stamps
    assert torch.equal(first.train.images, again.train.images)
    # a new image is a new cache (the old one stays), decoded once
    write_folder(split_tree / "train", 9, seed=1)
    third = load(spec, tmp_path / "data")
    assert third.n_train == 27 and len(decoded) == 27 + 9
    assert len(list((tmp_path / "data" / "cache").glob("imagefolder-*.npy"))) == 4
    # auto with a budget too small for the decoded images streams them
    small = load({**spec, "cache_limit_gb": 1e-6, "image_size": 12}, tmp_path / "data")
    assert isinstance(small, LoaderData)


def test_one_folder_is_split_per_class_by_a_seeded_fraction(tmp_path):
    import json

    root = write_folder(tmp_path / "flat", 10)
    spec = {"name": "imagefolder", "root": str(root), "image_size": 8, "cache": "stream",
            "workers": 0}
    data = load(spec, tmp_path / "data")
    # 0.2 of 10 per class held out: 2 of each class
    assert data.n_train == 24 and data.n_test == 6
    assert torch.bincount(torch.tensor(data.test.targets)).tolist() == [2, 2, 2]
    record = json.loads(data.split_file.read_text())
    assert record["split_seed"] == 0 and record["val_fraction"] == 0.2
    every = sorted(str(p.relative_to(root)) for p in root.glob("*/*.png"))
    assert sorted(record["train"] + record["val"]) == every
    assert not set(record["train"]) & set(record["val"])
    assert record["val"] == [str(Path(p).relative_to(root)) for p in data.test.source.paths]
    again = load(spec, tmp_path / "data")
    assert again.test.source.paths == data.test.source.paths  # deterministic
    other = load({**spec, "split_seed": 1}, tmp_path / "data")
    assert other.test.source.paths != data.test.source.paths
    assert other.split_file != data.split_file
    info = dataset_info(Spec("imagefolder", {"root": str(root), "val_fraction": 0.5}))
    assert info.n_train == 15


def test_stratified_split_holds_out_the_fraction_of_each_class():
    labels = [0] * 10 + [1] * 5 + [2] * 1
    train, held = stratified_split(labels, 0.3, seed=4)
    assert sorted(train + held) == list(range(16)) and not set(train) & set(held)
    counts = np.bincount([labels[i] for i in held], minlength=3).tolist()
    assert counts == [3, 2, 0]  # round(3.0), round(1.5) = 2, and a class of one keeps it
    assert stratified_split(labels, 0.3, seed=4) == (train, held)
    # a class's choice depends on the seed and that class alone
    fewer = stratified_split(labels[:10], 0.3, seed=4)
    assert fewer[1] == [i for i in held if i < 10]


def _spec_of(root: Path, **options) -> Spec:
    return Spec("imagefolder", {"root": str(root), **options})


def test_bad_image_folders_are_one_line_errors(tmp_path):
    def error(spec: Spec) -> str:
        with pytest.raises(KtBenchError) as exc:
            data = load_dataset(spec, str(tmp_path / "data"))
            cpu = torch.device("cpu")  # a streamed dataset decodes as it is read
            list(data.train_batches(0, 0, 2, cpu)) + list(data.test_batches(2, cpu))
        message = str(exc.value)
        assert "\n" not in message
        return message

    assert "is not a folder" in error(_spec_of(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    assert "holds no class folders" in error(_spec_of(tmp_path / "empty"))
    write_folder(tmp_path / "odd" / "train", 2)
    write_folder(tmp_path / "odd" / "val", 2, classes=("cat", "dog", "owl"))
    message = error(_spec_of(tmp_path / "odd"))
    assert "different classes" in message and "fox" in message and "owl" in message
    (tmp_path / "half" / "train" / "cat").mkdir(parents=True)
    assert "has train/ but no val/" in error(_spec_of(tmp_path / "half"))
    bad = write_folder(tmp_path / "bad", 3)
    (bad / "dog" / "01.png").write_bytes(b"not a png")
    for cache in ("memory", "stream"):
        message = error(_spec_of(bad, cache=cache, workers=0, val_fraction=0.5))
        assert "cannot read image" in message and str(bad / "dog" / "01.png") in message
    assert "val_fraction = 1.5" in error(_spec_of(bad, val_fraction=1.5))
    assert "augment = 'autoaugment'" in error(_spec_of(bad, augment="autoaugment"))
    assert "cache = 'disk'" in error(_spec_of(bad, cache="disk"))
    assert "option 'root' has no default" in error(Spec("imagefolder", {}))


def test_an_unreadable_image_read_by_a_worker_is_named_in_one_line(tmp_path):
    bad = write_folder(tmp_path / "bad", 2)
    (bad / "fox" / "00.png").write_bytes(b"")
    data = load_dataset(_spec_of(bad, cache="stream", workers=1, val_fraction=0.5),
                        str(tmp_path / "data"))
    with pytest.raises(KtBenchError) as exc:
        list(data.test_batches(8, torch.device("cpu")))
    assert "\n" not in str(exc.value)
    assert str(exc.value).startswith(f"cannot read image {bad / 'fox' / '00.png'}")


# ---- the batched random resized crop ------------------------------------------------------


def test_a_full_image_box_is_the_resized_image():
    x = torch.rand(2, 3, 12, 18)
    full = torch.tensor([[0.0, 0.0, 12.0, 18.0]] * 2)
    for size in (6, 12, 20):
        want = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
        assert torch.allclose(crop_resize(x, full, size), want, atol=1e-5)
    box = torch.tensor([[2.0, 3.0, 8.0, 8.0]] * 2)  # a box at the output's size is a slice
    assert torch.allclose(crop_resize(x, box, 8), x[:, :, 2:10, 3:11], atol=1e-5)
    u8 = (x * 255).round().to(torch.uint8)
    assert torch.equal(crop_resize(u8, box, 8), u8[:, :, 2:10, 3:11])


def test_random_resized_crop_is_seeded_and_has_the_asked_size():
    x = (torch.rand(5, 3, 20, 16) * 255).to(torch.uint8)
    a = random_resized_crop(x, torch.Generator().manual_seed(0), 9)
    b = random_resized_crop(x, torch.Generator().manual_seed(0), 9)
    c = random_resized_crop(x, torch.Generator().manual_seed(1), 9)
    assert a.shape == (5, 3, 9, 9) and a.dtype == torch.uint8
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_resized_crop_boxes_follow_torchvisions_distribution():
    """Boxes fit the image and their area fraction and aspect ratio match torchvision's
    RandomResizedCrop.get_params over many draws."""
    from torchvision.transforms import RandomResizedCrop

    n, h, w = 4000, 30, 40
    boxes = resized_crop_boxes(n, h, w, torch.Generator().manual_seed(0))
    top, left, bh, bw = boxes.unbind(1)
    assert (top >= 0).all() and (left >= 0).all()
    assert (top + bh <= h).all() and (left + bw <= w).all() and (bh >= 1).all()
    torch.manual_seed(0)
    ref = torch.tensor([RandomResizedCrop.get_params(torch.empty(1, h, w), (0.08, 1.0),
                                                     (3 / 4, 4 / 3)) for _ in range(n)],
                       dtype=torch.float32)
    for ours, theirs in (((bh * bw) / (h * w), ref[:, 2] * ref[:, 3] / (h * w)),
                         (torch.log(bw / bh), torch.log(ref[:, 3] / ref[:, 2])),
                         (top / (h - bh + 1), ref[:, 0] / (h - ref[:, 2] + 1))):
        assert abs(ours.mean() - theirs.mean()) < 0.02
        assert abs(ours.std() - theirs.std()) < 0.02
    # where every try fits (scale up to 0.3 of a square), the area fraction is uniform in
    # the scale: mean (0.08 + 0.3) / 2, std 0.22 / sqrt(12), up to rounding to whole pixels
    _, _, bh, bw = resized_crop_boxes(n, 50, 50, torch.Generator().manual_seed(1),
                                      scale=(0.08, 0.3)).unbind(1)
    area = bh * bw / 2500
    assert math.isclose(area.mean().item(), 0.19, abs_tol=0.005)
    assert math.isclose(area.std().item(), 0.22 / math.sqrt(12), abs_tol=0.005)


# ---- Hugging Face datasets ----------------------------------------------------------------


def _hf_dict():
    import datasets

    rng = np.random.default_rng(3)
    features = datasets.Features({"image": datasets.Image(),
                                  "label": datasets.ClassLabel(names=list(CLASSES))})

    def split(per_class: int):
        rows = [(label, _image(rng, label, k)) for label in range(3) for k in range(per_class)]
        return datasets.Dataset.from_dict({"image": [img for _, img in rows],
                                           "label": [label for label, _ in rows]},
                                          features=features)

    return datasets.DatasetDict({"train": split(6), "test": split(2)})


@pytest.fixture(scope="module")
def hf_folders(tmp_path_factory):
    """The same DatasetDict saved with save_to_disk and as the Hub's parquet files."""
    base = tmp_path_factory.mktemp("hf")
    dd = _hf_dict()
    dd.save_to_disk(str(base / "disk"))
    (base / "hub" / "data").mkdir(parents=True)
    for name, ds in dd.items():
        ds.to_parquet(str(base / "hub" / "data" / f"{name}-00000-of-00001.parquet"))
    return base


def test_hf_datasets_load_from_disk_and_from_parquet_alike(hf_folders, tmp_path):
    cpu = torch.device("cpu")
    disk = load({"name": "hf", "path": str(hf_folders / "disk"), "image_size": 10,
                 "cache": "memory"}, tmp_path / "data")
    assert isinstance(disk, TensorData) and disk.classes == list(CLASSES)
    assert (disk.n_train, disk.n_test, disk.num_classes) == (18, 6, 3)
    assert disk.train.labels.tolist() == [0] * 6 + [1] * 6 + [2] * 6
    streamed = load({"name": "hf", "path": str(hf_folders / "disk"), "image_size": 10,
                     "cache": "stream", "workers": 0}, tmp_path / "data")
    hub = load({"name": "hf", "path": str(hf_folders / "hub"), "image_size": 10,
                "cache": "memory"}, tmp_path / "data")
    assert torch.equal(hub.test.images, disk.test.images)
    assert torch.equal(hub.train.labels, disk.train.labels)
    a = torch.cat([x for x, _ in disk.test_batches(4, cpu)])
    b = torch.cat([x for x, _ in streamed.test_batches(4, cpu)])
    assert torch.allclose(a, b, atol=1e-5)
    info = dataset_info(Spec("hf", {"path": str(hf_folders / "hub"), "image_size": 10}))
    assert (info.num_classes, info.in_channels, info.image_size, info.n_train) == (3, 3, 10, 18)


def test_bad_hf_datasets_are_one_line_errors(hf_folders, tmp_path, monkeypatch):
    import sys

    def error(**options) -> str:
        with pytest.raises(KtBenchError) as exc:
            load_dataset(Spec("hf", options), str(tmp_path / "data"))
        assert "\n" not in str(exc.value)
        return str(exc.value)

    disk = str(hf_folders / "disk")
    assert "is not a folder" in error(path=str(tmp_path / "nowhere"))
    message = error(path=disk, eval_split="validation")
    assert "no split 'validation'" in message and "splits: train, test" in message
    message = error(path=disk, label_column="fine_label")
    assert "no column 'fine_label'" in message and "columns: image, label" in message
    (tmp_path / "nothing").mkdir()
    assert "no parquet files" in error(path=str(tmp_path / "nothing"))
    monkeypatch.setitem(sys.modules, "datasets", None)  # the extra is not installed
    assert "pip install 'kt-bench[datasets]'" in error(path=disk)


def test_parquet_files_are_assigned_to_splits_as_the_hub_lays_them_out(tmp_path):
    from kt_bench.data.hf import layout

    names = ["train.parquet", "test-00000-of-00002.parquet", "test-00001-of-00002.parquet",
             "validation/0000.parquet", "data/extra-00000-of-00001.parquet",
             "data/holdout/a.parquet"]
    for name in names:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    kind, files = layout(tmp_path)
    assert kind == "parquet"
    assert {s: [Path(f).relative_to(tmp_path).as_posix() for f in fs]
            for s, fs in files.items()} == {
        "train": ["train.parquet"], "validation": ["validation/0000.parquet"],
        "test": ["test-00000-of-00002.parquet", "test-00001-of-00002.parquet"],
        "extra": ["data/extra-00000-of-00001.parquet"], "holdout": ["data/holdout/a.parquet"]}


def test_labels_without_a_class_label_feature(tmp_path):
    from kt_bench.data.hf import class_labels

    # integers: 0..max over both splits; strings: their sorted distinct values
    assert class_labels({"train": [0, 4, 1], "test": [5]}, None, "y", tmp_path) == (
        6, None, {"train": [0, 4, 1], "test": [5]})
    assert class_labels({"train": ["owl", "cat"], "test": ["cat"]}, None, "y", tmp_path) == (
        2, ["cat", "owl"], {"train": [1, 0], "test": [0]})
    for raw, names in (({"train": [0], "test": [-1]}, None), ({"train": [0, 3]}, ["a", "b"]),
                       ({"train": [0, None]}, None)):
        with pytest.raises(KtBenchError, match="label column 'y' of split .* holds"):
            class_labels(raw, names, "y", tmp_path)


# ---- end to end ---------------------------------------------------------------------------


def test_a_grid_runs_on_an_image_folder(split_tree, tmp_path, capsys):
    from tests.conftest import run_cli, sorted_rows

    grid = tmp_path / "mine.toml"
    grid.write_text(textwrap.dedent(f"""
        name = "mine"
        datasets = [{{ name = "imagefolder", root = "{split_tree}", image_size = 16 }}]
        methods = ["student", "kd"]
        seeds = [0]

        [[pairs]]
        teacher = {{ name = "resnet8", width = 0.25 }}
        student = {{ name = "resnet8", width = 0.25 }}

        [recipe]
        epochs = 1
        batch_size = 12

        [teacher_recipe]
        epochs = 1
    """))
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "run", "--grid", str(grid), "--out", str(out), "--no-report",
                           "--device", "cpu", "--data-root", str(tmp_path / "data"))
    assert code == 0, err
    rows = sorted_rows(out)
    assert rows["method"].tolist() == ["kd", "student"]
    assert set(rows["status"]) == {"ok"}
    assert all(d.startswith("imagefolder(") for d in rows["dataset"])
    assert list((tmp_path / "data" / "cache").glob("imagefolder-*.train.npy"))
