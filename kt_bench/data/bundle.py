"""The dataset registry and the two kinds of dataset bundle the engine trains from.

``TensorData`` holds both splits in memory (on the training device once used) and augments
whole batches with tensor ops; ``LoaderData`` streams a torch ``Dataset`` (an image folder)
through a DataLoader. Both give batches of normalised float images already on the device, in an
order fixed by (seed, epoch) and split over processes.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import os
import typing
from collections.abc import Callable, Iterator, Sized
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch

from kt_bench.core.errors import PluginError
from kt_bench.core.options import Spec, accepted_options, resolve_options
from kt_bench.core.registry import Registry, origin_of
from kt_bench.core.seeds import derived_seed

#: An augmentation applied to a whole batch on its device: ``f(images, generator) -> images``.
Augment = Callable[[torch.Tensor, torch.Generator], torch.Tensor]
#: Images and their labels.
ImageBatch = tuple[torch.Tensor, torch.Tensor]


def global_batches(n: int, batch_size: int, seed: int, epoch: int,
                   world: int = 1) -> Iterator[torch.Tensor]:
    """Index batches of one epoch, whole: a permutation fixed by (seed, epoch). A last batch
    smaller than two samples per process of ``world`` is dropped (BatchNorm needs two)."""
    gen = torch.Generator().manual_seed(derived_seed(seed, 1, epoch))
    perm = torch.randperm(n, generator=gen)
    for start in range(0, n, batch_size):
        batch = perm[start:start + batch_size]
        if batch.numel() < 2 * world:
            break
        yield batch


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int, rank: int = 0,
                  world: int = 1) -> Iterator[torch.Tensor]:
    """Process ``rank``'s share of each of :func:`global_batches` over ``world`` processes."""
    for batch in global_batches(n, batch_size, seed, epoch, world):
        yield batch[rank::world]


@dataclass
class Split:
    """Images (N, C, H, W) and integer labels (N,) of one split.

    Images are uint8 (normalised per batch with the bundle's mean and std) or float32
    (already normalised).
    """

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])


class DataBundle:
    """A dataset ready for training: batches of normalised images on the training device."""

    name: str
    num_classes: int
    train: Sized
    test: Sized

    @property
    def n_train(self) -> int:
        """Training samples."""
        return len(self.train)

    @property
    def n_test(self) -> int:
        """Test samples."""
        return len(self.test)

    def train_batches(self, epoch: int, seed: int, batch_size: int, device: torch.device,
                      rank: int = 0, world: int = 1, indices: bool = False) -> Iterator[ImageBatch]:
        """The augmented training batches of ``epoch``, this process's share of each: (images,
        labels), and with ``indices`` the samples' indices in the training set too."""
        raise NotImplementedError

    def train_labels(self) -> torch.Tensor:
        """The labels of the training set in sample-index order (CPU, int64)."""
        raise NotImplementedError

    def test_batches(self, batch_size: int, device: torch.device, rank: int = 0,
                     world: int = 1) -> Iterator[ImageBatch]:
        """The test split, each sample in exactly one process's batches."""
        raise NotImplementedError

    def probe(self, n: int = 2) -> torch.Tensor:
        """``n`` normalised training images on the CPU (for shape probing)."""
        raise NotImplementedError

    def train_in_order(self, batch_size: int, device: torch.device) -> Iterator[ImageBatch]:
        """The training split in sample-index order, each image as the test split's are seen
        (no random augmentation: a streamed dataset's training images go through its test
        transforms), for features computed once."""
        raise NotImplementedError

    @property
    def in_channels(self) -> int:
        """Channels of one image."""
        return int(self.probe(1).shape[1])

    @property
    def image_size(self) -> int:
        """The side (pixels) of the square images the networks see."""
        return int(self.probe(1).shape[-1])


