"""The ``stl10`` and ``tiny_imagenet`` datasets on small files written in their published
formats: STL-10's column-major binary files and Tiny-ImageNet-200's folder of JPEGs."""

from __future__ import annotations

import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch

from kt_bench.core.errors import KtBenchError
from kt_bench.core.options import Spec
from kt_bench.data import DatasetInfo, Split, TensorData, dataset_info, load_dataset
from kt_bench.data.imagefolder import FileSource

SIDE = 96
STL_NAMES = ["airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship",
             "truck"]


# ---- STL-10 ----------------------------------------------------------------------------------

def stl_image(label: int) -> np.ndarray:
    """One 3x96x96 image as seen (rows first): channel 0 the class's grey level, channel 1 a
    ramp down the rows (each row constant), channel 2 columns alternating 0 and 255."""
    img = np.empty((3, SIDE, SIDE), dtype=np.uint8)
    img[0] = 10 + 20 * label
    img[1] = np.arange(SIDE, dtype=np.uint8)[:, None]
    img[2] = 255 * (np.arange(SIDE) % 2)[None, :]
    return img


def write_stl10(root: Path, train_per_class: int, test_per_class: int,
                seed: int = 0) -> dict[str, np.ndarray]:
    """``root/stl10_binary`` as the published archive lays it out: ``<split>_X.bin`` (each
    channel stored column by column), ``<split>_y.bin`` (labels 1..10) and class_names.txt.
    Returns each split's labels (0..9) in file order."""
    folder = root / "stl10_binary"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    written = {}
    for split, n in (("train", train_per_class), ("test", test_per_class)):
        labels = np.repeat(np.arange(10), n)
        rng.shuffle(labels)
        images = np.stack([stl_image(int(c)) for c in labels])
        (folder / f"{split}_X.bin").write_bytes(images.transpose(0, 1, 3, 2).tobytes())
        (folder / f"{split}_y.bin").write_bytes((labels + 1).astype(np.uint8).tobytes())
        written[split] = labels
    (folder / "class_names.txt").write_text("\n".join(STL_NAMES) + "\n")
    return written


def stl(root: Path, **options):
    """The ``stl10`` dataset under ``root``, never downloaded, unaugmented."""
    return load_dataset(Spec("stl10", {"download": False, "augment": False, **options}),
                        str(root))


def one_line_error(load) -> str:
    """The message of the KtBenchError ``load()`` raises, checked to be one line."""
    with pytest.raises(KtBenchError) as exc:
        load()
    message = str(exc.value)
    assert "\n" not in message
    return message


def test_stl10_images_are_read_column_major_with_their_labels(tmp_path):
    labels = write_stl10(tmp_path, train_per_class=3, test_per_class=2)
    data = stl(tmp_path, image_size=96)
    assert data.train.images.shape == (30, 3, 96, 96) and data.train.images.dtype == torch.uint8
    assert data.test.images.shape == (20, 3, 96, 96)
    assert data.num_classes == 10 and data.classes == STL_NAMES and data.augment is None
    for split in (data.train, data.test):
        name = "train" if split is data.train else "test"
        assert split.labels.tolist() == labels[name].tolist()
        # each image's grey level is its class's: images and labels stay paired
        assert torch.equal(split.images[:, 0, 0, 0].long(), 10 + 20 * split.labels)
        # the ramp runs down the rows and the stripes across the columns: not transposed
        ramp = torch.arange(SIDE, dtype=torch.uint8).view(SIDE, 1).expand(SIDE, SIDE)
        stripes = (255 * (torch.arange(SIDE) % 2)).to(torch.uint8).expand(SIDE, SIDE)
        assert all(torch.equal(img[1], ramp) and torch.equal(img[2], stripes)
                   for img in split.images)
    # normalised with the training split's own statistics
    grey = (10 + 20 * torch.tensor(labels["train"])).double().mean().item() / 255
    assert data.mean[0] == pytest.approx(grey, abs=1e-6)


