"""``cifar10`` and ``cifar100`` through torchvision's loaders (downloaded when missing); their
pickled files are read as plain data, so a crafted file runs no code."""

from __future__ import annotations

import functools
import os
import pickle
from typing import Any

import numpy as np
import torch

from kt_bench.core.errors import KtBenchError, first_line
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


class _PlainUnpickler(pickle.Unpickler):
    """An unpickler that builds plain data only (dicts, lists, tuples, strings, bytes, numbers)
    and the globals in ``allowed``; any other global is refused, so the file runs no code."""

    def __init__(self, file, allowed: dict[tuple[str, str], Any]) -> None:
        super().__init__(file, encoding="latin1")  # the files were written by Python 2
        self._allowed = allowed

    def find_class(self, module: str, name: str) -> Any:
        """The allowed global ``module.name``; an UnpicklingError for any other."""
        try:
            return self._allowed[module, name]
        except KeyError:
            raise pickle.UnpicklingError(f"it refers to {module}.{name}") from None


def _array_globals() -> dict[tuple[str, str], Any]:
    """The globals a pickled numpy array refers to (numpy 1 and 2 name its module apart), and
    the bytes of a protocol-2 pickle: building an array this way runs no code of the file's."""
    import codecs

    core = getattr(np, "_core", None) or np.core
    rebuild = core.multiarray._reconstruct
    return {("numpy.core.multiarray", "_reconstruct"): rebuild,
            ("numpy._core.multiarray", "_reconstruct"): rebuild,
            ("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype,
            ("_codecs", "encode"): codecs.encode}


def read_pickle(path: str, arrays: bool = False) -> dict[str, Any]:
    """The dict pickled in the CIFAR file ``path``, unpickled without running code from it:
    plain data only, and numpy arrays where ``arrays``. Anything else, or a damaged file, is a
    one-line error naming the file."""
    try:
        with open(path, "rb") as fh:
            obj = _PlainUnpickler(fh, _array_globals() if arrays else {}).load()
    except pickle.UnpicklingError as exc:
        raise KtBenchError(f"{path} cannot be read: {exc}; kt-bench reads only plain data "
                           "from it (dicts, lists, strings, numbers"
                           f"{', arrays' if arrays else ''}), never code") from None
    except Exception as exc:  # noqa: BLE001 - a damaged or unreadable file is one line
        raise KtBenchError(f"{path} cannot be read: {first_line(exc)}") from None
    if not isinstance(obj, dict):
        raise KtBenchError(f"{path} holds a {type(obj).__name__}, not a dict of CIFAR data")
    return obj


def _field(batch: dict[str, Any], keys: tuple[str, ...], path: str) -> Any:
    """The first of ``keys`` in the CIFAR ``batch`` read from ``path``."""
    for key in keys:
        if key in batch:
            return batch[key]
    raise KtBenchError(f"{path} is not a CIFAR file: it has no {' nor '.join(keys)}")


def _present(cls) -> type:
    """``cls`` accepting an extracted folder whose files are all present, and reading them
    without running code from them (:func:`read_pickle`).

    torchvision checks each extracted file's MD5 at every load; a download is still checked
    against the archive's MD5 by torchvision itself. Files present are trusted, so a user's own
    copy (or a test's small files in the same format) loads.
    """
    from torchvision.datasets import VisionDataset

    class Present(cls):
        def __init__(self, root: str, train: bool = True, download: bool = False) -> None:
            # cls's own __init__ would unpickle the files with pickle.load
            VisionDataset.__init__(self, root)
            self.train = train
            if download:
                self.download()
            if not self._check_integrity():
                raise RuntimeError("Dataset not found or corrupted. You can use download=True "
                                   "to download it")
            data, self.targets = [], []
            for name, _ in self.train_list if train else self.test_list:
                path = self._file(name)
                batch = read_pickle(path, arrays=True)
                data.append(np.asarray(_field(batch, ("data",), path), dtype=np.uint8))
                self.targets.extend(_field(batch, ("labels", "fine_labels"), path))
            self.data = np.vstack(data).reshape(-1, 3, 32, 32).transpose((0, 2, 3, 1))
            self._load_meta()

        def _file(self, name: str) -> str:
            return os.path.join(self.root, self.base_folder, name)

        def _check_integrity(self) -> bool:
            return all(os.path.isfile(self._file(f))
                       for f, _ in (*self.train_list, *self.test_list))

        def _load_meta(self) -> None:
            path = self._file(self.meta["filename"])
            self.classes = _field(read_pickle(path), (self.meta["key"],), path)
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
            augment, image_size: int) -> TensorData:
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
    if image_size < 1:
        raise KtBenchError(f"{name}: image_size = {image_size} is invalid; accepted: an "
                           "integer >= 1 (32 keeps the images as they are)")
    return TensorData(name, splits[0], splits[1], num_classes, aug, mean, std,
                      resize_to=None if image_size == 32 else image_size)


def _info10(per_class: int | None = None, image_size: int = 32) -> DatasetInfo:
    return DatasetInfo(10, 3, image_size, 10 * min(per_class or 5000, 5000),
                       None if image_size == 32 else 32)


def _info100(per_class: int | None = None, image_size: int = 32) -> DatasetInfo:
    return DatasetInfo(100, 3, image_size, 100 * min(per_class or 500, 500),
                       None if image_size == 32 else 32)


@register_dataset("cifar10", info=_info10)
def cifar10(data_root: str | None = None, download: bool = True, per_class: int | None = None,
            augment: bool = True, image_size: int = 32) -> TensorData:
    """CIFAR-10: 50,000 training and 10,000 test 32x32 images, 10 classes.

    Training augmentation: random 32x32 crop of the 4-pixel zero-padded image and random
    horizontal flip (the standard CIFAR augmentation, done batched on the device); images are
    normalised per channel with the training split's mean and std. ``per_class`` keeps the
    first N training images of each class (the test split stays whole). ``image_size`` other
    than 32 resizes every batch (bilinear, on the device, after augmentation), as OFA-KD feeds
    CIFAR to 224-pixel networks; the images stay held at 32x32.
    """
    return _bundle("CIFAR10", "CIFAR-10", 10, data_root, download, per_class,
                   augment, image_size)


@register_dataset("cifar100", info=_info100)
def cifar100(data_root: str | None = None, download: bool = True, per_class: int | None = None,
             augment: bool = True, image_size: int = 32) -> TensorData:
    """CIFAR-100: 50,000 training and 10,000 test 32x32 images, 100 classes (fine labels).

    Augmentation, normalisation, ``per_class`` and ``image_size`` as for ``cifar10``.
    """
    return _bundle("CIFAR100", "CIFAR-100", 100, data_root, download,
                   per_class, augment, image_size)
