"""Datasets: each builds a DataBundle of in-memory, normalised tensors.

Every module of this package but the infrastructure (``bundle``, ``augment``,
``image_cache``) and private ``_`` ones is imported here, so a new built-in dataset is one
file that registers itself with ``@register_dataset``; no list names it.
"""

from kt_bench.core.registry import import_modules
from kt_bench.data.bundle import (
    DATASETS,
    DataBundle,
    DatasetEntry,
    DatasetInfo,
    LoaderData,
    Split,
    TensorData,
    dataset_info,
    load_dataset,
    register_dataset,
)

#: Modules of this package that register no dataset.
INFRASTRUCTURE = ("augment", "bundle", "image_cache")

import_modules(__name__, __path__, INFRASTRUCTURE)

__all__ = ["DATASETS", "DataBundle", "DatasetEntry", "DatasetInfo", "LoaderData", "Split",
           "TensorData", "dataset_info", "load_dataset", "register_dataset"]
