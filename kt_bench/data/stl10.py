"""``stl10``: STL-10's labelled splits, read from the binary files of torchvision's
``stl10_binary`` folder as plain bytes (nothing in them runs), downloaded when missing."""

from __future__ import annotations

import tarfile
from pathlib import Path

import numpy as np
import torch

from kt_bench.core.errors import ConfigError, KtBenchError, first_line
from kt_bench.data.augment import crop_flip
from kt_bench.data.bundle import (
    DatasetInfo,
    Split,
    TensorData,
    channel_stats,
    first_per_class,
    register_dataset,
)
from kt_bench.data.bundle import data_root as resolve_data_root
from kt_bench.data.image_cache import Recipe

#: The folder torchvision's ``STL10`` extracts its archive into, under the data root.
FOLDER = "stl10_binary"
#: Each split's image and label files.
FILES = {"train": ("train_X.bin", "train_y.bin"), "test": ("test_X.bin", "test_y.bin")}
#: The side of the stored images, and the training images of each of the 10 classes.
SIDE, PER_CLASS, NUM_CLASSES = 96, 500, 10
#: The bytes of one stored image (3 channels of SIDE x SIDE, uint8).
IMAGE_BYTES = 3 * SIDE * SIDE
#: The class names, where the folder has no ``class_names.txt``.
CLASS_NAMES = ("airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship",
               "truck")
#: Images made contiguous at once for resizing (bounds the copy).
CHUNK = 512


def missing_files(folder: Path) -> list[str]:
    """The image and label files of both splits that ``folder`` lacks."""
    return [name for pair in FILES.values() for name in pair if not (folder / name).is_file()]


def fetch(root: Path, download: bool) -> Path:
    """The ``stl10_binary`` folder under ``root`` with both splits' files, downloaded with
    torchvision's downloader (the archive's MD5 checked) when one is missing and ``download``;
    a folder still incomplete is a one-line error naming it and the files it lacks."""
    folder = root / FOLDER
    missing = missing_files(folder)
    if not missing:
        return folder
    what = f"STL-10 is not in {folder} (no {', '.join(missing)})"
    if not download:
        raise KtBenchError(f"{what}; pass --data-root with {FOLDER}/ in it, or allow the "
                           "download (download = true)")
    from torchvision.datasets import STL10
    from torchvision.datasets import utils as tv_utils

    try:
        tv_utils.download_and_extract_archive(STL10.url, str(root), filename=STL10.filename,
                                              md5=STL10.tgz_md5)
    except (OSError, RuntimeError, tarfile.TarError) as exc:  # offline, disk full, bad archive
        raise KtBenchError(f"{what} and the download failed: {first_line(exc)}") from None
    missing = missing_files(folder)
    if missing:
        raise KtBenchError(f"STL-10 was downloaded to {root} but {folder} has no "
                           f"{', '.join(missing)}")
    return folder


def _read_bytes(path: Path) -> np.ndarray:
    """The bytes of ``path`` as uint8; an unreadable file is a one-line error naming it."""
    try:
        return np.fromfile(path, dtype=np.uint8)
    except (OSError, ValueError) as exc:
        raise KtBenchError(f"{path} cannot be read: {first_line(exc)}") from None


def read_labels(path: Path) -> np.ndarray:
    """The labels of an STL-10 label file (one byte each, 1..10) as 0..9."""
    raw = _read_bytes(path)
    if raw.size == 0:
        raise KtBenchError(f"{path} is empty; an STL-10 label file holds one byte (1..10) "
                           "per image")
    bad = raw[(raw < 1) | (raw > NUM_CLASSES)]
    if bad.size:
        raise KtBenchError(f"{path} is not an STL-10 label file: it holds the byte {bad[0]}; "
                           f"labels are 1..{NUM_CLASSES}")
    return raw.astype(np.int64) - 1


def read_images(path: Path, labels: Path, count: int) -> np.ndarray:
    """The ``count`` images of an STL-10 image file (one per label of ``labels``) as
    (N, 3, 96, 96) uint8, rows first.

    The file stores each channel column by column, so the array read is transposed in its
    last two axes (a view, not a copy)."""
    raw = _read_bytes(path)
    if raw.size != count * IMAGE_BYTES:
        raise KtBenchError(f"{path} is damaged or does not match {labels.name}: it holds "
                           f"{raw.size} bytes, where {count} images of 3x{SIDE}x{SIDE} (one "
                           f"per label) take {count * IMAGE_BYTES}")
    return raw.reshape(count, 3, SIDE, SIDE).transpose(0, 1, 3, 2)


