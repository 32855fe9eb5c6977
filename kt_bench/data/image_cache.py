"""The shared pipeline of the user-data datasets (``imagefolder``, ``hf``): decoding, sizing,
caching and augmenting images, whatever they are read from.

An :class:`ImageSource` lists one split's images (an image folder's files, a Hugging Face
split's rows) and a :class:`Recipe` says how they are sized and augmented. :func:`image_bundle`
either decodes both splits once into memory-mapped uint8 ``.npy`` files under
``<data_root>/cache/`` and returns a :class:`TensorData` augmented in batches on the device, or
streams them through DataLoader workers with torchvision's transforms (a :class:`LoaderData`).
Both forms size and normalise the test images alike and draw their training crops from the
same stored square; they are not bit for bit the same (the device crops resize bilinearly
without antialiasing, torchvision's transforms with it, and the two draw from different
random streams), so a result depends slightly on which form ran (``cache`` chooses it;
``auto`` by the memory budget).
"""

from __future__ import annotations

import functools
import os
import traceback
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kt_bench.core import atomic
from kt_bench.core.digests import json_hash
from kt_bench.core.errors import ConfigError, KtBenchError, first_line
from kt_bench.core.locks import FileLock
from kt_bench.data.augment import random_crop_flip, random_resized_crop
from kt_bench.data.bundle import Augment, DataBundle, LoaderData, Split, TensorData
from kt_bench.data.bundle import data_root as resolve_data_root

#: The augmentations a user dataset accepts.
AUGMENTS = ("cifar", "imagenet", "none")
#: Where a user dataset's decoded images live.
CACHE_MODES = ("auto", "memory", "stream")
#: The usual ImageNet channel statistics (what pretrained networks expect), the default
#: normalisation of user data in both cache modes.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: Images decoded by one thread at a time while a cache is built.
CHUNK = 64
#: The version of the cache files' layout (part of their key).
CACHE_FORMAT = 1


class ImageSource:
    """One split's images: their integer ``labels`` and, by index, each image as an RGB PIL
    image (:meth:`image`) and where it came from (:meth:`where`)."""

    labels: list[int]

    def __len__(self) -> int:
        return len(self.labels)

    def load(self, index: int) -> Any:
        """Image ``index`` as read, a PIL image in any mode."""
        raise NotImplementedError

    def where(self, index: int) -> str:
        """Image ``index`` named for an error message (a file, a split's row)."""
        raise NotImplementedError

    def identity(self) -> Any:
        """What the cache key hashes (JSON-able): whatever changes when the images do."""
        raise NotImplementedError

    def image(self, index: int) -> Any:
        """Image ``index`` as an RGB PIL image (grayscale, palette and RGBA converted); an
        image that cannot be decoded is a one-line error naming it."""
        try:
            img = self.load(index)
            return img if img.mode == "RGB" else img.convert("RGB")
        except KtBenchError:
            raise
        except Exception as exc:  # noqa: BLE001 - any decoder failure is one line naming it
            raise KtBenchError(f"cannot read image {self.where(index)}: "
                               f"{first_line(exc)}") from None


def check_choices(what: str, image_size: int, augment: str, cache: str,
                  resize: int | None = None, cache_limit_gb: float | None = None,
                  workers: int = 0, mean: tuple[float, ...] = IMAGENET_MEAN,
                  std: tuple[float, ...] = IMAGENET_STD) -> None:
    """The options common to the user datasets checked; a bad one is a one-line
    ConfigError naming ``what``, the option and what is accepted."""
    if image_size < 1:
        raise ConfigError(f"{what}: image_size = {image_size} is invalid; accepted: an "
                          "integer >= 1")
    if augment not in AUGMENTS:
        raise ConfigError(f"{what}: augment = {augment!r} is invalid; accepted: "
                          f"{', '.join(repr(a) for a in AUGMENTS)}")
    if cache not in CACHE_MODES:
        raise ConfigError(f"{what}: cache = {cache!r} is invalid; accepted: "
                          f"{', '.join(repr(c) for c in CACHE_MODES)}")
    if resize is not None and resize < image_size:
        raise ConfigError(f"{what}: resize = {resize} is invalid; accepted: an integer >= "
                          f"image_size ({image_size})")
    if cache_limit_gb is not None and not cache_limit_gb > 0:
        raise ConfigError(f"{what}: cache_limit_gb = {cache_limit_gb} is invalid; accepted: "
                          "a number > 0")
    if workers < 0:
        raise ConfigError(f"{what}: workers = {workers} is invalid; accepted: an integer >= 0")
    if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
        raise ConfigError(f"{what}: mean = {list(mean)}, std = {list(std)} are invalid; "
                          "accepted: three numbers each (R, G, B), std > 0")


