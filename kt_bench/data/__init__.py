"""Datasets: each builds a DataBundle of in-memory, normalised tensors."""

from kt_bench.data.bundle import (
    DATASETS,
    DataBundle,
    LoaderData,
    Split,
    TensorData,
    dataset_info,
    load_dataset,
    register_dataset,
)

# Importing the dataset modules registers their entries.
from kt_bench.data import cifar, digits, imagenet, synthetic  # noqa: E402,F401  isort: skip

__all__ = ["DATASETS", "DataBundle", "LoaderData", "Split", "TensorData", "dataset_info",
           "load_dataset", "register_dataset"]