@dataclass
class TensorData(DataBundle):
    """A dataset held in memory as tensors; augmentation runs batched on the device."""

    name: str
    train: Split
    test: Split
    num_classes: int
    augment: Augment | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    #: The side the networks see, when it differs from the stored images': every batch is
    #: resized (bilinear) on the device after augmentation; None: the stored side.
    resize_to: int | None = None
    _cache: dict = field(default_factory=dict, repr=False)

    @property
    def in_channels(self) -> int:
        """Channels of one image."""
        return int(self.train.images.shape[1])

    @property
    def image_size(self) -> int:
        """The side (pixels) of the images the networks see."""
        return self.resize_to or int(self.train.images.shape[-1])

    def _sized(self, x: torch.Tensor) -> torch.Tensor:
        if self.resize_to is None or x.shape[-1] == self.resize_to:
            return x
        return torch.nn.functional.interpolate(x, size=(self.resize_to, self.resize_to),
                                               mode="bilinear", align_corners=False)

    def _on(self, device: torch.device) -> dict:
        key = str(device)
        if key not in self._cache:
            self._cache.clear()
            entry = {"train": Split(self.train.images.to(device), self.train.labels.to(device)),
                     "test": Split(self.test.images.to(device), self.test.labels.to(device))}
            if self.mean is not None:
                shape = (1, -1, 1, 1)
                entry["mean"] = torch.tensor(self.mean, device=device).view(shape)
                entry["std"] = torch.tensor(self.std, device=device).view(shape)
            self._cache[key] = entry
        return self._cache[key]

    def _normalise(self, x: torch.Tensor, on: dict) -> torch.Tensor:
        if x.dtype == torch.uint8:
            return (x.float().div_(255) - on["mean"]) / on["std"]
        return x

    def train_batches(self, epoch, seed, batch_size, device, rank=0, world=1, indices=False):
        """Batches of one epoch; augmentation (crop, flip) on the device, then normalisation.

        Every process augments the whole global batch and keeps its share, so the images a
        process trains on are those of a one-process run, whatever the number of processes.
        """
        on = self._on(device)
        gen = torch.Generator(device=device).manual_seed(derived_seed(seed, 3, epoch))
        for idx in global_batches(self.n_train, batch_size, seed, epoch, world):
            idx = idx.to(device)
            x = on["train"].images[idx]
            if self.augment is not None:
                x = self.augment(x, gen)
            mine = idx[rank::world]
            batch = (self._sized(self._normalise(x[rank::world], on)), on["train"].labels[mine])
            yield (*batch, mine) if indices else batch

    def train_labels(self) -> torch.Tensor:
        """The training labels (CPU, int64)."""
        return self.train.labels.cpu().long()

    def test_batches(self, batch_size, device, rank=0, world=1):
        """The test split in order, every ``world``-th sample for process ``rank``."""
        on = self._on(device)
        idx = torch.arange(self.n_test, device=device)[rank::world]
        for start in range(0, len(idx), batch_size):
            b = idx[start:start + batch_size]
            yield self._sized(self._normalise(on["test"].images[b], on)), on["test"].labels[b]

    def train_in_order(self, batch_size: int, device: torch.device) -> Iterator[ImageBatch]:
        """The training split in order, normalised and resized, without augmentation."""
        return dataclasses.replace(self, test=self.train, augment=None, _cache={}
                                   ).test_batches(batch_size, device)

    def probe(self, n: int = 2) -> torch.Tensor:
        """The first ``n`` training images, normalised, on the CPU."""
        x = self.train.images[:n]
        if x.dtype == torch.uint8:
            mean = torch.tensor(self.mean).view(1, -1, 1, 1)
            std = torch.tensor(self.std).view(1, -1, 1, 1)
            x = (x.float() / 255 - mean) / std
        return self._sized(x)


class SeededSamples(torch.utils.data.Dataset):
    """A view of ``dataset`` indexed by (index, seed): each sample's random transforms draw
    from a CPU generator state seeded with its own seed, so augmentation depends on the seed
    alone, not on worker processes or on what ran before."""

    def __init__(self, dataset: torch.utils.data.Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item: tuple[int, int]):
        index, seed = item
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.dataset[index]