@dataclass(frozen=True)
class Recipe:
    """How a user dataset's images are sized, augmented and normalised.

    ``cifar``: every image resized to ``image_size`` x ``image_size``; training adds a random
    crop of the zero-padded image (padding ``image_size / 8``, 4 at 32) and a horizontal flip.
    ``imagenet``: training images are the centre ``resize`` x ``resize`` square of the image
    resized to ``resize`` on its shorter side, then a random resized crop to ``image_size``
    (scale 0.08-1, ratio 3/4-4/3) and a flip; test images are resized to ``resize`` and
    centre-cropped to ``image_size``. ``none``: resized as for ``cifar``, never augmented.
    """

    augment: str
    image_size: int
    resize: int
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD

    @classmethod
    def of(cls, augment: str, image_size: int, resize: int | None = None,
           mean: tuple[float, ...] = IMAGENET_MEAN,
           std: tuple[float, ...] = IMAGENET_STD) -> Recipe:
        """The recipe; ``resize`` defaults to ``image_size * 8 / 7`` (256 for 224) and counts
        for ``imagenet`` alone."""
        if augment != "imagenet":
            resize = image_size
        elif resize is None:
            resize = int(round(image_size * 8 / 7))
        return cls(augment, image_size, resize, tuple(mean), tuple(std))

    @property
    def pad(self) -> int:
        """The padding of the ``cifar`` random crop."""
        return max(1, round(self.image_size / 8))

    def side(self, train: bool) -> int:
        """The side of the stored (cached) images of a split."""
        return self.resize if train and self.augment == "imagenet" else self.image_size

    def fixed(self, img: Any, train: bool) -> Any:
        """The deterministic part of the transform of an RGB PIL image: what is cached."""
        from torchvision.transforms import functional as TF

        if self.augment == "imagenet":
            img = TF.resize(img, self.resize)
            return TF.center_crop(img, self.side(train))
        return TF.resize(img, [self.image_size, self.image_size])

    def transform(self, train: bool) -> Callable[[Any], torch.Tensor]:
        """The whole transform of a streamed RGB PIL image, to a normalised float tensor."""
        from torchvision import transforms as T

        steps: list[Any] = [functools.partial(self.fixed, train=train)]
        if train and self.augment == "cifar":
            steps += [T.RandomCrop(self.image_size, padding=self.pad),
                      T.RandomHorizontalFlip()]
        elif train and self.augment == "imagenet":
            steps += [T.RandomResizedCrop(self.image_size), T.RandomHorizontalFlip()]
        return T.Compose([*steps, T.ToTensor(), T.Normalize(self.mean, self.std)])

    def device_augment(self) -> Augment | None:
        """The batched augmentation of cached (uint8) training images on their device."""
        if self.augment == "cifar":
            return functools.partial(random_crop_flip, pad=self.pad, flip=True)
        if self.augment == "imagenet":
            return functools.partial(random_resized_crop, size=self.image_size, flip=True)
        return None


class SourceImages(torch.utils.data.Dataset):
    """A source's images through a transform, as a torch Dataset (with torchvision's
    ``targets``) that DataLoader workers can read."""

    def __init__(self, source: ImageSource, transform: Callable[[Any], torch.Tensor]) -> None:
        self.source = source
        self.transform = transform
        self.targets = list(source.labels)

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.transform(self.source.image(index)), self.targets[index]


@dataclass
class CachedImages(TensorData):
    """A user dataset decoded into the memory-mapped cache, augmented on the device. Its
    stored training images may be larger than the images trained on (``imagenet``: the
    ``resize`` square before the random resized crop), so shapes are probed on the test
    split, stored at ``image_size``."""

    @property
    def image_size(self) -> int:
        """The side the networks see: the test images' (the stored training images may be the
        larger ``resize`` square the random crops are cut from)."""
        return int(self.test.images.shape[-1])

    def probe(self, n: int = 2) -> torch.Tensor:
        """The first ``n`` test images, normalised, on the CPU (at the side trained on)."""
        x = self.test.images[:n].float() / 255
        mean = torch.tensor(self.mean).view(1, -1, 1, 1)
        std = torch.tensor(self.std).view(1, -1, 1, 1)
        return (x - mean) / std


