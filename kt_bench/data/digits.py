"""``digits``: scikit-learn's bundled handwritten digits (1,797 real 8x8 images), offline."""

from __future__ import annotations

import functools
import gzip
import importlib.util
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from kt_bench.data.augment import random_crop_flip
from kt_bench.data.bundle import DatasetInfo, Split, TensorData, normalise, register_dataset


def stratified_split(labels: np.ndarray, test_fraction: float, seed: int = 0) -> tuple:
    """Deterministic per-class split of indices into (train, test)."""
    rng = np.random.RandomState(seed)
    train, test = [], []
    for cls in np.unique(labels):
        idx = np.flatnonzero(labels == cls)
        rng.shuffle(idx)
        n_test = int(round(len(idx) * test_fraction))
        test.extend(idx[:n_test])
        train.extend(idx[n_test:])
    return np.sort(np.array(train)), np.sort(np.array(test))


def read_digits() -> tuple[np.ndarray, np.ndarray]:
    """The 1,797 digit images (N, 8, 8; values 0..16) and their labels, as scikit-learn's
    ``load_digits`` gives them, read from the file scikit-learn ships, without importing
    scikit-learn (its import alone takes longer than the rest of loading the data)."""
    spec = importlib.util.find_spec("sklearn")  # finds the package without running it
    path = (Path(spec.origin).parent / "datasets" / "data" / "digits.csv.gz"
            if spec is not None and spec.origin else None)
    if path is None or not path.is_file():  # another layout: scikit-learn's own loader
        from sklearn.datasets import load_digits

        raw = load_digits()
        return raw.images, raw.target
    with gzip.open(path, "rt") as f:
        data = np.loadtxt(f, delimiter=",")
    return data[:, :-1].reshape(-1, 8, 8), data[:, -1].astype(int)


def _info(image_size: int = 16, test_fraction: float = 0.2) -> DatasetInfo:
    return DatasetInfo(10, 1, image_size, 1797 - round(1797 * test_fraction))


@register_dataset("digits", info=_info)
def digits(
    data_root: str | None = None,
    image_size: int = 16,
    test_fraction: float = 0.2,
    augment: bool = True,
) -> TensorData:
    """Handwritten digits, 10 classes, 1 channel, resized to ``image_size``; a fixed 80/20 split.

    Augmentation (when on): random shifts of up to 1/8 of the image size; no flips (digits
    are not mirror-symmetric).
    """
    pixels, target = read_digits()
    images = torch.tensor(pixels, dtype=torch.float32).unsqueeze(1) / 16.0
    if image_size != images.shape[-1]:
        images = F.interpolate(images, size=(image_size, image_size), mode="bilinear",
                               align_corners=False)
    labels = torch.tensor(target, dtype=torch.long)
    tr, te = stratified_split(target, test_fraction)
    train_x, test_x = normalise(images[tr], images[te])
    aug = (functools.partial(random_crop_flip, pad=max(1, image_size // 8), flip=False)
           if augment else None)
    return TensorData("digits", Split(train_x, labels[tr]), Split(test_x, labels[te]), 10, aug)