@dataclass
class LoaderData(DataBundle):
    """A dataset streamed from disk through a DataLoader (e.g. an ImageNet folder tree).

    The transforms of ``train`` and ``test`` produce normalised tensors; each training
    sample's augmentation is seeded from (seed, epoch, index), so an epoch repeats exactly
    whatever the number of ``workers``.
    """

    name: str
    train: torch.utils.data.Dataset
    test: torch.utils.data.Dataset
    num_classes: int
    workers: int = 4

    def _loader(self, dataset, batches: list[list[tuple[int, int]]], device: torch.device):
        return torch.utils.data.DataLoader(SeededSamples(dataset), batch_sampler=batches,
                                           num_workers=self.workers,
                                           pin_memory=device.type == "cuda")

    def train_batches(self, epoch, seed, batch_size, device, rank=0, world=1, indices=False):
        """Batches of one epoch loaded by worker processes."""
        base = derived_seed(seed, 3, epoch)
        batches = [[(i, derived_seed(base, i)) for i in b.tolist()]
                   for b in epoch_batches(self.n_train, batch_size, seed, epoch, rank, world)]
        for (x, y), b in zip(self._loader(self.train, batches, device), batches, strict=True):
            batch = (x.to(device, non_blocking=True), y.to(device, non_blocking=True))
            idx = torch.tensor([i for i, _ in b], device=device)
            yield (*batch, idx) if indices else batch

    def train_labels(self) -> torch.Tensor:
        """The training labels (from the dataset's ``targets``, as torchvision keeps them)."""
        targets = getattr(self.train, "targets", None)
        if targets is None:
            targets = [self.train[i][1] for i in range(len(self.train))]
        return torch.as_tensor(targets, dtype=torch.long)

    def test_batches(self, batch_size, device, rank=0, world=1):
        """The test split in order, every ``world``-th sample for process ``rank``."""
        idx = [(i, 0) for i in range(self.n_test)][rank::world]
        batches = [idx[i:i + batch_size] for i in range(0, len(idx), batch_size)]
        for x, y in self._loader(self.test, batches, device):
            yield x.to(device, non_blocking=True), y.to(device, non_blocking=True)

    def train_in_order(self, batch_size: int, device: torch.device) -> Iterator[ImageBatch]:
        """The training split in order through the test split's transform (no random
        augmentation), loaded as :meth:`test_batches` loads the test split.

        The transform is swapped where both datasets (or, under a ``Subset``, the datasets it
        views) have a ``transform`` attribute, as torchvision's ``ImageFolder`` and the user
        datasets' streamed images do; otherwise the training split goes through its own
        transforms, each sample's random draws seeded alike (index, 0)."""

        Subset = torch.utils.data.Subset

        def base(dataset: Any) -> Any:
            return base(dataset.dataset) if isinstance(dataset, Subset) else dataset

        def through(dataset: Any, transform: Any) -> Any:
            if isinstance(dataset, Subset):
                return Subset(through(dataset.dataset, transform), dataset.indices)
            plain = copy.copy(dataset)  # shallow: the samples are shared, not reloaded
            plain.transform = transform
            return plain

        train = self.train
        if hasattr(base(train), "transform") and hasattr(base(self.test), "transform"):
            train = through(train, base(self.test).transform)
        return dataclasses.replace(self, test=train).test_batches(batch_size, device)

    def probe(self, n: int = 2) -> torch.Tensor:
        """The first ``n`` test images (deterministic transforms)."""
        return torch.stack([self.test[i][0] for i in range(n)])


@dataclass(frozen=True)
class DatasetInfo:
    """What a dataset is, known without loading it (for dry runs, cost estimates and the
    grid's checks): its classes, the channels and side (pixels) of its square images, and the
    number of training images."""

    num_classes: int
    in_channels: int
    image_size: int
    n_train: int
    #: The side of the images held in memory where the networks see them resized; None:
    #: ``image_size``.
    held_size: int | None = None


#: The option the harness gives every loader itself.
LOADER_FIXED = ("data_root",)


class DatasetEntry:
    """A registered dataset: its loader ``load(data_root, **options) -> DataBundle`` and its
    ``info(**options) -> DatasetInfo``.

    The entry stands in for its loader: calling it loads, and it carries the loader's name,
    docstring and signature (``__wrapped__``), so listings and option checks read the loader.
    """

    def __init__(self, load: Callable[..., DataBundle], info: Callable[..., DatasetInfo]) -> None:
        self.load = load
        self.info = info
        functools.update_wrapper(self, load)

    def __call__(self, *args: Any, **kwargs: Any) -> DataBundle:
        """Load the dataset (as its loader)."""
        return self.load(*args, **kwargs)

    def __repr__(self) -> str:
        return f"DatasetEntry(load={self.load!r}, info={self.info!r})"

    @classmethod
    def checked(cls, name: str, load: Any, info: Any) -> DatasetEntry:
        """The entry of dataset ``name``; a loader or info that is not a function, or an info
        function taking an option the loader does not, is a one-line PluginError."""
        where = f"dataset '{name}' (from {origin_of(load)})"
        if not callable(load):
            raise PluginError(f"{where}: @register_dataset decorates the loader, a function "
                              f"f(data_root, **options) -> DataBundle, not {load!r}")
        if info is None:
            raise PluginError(f"{where} has no info function; accepted: "
                              f"@register_dataset('{name}', info=f) where f(**options) returns "
                              "a DatasetInfo(num_classes, in_channels, image_size, n_train)")
        if not callable(info):
            raise PluginError(f"{where}: info = {info!r} is not a function; accepted: "
                              "f(**options) returning a DatasetInfo(num_classes, in_channels, "
                              "image_size, n_train)")
        loader_options = accepted_options(load, LOADER_FIXED)
        extra = [k for k in accepted_options(info) if k not in loader_options]
        if extra:
            raise PluginError(f"{where}: its info function takes option(s) the loader does "
                              f"not: {', '.join(extra)}; accepted: "
                              f"{', '.join(loader_options) or '(none)'}")
        return cls(load, info)


