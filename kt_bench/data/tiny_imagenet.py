"""``tiny_imagenet``: Tiny-ImageNet-200 in its published folder layout, decoded once into a
memory-mapped uint8 cache under the data root (the user datasets' cache)."""

from __future__ import annotations

import os
from pathlib import Path

from kt_bench.core.errors import KtBenchError, first_line
from kt_bench.data.augment import crop_flip
from kt_bench.data.bundle import DatasetInfo, TensorData, channel_stats, register_dataset
from kt_bench.data.bundle import data_root as resolve_data_root
from kt_bench.data.image_cache import CACHE_FORMAT, Recipe, cache_folder, cached_splits, digest
from kt_bench.data.imagefolder import FileSource
from kt_bench.data.stl10 import check_options

#: The dataset's folder under the data root, and where it is published.
FOLDER = "tiny-imagenet-200"
URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
#: Classes, and training images of each, in the published dataset.
CLASSES, PER_CLASS = 200, 500
#: The files and folders a copy must have, relative to its folder.
REQUIRED = ("wnids.txt", "train", "val/val_annotations.txt", "val/images")

Samples = list[tuple[str, int]]


def locate(data_root: str | None, root: str | None) -> Path:
    """The dataset's folder: ``root``, else ``<data_root>/tiny-imagenet-200``; one lacking a
    required file is a one-line error naming it and where the dataset is published."""
    folder = (Path(root).expanduser() if root else resolve_data_root(data_root) / FOLDER)
    missing = [name for name in REQUIRED if not (folder / name).exists()]
    if missing:
        raise KtBenchError(f"Tiny-ImageNet is not at {folder} (no {', '.join(missing)}); "
                           f"kt-bench does not download it: unzip {URL} into "
                           f"{folder.parent} (or pass root = its {FOLDER} folder)")
    return folder.resolve()


def read_wnids(path: Path) -> list[str]:
    """The class ids of ``wnids.txt`` in the file's order (the label order)."""
    try:
        wnids = [w.strip() for w in path.read_text().splitlines() if w.strip()]
    except (OSError, UnicodeDecodeError) as exc:
        raise KtBenchError(f"{path} cannot be read: {first_line(exc)}") from None
    if not wnids:
        raise KtBenchError(f"{path} is empty; accepted: one wnid (e.g. n01443537) a line")
    twice = sorted({w for w in wnids if wnids.count(w) > 1})
    if twice:
        raise KtBenchError(f"{path} lists {', '.join(twice[:5])} more than once; accepted: "
                           "each wnid on one line")
    return wnids


def _number(name: str) -> tuple:
    """Sort key of ``<wnid>_<k>.JPEG``: by ``k`` as a number (then by name)."""
    stem = name.rsplit(".", 1)[0].rsplit("_", 1)[-1]
    return (0, int(stem), name) if stem.isdigit() else (1, 0, name)


def train_samples(folder: Path, wnids: list[str], per_class: int) -> Samples:
    """The first ``per_class`` images (by number) of ``train/<wnid>/images`` of each class,
    class by class, labelled by the class's place in ``wnids``."""
    samples: Samples = []
    for label, wnid in enumerate(wnids):
        images = folder / "train" / wnid / "images"
        try:
            names = sorted((e.name for e in os.scandir(images)
                            if e.is_file() and e.name.lower().endswith((".jpeg", ".jpg"))),
                           key=_number)
        except OSError as exc:
            raise KtBenchError(f"Tiny-ImageNet: cannot list {images} (class {wnid} of "
                               f"wnids.txt): {exc.strerror or first_line(exc)}") from None
        if not names:
            raise KtBenchError(f"Tiny-ImageNet: {images} holds no JPEG images")
        samples += [(str(images / n), label) for n in names[:per_class]]
    return samples


