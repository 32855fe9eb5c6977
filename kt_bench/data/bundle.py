"""The dataset registry and the in-memory bundle every dataset builder returns."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from kt_bench.registry import Registry
from kt_bench.spec import Spec, check_options

#: An augmentation applied to a whole batch on its device: ``f(images, generator) -> images``.
Augment = Callable[[torch.Tensor, torch.Generator], torch.Tensor]


@dataclass
class Split:
    """Images (N, C, H, W, float32, normalised) and integer labels (N,) of one split."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])


@dataclass
class DataBundle:
    """A dataset ready for training: both splits, its shape facts and its train augmentation."""

    name: str
    train: Split
    test: Split
    num_classes: int
    augment: Augment | None = None

    @property
    def in_channels(self) -> int:
        """Channels of one image."""
        return int(self.train.images.shape[1])

    @property
    def image_size(self) -> tuple[int, int]:
        """(H, W) of one image."""
        return tuple(self.train.images.shape[2:])  # type: ignore[return-value]


#: Builders ``f(data_root, **options) -> DataBundle``.
DATASETS: Registry[Callable[..., DataBundle]] = Registry("dataset")


def register_dataset(name: str) -> Callable:
    """Decorator registering a dataset builder under ``name``."""
    return DATASETS.decorator(name)


def load_dataset(spec: Spec | str, data_root: str | None = None) -> DataBundle:
    """Build the dataset ``spec``; unknown names and options are one-line errors."""
    spec = Spec.parse(spec, "dataset")
    builder = DATASETS.get(spec.name)
    check_options(builder, spec.options, f"dataset '{spec.name}'", ("data_root",))
    return builder(data_root=data_root, **spec.options)


def normalise(train: torch.Tensor, test: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Standardise both splits per channel with the training split's mean and std."""
    mean = train.mean(dim=(0, 2, 3), keepdim=True)
    std = train.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-6)
    return (train - mean) / std, (test - mean) / std