def test_stl10_is_resized_once_antialiased_to_image_size(tmp_path):
    write_stl10(tmp_path, train_per_class=2, test_per_class=1)
    data = stl(tmp_path)  # the default: 32, as the CRD paper's probes
    assert data.train.images.shape == (20, 3, 32, 32) and data.test.images.shape == (10, 3, 32, 32)
    assert data.train.images.dtype == torch.uint8 and data.resize_to is None
    assert data.image_size == 32 and data.probe(2).shape == (2, 3, 32, 32)
    x = data.train.images.long()
    assert torch.equal(x[:, 0], (10 + 20 * data.train.labels).view(-1, 1, 1).expand(-1, 32, 32))
    # a linear ramp keeps its values at the centre of each 3-row block, rows stay constant
    inner = torch.arange(1, 31)
    assert torch.equal(x[:, 1, inner, :], (3 * inner + 1).view(1, -1, 1).expand(20, -1, 32))
    # antialiased: one-pixel stripes blur to grey; a plain bilinear resize would keep 0 or 255
    assert x[:, 2].min() >= 100 and x[:, 2].max() <= 155
    # augmented batches: crops of the held 32-pixel images, normalised with the train stats
    augmented = stl(tmp_path, augment=True)
    images, _ = next(augmented.train_batches(0, 0, 8, torch.device("cpu")))
    assert images.shape == (8, 3, 32, 32) and images.dtype == torch.float32
    mean = torch.tensor(augmented.mean).view(1, 3, 1, 1)
    std = torch.tensor(augmented.std).view(1, 3, 1, 1)
    first, _ = next(augmented.test_batches(4, torch.device("cpu")))
    assert torch.allclose(first, (data.test.images[:4].float() / 255 - mean) / std)


def test_stl10_per_class_keeps_the_first_images_and_info_agrees(tmp_path):
    labels = write_stl10(tmp_path, train_per_class=3, test_per_class=1)
    data = stl(tmp_path, per_class=2, image_size=24)
    expected, seen = [], {c: 0 for c in range(10)}
    for c in labels["train"].tolist():  # the first two of each class, in file order
        if seen[c] < 2:
            expected.append(c)
            seen[c] += 1
    assert data.train.labels.tolist() == expected and data.n_train == 20
    assert data.n_test == 10  # the test split stays whole
    info = dataset_info(Spec("stl10", {"per_class": 2, "image_size": 24}))
    assert info == DatasetInfo(10, 3, 24, 20)
    assert (info.num_classes, info.in_channels, info.image_size, info.n_train) == (
        data.num_classes, data.in_channels, data.image_size, data.n_train)
    assert dataset_info(Spec("stl10", {})) == DatasetInfo(10, 3, 32, 5000)


def test_a_missing_stl10_folder_is_one_line_and_downloads_when_allowed(tmp_path, monkeypatch):
    import torchvision.datasets.utils as tv_utils

    folder = tmp_path / "stl10_binary"
    message = one_line_error(lambda: stl(tmp_path))
    assert message.startswith(f"STL-10 is not in {folder} (no train_X.bin, train_y.bin, ")
    assert "allow the download" in message

    def offline(url, root, filename, md5):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(tv_utils, "download_and_extract_archive", offline)
    message = one_line_error(lambda: stl(tmp_path, download=True))
    assert message.startswith(f"STL-10 is not in {folder} (no ")
    assert "the download failed: URLError" in message

    calls = []

    def extract(url, root, filename, md5):
        calls.append((url, root, filename, md5))
        write_stl10(Path(root), train_per_class=1, test_per_class=1)

    monkeypatch.setattr(tv_utils, "download_and_extract_archive", extract)
    data = stl(tmp_path, download=True)
    assert data.n_train == 10 and len(calls) == 1
    url, root, filename, md5 = calls[0]
    assert url.endswith("stl10_binary.tar.gz") and root == str(tmp_path) and md5
    stl(tmp_path, download=True)  # present now: not downloaded again
    assert len(calls) == 1


def test_damaged_stl10_files_are_one_line(tmp_path):
    write_stl10(tmp_path, train_per_class=1, test_per_class=1)
    folder = tmp_path / "stl10_binary"
    images = folder / "train_X.bin"
    whole = images.read_bytes()
    images.write_bytes(whole[:-100])
    message = one_line_error(lambda: stl(tmp_path))
    assert message.startswith(f"{images} is damaged or does not match train_y.bin: ")
    images.write_bytes(whole)
    labels = folder / "test_y.bin"
    labels.write_bytes(b"\x00" + labels.read_bytes()[1:])
    assert one_line_error(lambda: stl(tmp_path)).startswith(
        f"{labels} is not an STL-10 label file: it holds the byte 0")
    labels.write_bytes(b"")
    assert one_line_error(lambda: stl(tmp_path)).startswith(f"{labels} is empty")


# ---- Tiny-ImageNet ---------------------------------------------------------------------------

#: Not sorted: the labels follow wnids.txt's order.
WNIDS = ("n03000003", "n01000001", "n02000002")
TRAIN_PER_CLASS = 11  # numbers 0..10: by number, _10 comes after _2


def tiny_colour(label: int, k: int) -> tuple[int, int, int]:
    """The flat colour of training image ``k`` of class ``label``."""
    return (40 + 60 * label, 10 + 20 * k, 200)