def val_samples(folder: Path, index: dict[str, int], num_classes: int) -> Samples:
    """The validation images of ``val/val_annotations.txt`` (``file<TAB>wnid<TAB>box``) in
    the file's order, those of the first ``num_classes`` classes of ``index``."""
    path = folder / "val" / "val_annotations.txt"
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise KtBenchError(f"{path} cannot be read: {first_line(exc)}") from None
    samples: Samples = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) < 2 or fields[1] not in index:
            raise KtBenchError(f"{path} line {number} is not <file>TAB<wnid of wnids.txt>"
                               f"TAB<box>: {line.strip()[:80]!r}")
        if index[fields[1]] < num_classes:
            samples.append((str(folder / "val" / "images" / fields[0]), index[fields[1]]))
    return samples


def identity(source: FileSource) -> list:
    """The source's files' identity (paths, sizes, times); a missing file is one line."""
    try:
        return source.identity()
    except OSError as exc:
        raise KtBenchError(f"Tiny-ImageNet: cannot read {exc.filename}: "
                           f"{exc.strerror or first_line(exc)}") from None


def chosen_classes(path: Path, classes: int | None) -> tuple[list[str], dict[str, int]]:
    """The first ``classes`` (default 200) class ids of ``wnids.txt`` and every listed id's
    label; a file listing fewer is a one-line error."""
    wnids = read_wnids(path)
    wanted = classes or CLASSES
    if len(wnids) < wanted:
        raise KtBenchError(f"{path} lists {len(wnids)} classes, fewer than the {wanted} "
                           f"asked{'' if classes else ' (Tiny-ImageNet-200 has 200)'}; set "
                           "classes = N to use the first N")
    return wnids[:wanted], {w: i for i, w in enumerate(wnids)}


def _info(image_size: int = 32, per_class: int | None = None,
          classes: int | None = None) -> DatasetInfo:
    n = classes or CLASSES
    return DatasetInfo(n, 3, image_size, n * min(per_class or PER_CLASS, PER_CLASS))


@register_dataset("tiny_imagenet", info=_info)
def tiny_imagenet(data_root: str | None = None, root: str | None = None, image_size: int = 32,
                  per_class: int | None = None, classes: int | None = None,
                  augment: bool = True) -> TensorData:
    """Tiny-ImageNet-200: 100,000 training and 10,000 validation (the test split here) 64x64
    images, 200 classes.

    Read from ``root`` (default ``<data_root>/tiny-imagenet-200``), the published layout:
    ``wnids.txt``, ``train/<wnid>/images/*.JPEG``, ``val/images/*.JPEG`` labelled by
    ``val/val_annotations.txt``; the unlabelled ``test/`` is not used. kt-bench does not
    download it (http://cs231n.stanford.edu/tiny-imagenet-200.zip). Labels follow the order
    of ``wnids.txt`` (not sorted, unlike an ImageFolder of ``train/``). The JPEGs are decoded
    once, resized to ``image_size`` square (default 32, as the CRD paper's linear probes;
    bilinear, antialiased), into ``<data_root>/cache/tiny_imagenet-<hash>.*.npy`` (rebuilt
    when a file changes; every load checks every file's size and time), held as uint8 and
    normalised per channel with the training split's mean and std. Training augmentation:
    random crop of the zero-padded image (padding image_size/8) and horizontal flip.
    ``classes`` keeps the first N classes of ``wnids.txt`` and ``per_class`` the first N
    training images of each (by number); the validation images of the kept classes stay whole.
    """
    check_options("tiny_imagenet", image_size=image_size, per_class=per_class, classes=classes)
    folder = locate(data_root, root)
    kept, index = chosen_classes(folder / "wnids.txt", classes)
    train = FileSource(train_samples(folder, kept, min(per_class or PER_CLASS, PER_CLASS)),
                       folder)
    test = FileSource(val_samples(folder, index, len(kept)), folder)
    recipe = Recipe.of("none", image_size)
    key = ["tiny_imagenet", str(folder), identity(train), identity(test), image_size,
           CACHE_FORMAT]
    prefix = cache_folder(data_root) / f"tiny_imagenet-{digest(key)}"
    tr, te = cached_splits(prefix, train, test, recipe, min(8, os.cpu_count() or 1),
                           {"root": str(folder), "classes": kept})
    mean, std = channel_stats(tr.images)
    bundle = TensorData("tiny_imagenet", tr, te, len(kept), crop_flip(image_size) if augment
                        else None, mean, std)
    bundle.classes = kept
    return bundle