#: Every dataset by name: its loader and its info function.
DATASETS: Registry[DatasetEntry] = Registry("dataset")

Loader = TypeVar("Loader", bound=Callable[..., DataBundle])


def register_dataset(name: str, info: Callable[..., DatasetInfo] | None = None
                     ) -> Callable[[Loader], Loader]:
    """Decorator registering a loader ``f(data_root=None, **options) -> DataBundle`` as the
    dataset ``name``, described by ``info(**options) -> DatasetInfo`` (required; it takes
    the loader's options that change what it describes, with the same defaults).

    The loader's keyword arguments are the dataset's options, checked and resolved from its
    signature (:func:`~kt_bench.core.options.resolve_options`) as a model's or a method's."""

    def wrap(load: Loader) -> Loader:
        DATASETS.register(name, DatasetEntry.checked(name, load, info))
        return load

    return wrap


def holds_in_memory(name: str) -> bool:
    """Whether the dataset ``name`` holds its splits in memory (its loader returns
    :class:`TensorData`) rather than streaming them from disk; False where its loader does
    not say."""
    try:
        returns = typing.get_type_hints(DATASETS.get(name).load).get("return")
    except Exception:  # noqa: BLE001 - a plugin's odd annotation: not known to be in memory
        return False
    return isinstance(returns, type) and issubclass(returns, TensorData)


def load_dataset(spec: Spec | str, data_root: str | None = None) -> DataBundle:
    """Build the dataset ``spec``; unknown names, unknown options and options of the wrong
    type are one-line errors."""
    spec = Spec.parse(spec, "dataset")
    entry = DATASETS.get(spec.name)
    options = resolve_options(entry.load, spec.options, f"dataset '{spec.name}'", LOADER_FIXED)
    return entry.load(data_root=data_root, **options)


def dataset_info(spec: Spec | str) -> DatasetInfo:
    """The :class:`DatasetInfo` of ``spec`` without loading any data. The spec's options are
    checked as :func:`load_dataset` checks them; the info function gets those it takes."""
    spec = Spec.parse(spec, "dataset")
    entry = DATASETS.get(spec.name)
    what = f"dataset '{spec.name}'"
    resolve_options(entry.load, spec.options, what, LOADER_FIXED)
    taken = accepted_options(entry.info)
    given = {k: v for k, v in spec.options.items() if k in taken}
    return entry.info(**resolve_options(entry.info, given, what))


def data_root(root: str | os.PathLike | None) -> Path:
    """Where datasets live: ``root``, else ``$KT_BENCH_DATA``, else ``~/.cache/kt-bench/data``."""
    if root:
        return Path(root).expanduser()
    env = os.environ.get("KT_BENCH_DATA")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "kt-bench" / "data"


def channel_stats(images: torch.Tensor, chunk: int = 1 << 24
                  ) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std (unbiased) of uint8 images (N, C, H, W), in the [0, 1] scale.

    Counted about ``chunk`` pixel values at a time, so memory stays bounded however many
    images there are (a memory-mapped training split is never converted whole)."""
    channels = images.shape[1]
    step = max(1, chunk // max(1, images[:1].numel()))
    counts = torch.zeros(channels, 256, dtype=torch.int64)  # how often each value occurs
    for start in range(0, len(images), step):
        part = images[start:start + step]
        for c in range(channels):
            counts[c] += torch.bincount(part[:, c].reshape(-1), minlength=256)
    # sums from the counts are exact integers: the only rounding is each final division
    values = torch.arange(256, dtype=torch.int64)
    sums, squares = (counts * values).sum(1).tolist(), (counts * values ** 2).sum(1).tolist()
    n = images.numel() // channels
    var = [(n * q - s * s) / (n * max(n - 1, 1)) for s, q in zip(sums, squares, strict=True)]
    return tuple(s / (255 * n) for s in sums), tuple(v ** 0.5 / 255 for v in var)


def normalise(train: torch.Tensor, test: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Standardise float splits per channel with the training split's mean and std."""
    mean = train.mean(dim=(0, 2, 3), keepdim=True)
    std = train.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-6)
    return (train - mean) / std, (test - mean) / std


def first_per_class(labels: torch.Tensor, per_class: int | None) -> torch.Tensor:
    """Indices of the first ``per_class`` samples of every class (all when None), in order."""
    if per_class is None:
        return torch.arange(len(labels))
    keep = torch.zeros(len(labels), dtype=torch.bool)
    for cls in labels.unique():
        keep[torch.nonzero(labels == cls).flatten()[:per_class]] = True
    return torch.nonzero(keep).flatten()
