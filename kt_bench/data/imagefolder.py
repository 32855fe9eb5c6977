"""``imagefolder``: your own images in class folders, torchvision's ImageFolder layout."""

from __future__ import annotations

import functools
import os
from pathlib import Path

from kt_bench.core import atomic
from kt_bench.core.errors import ConfigError, KtBenchError, first_line
from kt_bench.data.bundle import DataBundle, DatasetInfo, register_dataset
from kt_bench.data.image_cache import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ImageSource,
    Recipe,
    cache_folder,
    check_choices,
    digest,
    file_identity,
    image_bundle,
    stratified_split,
)

#: The folders of a dataset that comes split: ``train/`` with ``val/`` (or ``test/``).
EVAL_FOLDERS = ("val", "test")
LAYOUTS = ("DIR/<class>/*.jpg|png (split by val_fraction) or DIR/train/<class>/... with "
           "DIR/val/<class>/...")

Samples = list[tuple[str, int]]


class FileSource(ImageSource):
    """Image files with their labels, decoded with torchvision's PIL loader."""

    def __init__(self, samples: Samples, root: Path) -> None:
        self.paths = [p for p, _ in samples]
        self.labels = [label for _, label in samples]
        self.root = root

    def load(self, index: int):
        """The image file ``index`` as an RGB PIL image."""
        from torchvision.datasets.folder import pil_loader

        return pil_loader(self.paths[index])

    def where(self, index: int) -> str:
        """The file's path."""
        return self.paths[index]

    def identity(self) -> list:
        """Each file's path (relative to the root), size, modification time and label."""
        return [[*f, label] for f, label in zip(file_identity(self.paths, self.root),
                                                self.labels, strict=True)]


def _layout(root: str) -> tuple[Path, Path, Path | None]:
    """The dataset's folder, its training folder and its evaluation folder (None where one
    folder of classes is split by fraction)."""
    path = Path(root).expanduser().resolve()
    if not path.is_dir():
        raise KtBenchError(f"imagefolder: root = {root!r} is not a folder; accepted: {LAYOUTS}")
    train = path / "train"
    if train.is_dir():
        for name in EVAL_FOLDERS:
            if (path / name).is_dir():
                return path, train, path / name
        raise KtBenchError(f"imagefolder: {path} has train/ but no val/ (nor test/); "
                           f"accepted: {LAYOUTS}")
    return path, path, None


def _stamp(folder: Path) -> tuple:
    """What changes when a class folder is added, removed or has files added or removed."""
    try:
        entries = sorted((e.name, e.stat().st_mtime_ns) for e in os.scandir(folder)
                         if e.is_dir())
        return (folder.stat().st_mtime_ns, tuple(entries))
    except OSError as exc:
        raise KtBenchError(f"imagefolder: cannot list {folder}: "
                           f"{exc.strerror or first_line(exc)}") from None


@functools.lru_cache(maxsize=16)
def _scan_cached(folder: str, stamp: tuple) -> tuple[tuple[str, ...], tuple[tuple[str, int], ...]]:
    from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

    try:
        classes, to_index = find_classes(folder)
    except FileNotFoundError:
        raise KtBenchError(f"imagefolder: {folder} holds no class folders; accepted: "
                           f"{LAYOUTS}") from None
    try:
        samples = make_dataset(folder, to_index, IMG_EXTENSIONS)
    except FileNotFoundError as exc:  # a class folder without images
        raise KtBenchError(f"imagefolder: in {folder}: {first_line(exc)}") from None
    return tuple(classes), tuple(samples)


def scan(folder: Path) -> tuple[list[str], Samples]:
    """The sorted class folders of ``folder`` and its image files with their class indices,
    as torchvision's ImageFolder finds them (remembered while the folders are unchanged)."""
    classes, samples = _scan_cached(str(folder), _stamp(folder))
    return list(classes), list(samples)


def _names(items: list[str]) -> str:
    return ", ".join(items[:5]) + (f" and {len(items) - 5} more" if len(items) > 5 else "")


@functools.lru_cache(maxsize=16)
def _split_cached(root: str, stamps: tuple, val_fraction: float, split_seed: int):
    path, train_dir, eval_dir = _layout(root)
    classes, samples = scan(train_dir)
    if eval_dir is not None:
        eval_classes, held = scan(eval_dir)
        if eval_classes != classes:
            only_train = sorted(set(classes) - set(eval_classes))
            only_eval = sorted(set(eval_classes) - set(classes))
            raise KtBenchError(f"imagefolder: {train_dir} and {eval_dir} hold different "
                               f"classes (only in {train_dir.name}/: "
                               f"{_names(only_train) or '-'}; only in {eval_dir.name}/: "
                               f"{_names(only_eval) or '-'}); accepted: the same class "
                               "folders in both")
        return path, classes, samples, held, False
    train_idx, held_idx = stratified_split([label for _, label in samples], val_fraction,
                                           split_seed)
    return (path, classes, [samples[i] for i in train_idx], [samples[i] for i in held_idx],
            True)


