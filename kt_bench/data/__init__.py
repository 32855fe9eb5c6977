"""Datasets: each builds a DataBundle of in-memory, normalised tensors."""

from kt_bench.data.bundle import DATASETS, DataBundle, Split, load_dataset, register_dataset

# Importing the dataset modules registers their entries.
from kt_bench.data import digits, synthetic  # noqa: E402,F401  isort: skip

__all__ = ["DATASETS", "DataBundle", "Split", "load_dataset", "register_dataset"]
