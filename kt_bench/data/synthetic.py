"""``synthetic``: class templates plus Gaussian noise; tiny, instant, for tests and benches."""

from __future__ import annotations

import functools

import torch

from kt_bench.data.augment import random_crop_flip
from kt_bench.data.bundle import DatasetInfo, Split, TensorData, register_dataset


def _info(num_classes: int = 10, n_train: int = 512, image_size: int = 16,
          channels: int = 3) -> DatasetInfo:
    return DatasetInfo(num_classes, channels, image_size, n_train)


@register_dataset("synthetic", info=_info)
def synthetic(
    data_root: str | None = None,
    num_classes: int = 10,
    n_train: int = 512,
    n_test: int = 256,
    image_size: int = 16,
    channels: int = 3,
    noise: float = 1.0,
    augment: bool = False,
) -> TensorData:
    """Images = one fixed random template per class + N(0, noise²) pixels; fixed seed."""
    gen = torch.Generator().manual_seed(0)
    templates = torch.randn(num_classes, channels, image_size, image_size, generator=gen)

    def split(n: int) -> Split:
        labels = torch.arange(n) % num_classes
        noise_px = noise * torch.randn(n, channels, image_size, image_size, generator=gen)
        return Split(templates[labels] + noise_px, labels)

    aug = functools.partial(random_crop_flip, pad=2) if augment else None
    return TensorData("synthetic", split(n_train), split(n_test), num_classes, aug)
