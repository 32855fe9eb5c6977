"""Small datasets written in the real on-disk formats (CIFAR python pickles, an image folder)."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import torch


def _pickle(path: Path, obj: dict) -> None:
    with open(path, "wb") as fh:
        pickle.dump(obj, fh)


def write_cifar10(root: Path, per_class_train: int, per_class_test: int, seed: int = 0) -> None:
    """``root/cifar-10-batches-py``: five data batches, a test batch and batches.meta, each a
    pickled dict with ``data`` (N x 3072 uint8, channel-major rows) and ``labels``."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    labels = np.repeat(np.arange(10), per_class_train)
    rng.shuffle(labels)
    data = rng.integers(0, 256, (len(labels), 3072), dtype=np.uint8)
    for i, part in enumerate(np.array_split(np.arange(len(labels)), 5)):
        _pickle(folder / f"data_batch_{i + 1}",
                {"batch_label": f"training batch {i + 1} of 5", "data": data[part],
                 "labels": labels[part].tolist(), "filenames": [f"{j}.png" for j in part]})
    test_labels = np.repeat(np.arange(10), per_class_test)
    _pickle(folder / "test_batch", {"batch_label": "testing batch 1 of 1",
                                    "data": rng.integers(0, 256, (len(test_labels), 3072),
                                                         dtype=np.uint8),
                                    "labels": test_labels.tolist()})
    _pickle(folder / "batches.meta", {"label_names": [f"class{i}" for i in range(10)],
                                      "num_cases_per_batch": len(labels) // 5,
                                      "num_vis": 3072})


def write_cifar100(root: Path, per_class_train: int, per_class_test: int, seed: int = 1) -> None:
    """``root/cifar-100-python``: train, test and meta pickles with ``fine_labels``."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True, exist_ok=True)
    for name, per_class in (("train", per_class_train), ("test", per_class_test)):
        fine = np.repeat(np.arange(100), per_class)
        rng.shuffle(fine)
        _pickle(folder / name, {"data": rng.integers(0, 256, (len(fine), 3072), dtype=np.uint8),
                                "fine_labels": fine.tolist(),
                                "coarse_labels": (fine // 5).tolist()})
    _pickle(folder / "meta", {"fine_label_names": [f"fine{i}" for i in range(100)],
                              "coarse_label_names": [f"coarse{i}" for i in range(20)]})


def write_image_folder(root: Path, classes: int, train_per_class: int, val_per_class: int,
                       size: int = 40) -> None:
    """``root/imagenet/{train,val}/<class>/*.JPEG``: small JPEG images, ImageFolder layout."""
    from PIL import Image

    rng = np.random.default_rng(2)
    for split, n in (("train", train_per_class), ("val", val_per_class)):
        for c in range(classes):
            folder = root / "imagenet" / split / f"n{c:08d}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"img_{i}.JPEG", quality=90)


def central_differences(fn, x: torch.Tensor, step: float, every: int = 1) -> dict[int, float]:
    """{flat index: (fn(x + step·e_i) − fn(x − step·e_i)) / (2·step)} for every ``every``-th i."""
    flat = x.detach().clone().flatten()
    out = {}
    for i in range(0, flat.numel(), every):
        plus, minus = flat.clone(), flat.clone()
        plus[i] += step
        minus[i] -= step
        out[i] = (fn(plus.view_as(x)) - fn(minus.view_as(x))).item() / (2 * step)
    return out