def _worker_error(exc: KtBenchError) -> KtBenchError:
    """A kt-bench error re-raised by a DataLoader from a worker ("Caught ... in DataLoader
    worker process N" and the worker's traceback) as the worker's own one-line message."""
    text = str(exc)
    if not text.startswith("Caught "):
        return exc
    last = [line for line in text.splitlines() if line.strip()][-1]
    head, sep, message = last.partition(": ")
    return KtBenchError(message if sep and "Error" in head else last)


@dataclass
class StreamedImages(LoaderData):
    """A user dataset streamed from its source by DataLoader workers; an image that cannot
    be read stops the run with a one-line error naming it, as in the cached form."""

    @staticmethod
    def _one_line(batches: Iterator) -> Iterator:
        try:
            yield from batches
            return
        except KtBenchError as exc:
            # the re-raised error and its traceback form a cycle holding the DataLoader;
            # cleared, the loader is freed now and its workers stop at once, not seconds
            # later at a garbage collection
            traceback.clear_frames(exc.__traceback__)
            error = _worker_error(exc)
        raise error

    def train_batches(self, epoch, seed, batch_size, device, rank=0, world=1, indices=False):
        """Batches of one epoch loaded by worker processes."""
        return self._one_line(super().train_batches(epoch, seed, batch_size, device, rank,
                                                    world, indices))

    def test_batches(self, batch_size, device, rank=0, world=1):
        """The test split in order, every ``world``-th sample for process ``rank``."""
        return self._one_line(super().test_batches(batch_size, device, rank, world))


def physical_memory() -> float:
    """This machine's memory in bytes; infinite where the system does not say."""
    try:
        return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (AttributeError, ValueError, OSError):
        return float("inf")


def cached_bytes(n_train: int, n_test: int, recipe: Recipe) -> int:
    """The bytes the decoded splits take in the cache (uint8, RGB)."""
    return 3 * (n_train * recipe.side(True) ** 2 + n_test * recipe.side(False) ** 2)


def use_cache(cache: str, n_train: int, n_test: int, recipe: Recipe,
              cache_limit_gb: float | None) -> bool:
    """Whether the splits are decoded into the memory cache: always for ``memory``, never for
    ``stream``, and for ``auto`` when they fit ``cache_limit_gb`` (default: a quarter of this
    machine's memory)."""
    if cache != "auto":
        return cache == "memory"
    limit = cache_limit_gb * 1e9 if cache_limit_gb is not None else physical_memory() / 4
    return cached_bytes(n_train, n_test, recipe) <= limit


def digest(obj: Any) -> str:
    """A short stable hash of the JSON-able ``obj``."""
    return json_hash(obj, 16)


def file_identity(paths: list[str], root: Path) -> list[list[Any]]:
    """Each file's path (relative to ``root``), size and modification time: what changes
    when a file does."""
    out = []
    for path in paths:
        st = os.stat(path)
        out.append([os.path.relpath(path, root), st.st_size, st.st_mtime_ns])
    return out


def cache_folder(data_root: str | None) -> Path:
    """Where decoded user datasets are cached: ``<data_root>/cache``."""
    return resolve_data_root(data_root) / "cache"


def _write_split(path: Path, source: ImageSource, recipe: Recipe, train: bool,
                 threads: int) -> None:
    """Decode ``source`` into the uint8 array file ``path`` (N, 3, side, side), written
    atomically, ``threads`` images chunks decoding at once."""
    side = recipe.side(train)
    n = len(source)

    def decode(start: int) -> np.ndarray:
        out = np.empty((min(CHUNK, n - start), 3, side, side), dtype=np.uint8)
        for k in range(len(out)):
            img = recipe.fixed(source.image(start + k), train)
            out[k] = np.asarray(img, dtype=np.uint8).transpose(2, 0, 1)
        return out

    def write(fh) -> None:
        header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)),
                  "fortran_order": False, "shape": (n, 3, side, side)}
        np.lib.format.write_array_header_1_0(fh, header)
        pool = ThreadPoolExecutor(max(1, threads))
        try:
            for chunk in pool.map(decode, range(0, n, CHUNK)):
                fh.write(chunk.tobytes())
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    # the atomic writer's own (temporary file, fsync, rename), fed chunk by chunk
    atomic.write_through(path, write)