def write_tiny_imagenet(root: Path, wnids: tuple[str, ...] = WNIDS,
                        val_per_class: int = 2) -> Path:
    """``root/tiny-imagenet-200`` in the published layout: wnids.txt, train/<wnid>/images
    with <wnid>_boxes.txt, val/images with val_annotations.txt (shuffled, one grayscale
    image), and an unlabelled test/images."""
    from PIL import Image

    folder = root / "tiny-imagenet-200"
    folder.mkdir(parents=True)
    (folder / "wnids.txt").write_text("\n".join(wnids) + "\n")
    for label, wnid in enumerate(wnids):
        images = folder / "train" / wnid / "images"
        images.mkdir(parents=True)
        boxes = []
        for k in range(TRAIN_PER_CLASS):
            Image.new("RGB", (64, 64), tiny_colour(label, k)).save(
                images / f"{wnid}_{k}.JPEG", quality=95)
            boxes.append(f"{wnid}_{k}.JPEG\t0\t0\t63\t63")
        (folder / "train" / wnid / f"{wnid}_boxes.txt").write_text("\n".join(boxes) + "\n")
    (folder / "val" / "images").mkdir(parents=True)
    order = np.random.default_rng(3).permutation(np.repeat(np.arange(len(wnids)),
                                                           val_per_class))
    rows = []
    for j, label in enumerate(order.tolist()):
        img = Image.new("RGB", (64, 64), (40 + 60 * label, 120, 30))
        (img.convert("L") if j == 0 else img).save(folder / "val" / "images" / f"val_{j}.JPEG",
                                                   quality=95)
        rows.append(f"val_{j}.JPEG\t{wnids[label]}\t1\t2\t60\t61")
    (folder / "val" / "val_annotations.txt").write_text("\n".join(rows) + "\n")
    (folder / "test" / "images").mkdir(parents=True)
    Image.new("RGB", (64, 64), (0, 0, 0)).save(folder / "test" / "images" / "test_0.JPEG")
    return folder


def tiny(data_root: Path, **options):
    """The ``tiny_imagenet`` dataset with its cache under ``data_root``, unaugmented."""
    return load_dataset(Spec("tiny_imagenet", {"augment": False, **options}), str(data_root))


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory) -> Path:
    """A data root holding a small Tiny-ImageNet (3 classes, 11 training and 2 validation
    images of each)."""
    root = tmp_path_factory.mktemp("tiny")
    write_tiny_imagenet(root)
    return root


def close(images: torch.Tensor, colour: tuple[int, ...]) -> bool:
    """Whether every image of (N, 3, H, W) is ``colour`` within JPEG's error."""
    want = torch.tensor(colour, dtype=torch.float32).view(1, 3, 1, 1)
    return bool(((images.float() - want).abs() <= 3).all())


def test_tiny_imagenet_reads_the_published_layout(tiny_root, tmp_path):
    data = tiny(tmp_path, root=str(tiny_root / "tiny-imagenet-200"), classes=3, image_size=64)
    assert data.train.images.shape == (33, 3, 64, 64) and data.train.images.dtype == torch.uint8
    assert data.test.images.shape == (6, 3, 64, 64)
    assert data.num_classes == 3 and data.classes == list(WNIDS)
    # class by class in wnids.txt's order, each class's images by number
    assert data.train.labels.tolist() == [c for c in range(3) for _ in range(TRAIN_PER_CLASS)]
    for i in range(33):
        label, k = divmod(i, TRAIN_PER_CLASS)
        assert close(data.train.images[i:i + 1], tiny_colour(label, k))
    # validation: in val_annotations.txt's order, labelled by its wnid column
    rows = (tiny_root / "tiny-imagenet-200" / "val" / "val_annotations.txt").read_text().split()
    wnid_of = [rows[i + 1] for i in range(0, len(rows), 6)]
    assert data.test.labels.tolist() == [WNIDS.index(w) for w in wnid_of]
    for j in range(1, 6):
        assert close(data.test.images[j:j + 1], (40 + 60 * int(data.test.labels[j]), 120, 30))
    grey = data.test.images[0].float()  # the grayscale JPEG: three equal channels
    assert torch.equal(grey[0], grey[1]) and torch.equal(grey[1], grey[2])


def test_tiny_imagenet_resizes_caps_caches_and_info_agrees(tiny_root, monkeypatch):
    options = {"classes": 3, "per_class": 3}
    data = tiny(tiny_root, **options)  # the default root under the data root, 32 pixels
    assert data.train.images.shape == (9, 3, 32, 32) and data.test.images.shape == (6, 3, 32, 32)
    assert data.resize_to is None and data.image_size == 32
    for i in range(9):  # images 0, 1, 2 of each class by number (not 0, 1, 10 by name)
        label, k = divmod(i, 3)
        assert close(data.train.images[i:i + 1], tiny_colour(label, k))
    info = dataset_info(Spec("tiny_imagenet", options))
    assert info == DatasetInfo(3, 3, 32, 9)
    assert (info.num_classes, info.in_channels, info.image_size, info.n_train) == (
        data.num_classes, data.in_channels, data.image_size, data.n_train)
    assert dataset_info(Spec("tiny_imagenet", {})) == DatasetInfo(200, 3, 32, 100_000)
    assert len(list((tiny_root / "cache").glob("tiny_imagenet-*.train.npy"))) == 1

    def no_decoding(self, index):
        raise AssertionError("decoded again")

    monkeypatch.setattr(FileSource, "load", no_decoding)
    again = tiny(tiny_root, **options)  # from the cache
    assert torch.equal(again.train.images, data.train.images)
    assert torch.equal(again.test.labels, data.test.labels) and again.mean == data.mean
    monkeypatch.undo()
    fewer = tiny(tiny_root, classes=2, per_class=1)
    assert fewer.num_classes == 2 and fewer.train.labels.tolist() == [0, 1]
    assert sorted(fewer.test.labels.tolist()) == [0, 0, 1, 1]  # the kept classes' images


