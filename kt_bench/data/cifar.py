"""``cifar10`` and ``cifar100`` through torchvision's loaders (downloaded when missing)."""

from __future__ import annotations

import functools
import os
import pickle

import torch

from kt_bench.data.augment import random_crop_flip
from kt_bench.data.bundle import (
    DatasetInfo,
    Split,
    TensorData,
    channel_stats,
    first_per_class,
    register_dataset,
)
from kt_bench.data.bundle import data_root as resolve_data_root
from kt_bench.errors import KtBenchError


def _present(cls) -> type:
    """``cls`` accepting an extracted folder whose files are all present.

    torchvision checks each extracted file's MD5 at every load; a download is still checked
    against the archive's MD5 by torchvision itself. Files present are trusted, so a user's own
    copy (or a test's small files in the same format) loads.
    """

    class Present(cls):
        def _check_integrity(self) -> bool:
            folder = os.path.join(self.root, self.base_folder)
            return all(os.path.isfile(os.path.join(folder, f))
                       for f, _ in (*self.train_list, *self.test_list))

        def _load_meta(self) -> None:
            path = os.path.join(self.root, self.base_folder, self.meta["filename"])
            with open(path, "rb") as fh:
                meta = pickle.load(fh, encoding="latin1")
            self.classes = meta[self.meta["key"]]
            self.class_to_idx = {c: i for i, c in enumerate(self.classes)}

    Present.__name__ = cls.__name__
    return Present


def _load(cls, name: str, root, download: bool, train: bool):
    root = resolve_data_root(root)
    try:
        return _present(cls)(str(root), train=train, download=download)
    except RuntimeError as exc:  # not found and not downloaded
        raise KtBenchError(f"{name} is not in {root} ({exc}); pass --data-root with the "
                           f"python version of {name} in it, or allow the download") from None
    except OSError as exc:  # the download failed (no network, disk full)
        raise KtBenchError(f"{name} is not in {root} and the download failed: {exc}") from None


def _bundle(loader: str, name: str, num_classes: int, root, download, per_class,
            augment) -> TensorData:
    import torchvision  # here, not at import: it costs a second that other datasets never pay

    cls = getattr(torchvision.datasets, loader)
    splits = []
    for train in (True, False):
        ds = _load(cls, name, root, download, train)
        images = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()
        labels = torch.tensor(ds.targets, dtype=torch.long)
        keep = first_per_class(labels, per_class if train else None)
        splits.append(Split(images[keep], labels[keep]))
    mean, std = channel_stats(splits[0].images)
    aug = functools.partial(random_crop_flip, pad=4, flip=True) if augment else None
    return TensorData(name, splits[0], splits[1], num_classes, aug, mean, std)


def _info10(per_class: int | None = None) -> DatasetInfo:
    return DatasetInfo(10, 3, 32, 10 * min(per_class or 5000, 5000))


def _info100(per_class: int | None = None) -> DatasetInfo:
    return DatasetInfo(100, 3, 32, 100 * min(per_class or 500, 500))


@register_dataset("cifar10", _info10)
def cifar10(data_root: str | None = None, download: bool = True, per_class: int | None = None,
            augment: bool = True) -> TensorData:
    """CIFAR-10: 50,000 training and 10,000 test 32x32 images, 10 classes.

    Training augmentation: random 32x32 crop of the 4-pixel zero-padded image and random
    horizontal flip (the standard CIFAR augmentation, done batched on the device); images are
    normalised per channel with the training split's mean and std. ``per_class`` keeps the
    first N training images of each class (the test split stays whole).
    """
    return _bundle("CIFAR10", "CIFAR-10", 10, data_root, download, per_class,
                   augment)


@register_dataset("cifar100", _info100)
def cifar100(data_root: str | None = None, download: bool = True, per_class: int | None = None,
             augment: bool = True) -> TensorData:
    """CIFAR-100: 50,000 training and 10,000 test 32x32 images, 100 classes (fine labels).

    Augmentation, normalisation and ``per_class`` as for ``cifar10``.
    """
    return _bundle("CIFAR100", "CIFAR-100", 100, data_root, download,
                   per_class, augment)