def resized(images: np.ndarray, size: int) -> torch.Tensor:
    """uint8 images (N, 3, 96, 96) resized to ``size`` square as the user datasets' and
    Tiny-ImageNet's are (:meth:`Recipe.fixed <kt_bench.data.image_cache.Recipe.fixed>`:
    torchvision's bilinear resize of a PIL image, antialiased), uint8."""
    if size == SIDE:
        return torch.from_numpy(np.ascontiguousarray(images))
    from PIL import Image

    recipe = Recipe.of("none", size)
    out = np.empty((len(images), 3, size, size), dtype=np.uint8)
    for start in range(0, len(images), CHUNK):
        rows = np.ascontiguousarray(images[start:start + CHUNK].transpose(0, 2, 3, 1))
        for k, img in enumerate(rows):
            small = recipe.fixed(Image.fromarray(img), train=False)
            out[start + k] = np.asarray(small, dtype=np.uint8).transpose(2, 0, 1)
    return torch.from_numpy(out)


def read_split(folder: Path, split: str, size: int, per_class: int | None) -> Split:
    """One split's images resized to ``size`` and its labels, keeping the first
    ``per_class`` images of each class (all when None)."""
    images_file, labels_file = FILES[split]
    labels = read_labels(folder / labels_file)
    images = read_images(folder / images_file, folder / labels_file, len(labels))
    keep = first_per_class(torch.from_numpy(labels), per_class).numpy()
    if len(keep) < len(labels):
        images, labels = images[keep], labels[keep]
    return Split(resized(images, size), torch.from_numpy(labels))


def class_names(folder: Path) -> list[str]:
    """The names in ``class_names.txt`` when it lists 10, else the published ones."""
    try:
        names = [n.strip() for n in (folder / "class_names.txt").read_text().splitlines()]
    except (OSError, UnicodeDecodeError):
        return list(CLASS_NAMES)
    names = [n for n in names if n]
    return names if len(names) == NUM_CLASSES else list(CLASS_NAMES)


def check_options(dataset: str, **values: int | None) -> None:
    """A one-line ConfigError naming ``dataset`` for an option of ``values`` below 1 (every
    option but ``image_size`` may also be None: no limit)."""
    for key, value in values.items():
        if value is not None and value < 1:
            raise ConfigError(f"{dataset}: {key} = {value} is invalid; accepted: an integer "
                              f">= 1{'' if key == 'image_size' else ', or none for no limit'}")


def _info(per_class: int | None = None, image_size: int = 32) -> DatasetInfo:
    return DatasetInfo(NUM_CLASSES, 3, image_size,
                       NUM_CLASSES * min(per_class or PER_CLASS, PER_CLASS))


@register_dataset("stl10", info=_info)
def stl10(data_root: str | None = None, download: bool = True, per_class: int | None = None,
          augment: bool = True, image_size: int = 32) -> TensorData:
    """STL-10's labelled images: 5,000 training and 8,000 test 96x96 images, 10 classes.

    Read from ``<data_root>/stl10_binary/{train,test}_{X,y}.bin`` (torchvision's layout;
    downloaded there, about 2.6 GB, when missing and ``download``); the unlabelled split is
    not used. Images are resized once at load to ``image_size`` (default 32, as the CRD paper's
    linear probes: bilinear, antialiased, as Tiny-ImageNet's) and held as uint8, normalised
    per channel with the training split's mean and std. Training augmentation: random crop of
    the zero-padded image (padding image_size/8, 4 at 32) and horizontal flip. ``per_class``
    keeps the first N training images of each class (the test split stays whole).
    """
    check_options("stl10", image_size=image_size, per_class=per_class)
    folder = fetch(resolve_data_root(data_root), download)
    train = read_split(folder, "train", image_size, per_class)
    test = read_split(folder, "test", image_size, None)
    mean, std = channel_stats(train.images)
    bundle = TensorData("stl10", train, test, NUM_CLASSES, crop_flip(image_size) if augment
                        else None, mean, std)
    bundle.classes = class_names(folder)
    return bundle