def test_tiny_imagenet_problems_are_one_line(tmp_path):
    where = tmp_path / "tiny-imagenet-200"
    message = one_line_error(lambda: tiny(tmp_path))
    assert message.startswith(f"Tiny-ImageNet is not at {where} (no wnids.txt, train, ")
    assert "http://cs231n.stanford.edu/tiny-imagenet-200.zip" in message
    folder = write_tiny_imagenet(tmp_path)
    assert f"{folder / 'wnids.txt'} lists 3 classes, fewer than the 200" in one_line_error(
        lambda: tiny(tmp_path))
    annotations = folder / "val" / "val_annotations.txt"
    good = annotations.read_text()
    annotations.write_text(good + "val_99.JPEG\tn09999999\t0\t0\t1\t1\n")
    assert one_line_error(lambda: tiny(tmp_path, classes=3)).startswith(
        f"{annotations} line 7 is not <file>TAB<wnid of wnids.txt>TAB<box>")
    annotations.write_text(good + f"val_99.JPEG\t{WNIDS[0]}\t0\t0\t1\t1\n")
    assert one_line_error(lambda: tiny(tmp_path, classes=3)).startswith(
        f"Tiny-ImageNet: cannot read {folder / 'val' / 'images' / 'val_99.JPEG'}")
    annotations.write_text(good)
    (folder / "val" / "images" / "val_1.JPEG").write_bytes(b"not a jpeg")
    assert one_line_error(lambda: tiny(tmp_path, classes=3)).startswith(
        f"cannot read image {folder / 'val' / 'images' / 'val_1.JPEG'}")


# ---- shared parts ----------------------------------------------------------------------------

def test_channel_stats_are_exact_and_independent_of_the_chunking():
    from kt_bench.data.bundle import channel_stats

    images = torch.randint(0, 256, (37, 3, 9, 9), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0))
    exact = images.double() / 255
    want_mean = exact.mean(dim=(0, 2, 3)).tolist()
    want_std = exact.std(dim=(0, 2, 3)).tolist()
    for chunk in (1, 5 * 3 * 81, 1 << 24):  # an image at a time, 5 at a time, all at once
        mean, std = channel_stats(images, chunk=chunk)
        assert mean == pytest.approx(want_mean, abs=1e-14)
        assert std == pytest.approx(want_std, abs=1e-14)


@pytest.mark.parametrize(("name", "key", "value"), [
    ("stl10", "image_size", 0), ("stl10", "per_class", 0), ("tiny_imagenet", "image_size", -1),
    ("tiny_imagenet", "per_class", 0), ("tiny_imagenet", "classes", 0)])
def test_option_below_one_is_a_one_line_config_error(tmp_path, name, key, value):
    from kt_bench.core.errors import ConfigError

    with pytest.raises(ConfigError) as exc:
        load_dataset(Spec(name, {key: value}), str(tmp_path))
    assert str(exc.value).startswith(f"{name}: {key} = {value} is invalid; accepted: an "
                                     "integer >= 1")
    assert ("none" in str(exc.value)) == (key != "image_size")


@pytest.mark.parametrize(("size", "pad"), [(4, 1), (32, 4), (64, 8), (96, 12)])
def test_stl10_and_tiny_imagenet_crop_with_an_eighth_of_the_side_padded(size, pad):
    from kt_bench.bench.speed import crop_flip_of
    from kt_bench.data.augment import crop_flip, random_crop_flip

    images = torch.rand(6, 3, size, size, generator=torch.Generator().manual_seed(1))
    got = crop_flip(size)(images, torch.Generator().manual_seed(2))
    want = random_crop_flip(images, torch.Generator().manual_seed(2), pad=pad, flip=True)
    assert torch.equal(got, want)
    # the speed benchmark's torchvision pipeline reads the same padding off the bundle
    held = Split(images, torch.zeros(6, dtype=torch.long))
    assert crop_flip_of(TensorData("x", held, held, 2, crop_flip(size))) == (pad, True)