def _read_split(path: Path, n: int, side: int) -> torch.Tensor | None:
    """The cached images in ``path`` (memory-mapped), or None where the file is missing or
    not the expected (n, 3, side, side) uint8 array."""
    try:
        # copy-on-write: the tensor is writable, the file is never changed
        array = np.load(path, mmap_mode="c")
    except (OSError, ValueError):
        return None
    if array.dtype != np.uint8 or array.shape != (n, 3, side, side):
        return None
    return torch.from_numpy(array)


def cached_splits(prefix: Path, train: ImageSource, test: ImageSource, recipe: Recipe,
                  threads: int, record: dict[str, Any]) -> tuple[Split, Split]:
    """Both splits decoded into ``<prefix>.train.npy`` and ``<prefix>.test.npy`` (once: a
    complete cache, marked by ``<prefix>.json`` written last, is reused), memory-mapped.
    ``record`` is kept in the JSON beside them."""
    meta_path = prefix.with_name(prefix.name + ".json")
    paths = {s: prefix.with_name(f"{prefix.name}.{s}.npy") for s in ("train", "test")}
    sources = {"train": train, "test": test}

    def read() -> tuple[Split, Split] | None:
        meta = atomic.read_json(meta_path)
        if not isinstance(meta, dict):
            return None
        splits = []
        for name, source in sources.items():
            images = _read_split(paths[name], len(source), recipe.side(name == "train"))
            if images is None or meta.get(name, {}).get("labels") != source.labels:
                return None
            splits.append(Split(images, torch.tensor(source.labels, dtype=torch.long)))
        return splits[0], splits[1]

    found = read()
    if found is not None:
        return found
    prefix.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(prefix.with_name(prefix.name + ".lock")):
        found = read()  # another process may have built it while this one waited
        if found is not None:
            return found
        for name, source in sources.items():
            _write_split(paths[name], source, recipe, name == "train", threads)
        atomic.write_json(meta_path, {**record, "format": CACHE_FORMAT,
                                      **{n: {"n": len(s), "labels": s.labels}
                                         for n, s in sources.items()}})
    found = read()
    if found is None:
        raise KtBenchError(f"the image cache {prefix}.*.npy could not be read back after "
                           "it was written")
    return found


def image_bundle(name: str, kind: str, train: ImageSource, test: ImageSource,
                 num_classes: int, recipe: Recipe, cache: str, cache_limit_gb: float | None,
                 data_root: str | None, workers: int, key: Any,
                 record: dict[str, Any] | None = None) -> DataBundle:
    """The dataset ``name`` built from its two splits as ``cache`` says (see
    :func:`use_cache`): a :class:`CachedImages` over the memory-mapped cache
    ``<data_root>/cache/<kind>-<hash>.{train,test}.npy``, where the hash covers ``key`` (what
    identifies the images), the recipe's sizes and the cache format; else a
    :class:`StreamedImages` read by ``workers`` DataLoader workers."""
    if use_cache(cache, len(train), len(test), recipe, cache_limit_gb):
        sizes = {"augment_store": recipe.augment == "imagenet", "image_size": recipe.image_size,
                 "resize": recipe.resize, "format": CACHE_FORMAT}
        prefix = cache_folder(data_root) / f"{kind}-{digest([key, sizes])}"
        tr, te = cached_splits(prefix, train, test, recipe, workers, record or {})
        return CachedImages(name, tr, te, num_classes, recipe.device_augment(), recipe.mean,
                            recipe.std)
    return StreamedImages(name, SourceImages(train, recipe.transform(True)),
                          SourceImages(test, recipe.transform(False)), num_classes, workers)


def stratified_split(labels: list[int], fraction: float, seed: int
                     ) -> tuple[list[int], list[int]]:
    """Indices of a deterministic per-class split into (train, held out), each sorted:
    ``round(n * fraction)`` of each class's ``n`` held out (at most ``n - 1``, so every class
    keeps a training image), chosen by a generator seeded with (``seed``, class) so a class's
    split does not depend on the others."""
    by_class: dict[int, list[int]] = {}
    for i, label in enumerate(labels):
        by_class.setdefault(label, []).append(i)
    train: list[int] = []
    held: list[int] = []
    for label, idx in sorted(by_class.items()):
        order = np.random.default_rng([seed, label]).permutation(len(idx))
        k = min(int(round(len(idx) * fraction)), len(idx) - 1)
        held += [idx[j] for j in order[:k]]
        train += [idx[j] for j in order[k:]]
    return sorted(train), sorted(held)