def splits(root: str, val_fraction: float, split_seed: int
           ) -> tuple[Path, list[str], Samples, Samples, bool]:
    """The dataset at ``root``: its folder, classes, training and evaluation samples, and
    whether they were split from one folder (stratified, seeded by ``split_seed``)."""
    if not 0 < val_fraction < 1:
        raise ConfigError(f"imagefolder: val_fraction = {val_fraction} is invalid; accepted: "
                          "a number between 0 and 1 (exclusive)")
    path, train_dir, eval_dir = _layout(root)
    stamps = tuple(_stamp(d) for d in (train_dir, eval_dir) if d is not None)
    path, classes, train, held, split = _split_cached(str(path), stamps, val_fraction,
                                                      split_seed)
    return path, list(classes), list(train), list(held), split


def _write_split_record(data_root: str | None, path: Path, classes: list[str], train: Samples,
                        held: Samples, val_fraction: float, split_seed: int) -> Path:
    """The seeded split of one folder, written (once) as JSON under the data root's cache:
    which files train and which are held out for evaluation."""
    record = {"root": str(path), "val_fraction": val_fraction, "split_seed": split_seed,
              "classes": classes,
              "train": [os.path.relpath(p, path) for p, _ in train],
              "val": [os.path.relpath(p, path) for p, _ in held]}
    target = cache_folder(data_root) / f"imagefolder-split-{digest(record)}.json"
    if not target.is_file():
        atomic.write_json(target, record)
    return target


def _info(*, root: str, image_size: int = 32, augment: str = "cifar", resize: int | None = None,
          cache: str = "auto", cache_limit_gb: float | None = None, val_fraction: float = 0.2,
          split_seed: int = 0, workers: int = 4) -> DatasetInfo:
    check_choices("imagefolder", image_size, augment, cache, resize, cache_limit_gb, workers)
    _, classes, train, _, _ = splits(root, val_fraction, split_seed)
    return DatasetInfo(len(classes), 3, image_size, len(train))


@register_dataset("imagefolder", info=_info)
def imagefolder(data_root: str | None = None, *, root: str, image_size: int = 32,
                augment: str = "cifar", resize: int | None = None, cache: str = "auto",
                cache_limit_gb: float | None = None, val_fraction: float = 0.2,
                split_seed: int = 0, workers: int = 4,
                mean: tuple[float, ...] = IMAGENET_MEAN,
                std: tuple[float, ...] = IMAGENET_STD) -> DataBundle:
    """Your images in class folders: root/<class>/*.png|jpg, or root/{train,val}/<class>/*.png|jpg

    The layout of torchvision's ImageFolder (classes are the sorted folder names; jpg, png,
    bmp, ppm, pgm, tif and webp files; grayscale and RGBA images converted to RGB). Where
    ``root`` has ``train/`` and ``val/`` (or ``test/``) folders they are the two splits;
    otherwise ``root``'s class folders are split per class, ``val_fraction`` of each class
    held out for evaluation, chosen by a generator seeded with ``split_seed``: the same files
    every time, recorded in ``<data_root>/cache/imagefolder-split-<hash>.json`` (the bundle's
    ``split_file``). ``root`` is absolute or relative to the working directory.

    ``augment``: ``cifar`` (default: images resized to ``image_size`` square, random crop
    with image_size/8 padding and flip), ``imagenet`` (random resized crop of the centre
    ``resize`` square, default image_size * 8/7, and flip; test: resize, centre crop) or
    ``none``. ``cache``: ``memory`` decodes the images once into a memory-mapped uint8 cache
    ``<data_root>/cache/imagefolder-<hash>.*.npy`` (reused until a file, the sizes or the
    split change) augmented on the device; ``stream`` decodes them in ``workers`` DataLoader
    workers every epoch; ``auto`` (default) caches when the decoded images fit
    ``cache_limit_gb`` (default a quarter of the machine's memory). Images are normalised
    with ``mean`` and ``std`` (default ImageNet's).
    """
    what = "imagefolder"
    check_choices(what, image_size, augment, cache, resize, cache_limit_gb, workers, mean, std)
    path, classes, train, held, split = splits(root, val_fraction, split_seed)
    record: dict = {"root": str(path), "classes": classes}
    split_file = None
    if split:
        split_file = _write_split_record(data_root, path, classes, train, held, val_fraction,
                                         split_seed)
        record["split_file"] = str(split_file)
    train_source, test_source = FileSource(train, path), FileSource(held, path)
    recipe = Recipe.of(augment, image_size, resize, mean, std)
    key = ["imagefolder", str(path), train_source.identity(), test_source.identity()]
    bundle = image_bundle(what, "imagefolder", train_source, test_source, len(classes), recipe,
                          cache, cache_limit_gb, data_root, workers, key, record)
    bundle.classes = classes
    bundle.split_file = split_file
    return bundle
