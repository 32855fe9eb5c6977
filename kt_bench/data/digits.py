"""``digits``: scikit-learn's bundled handwritten digits (1,797 real 8x8 images), offline."""

from __future__ import annotations

import functools

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


def _info(image_size: int = 16, test_fraction: float = 0.2) -> DatasetInfo:
    return DatasetInfo(10, 1, image_size, 1797 - round(1797 * test_fraction))


@register_dataset("digits", _info)
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
    from sklearn.datasets import load_digits

    raw = load_digits()
    images = torch.tensor(raw.images, dtype=torch.float32).unsqueeze(1) / 16.0
    if image_size != images.shape[-1]:
        images = F.interpolate(images, size=(image_size, image_size), mode="bilinear",
                               align_corners=False)
    labels = torch.tensor(raw.target, dtype=torch.long)
    tr, te = stratified_split(raw.target, test_fraction)
    train_x, test_x = normalise(images[tr], images[te])
    aug = (functools.partial(random_crop_flip, pad=max(1, image_size // 8), flip=False)
           if augment else None)
    return TensorData("digits", Split(train_x, labels[tr]), Split(test_x, labels[te]), 10, aug)
