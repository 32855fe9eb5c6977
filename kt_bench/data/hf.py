"""``hf``: a Hugging Face ``datasets`` image dataset on disk (``save_to_disk`` or parquet)."""

from __future__ import annotations

import functools
import io
import json
from pathlib import Path
from typing import Any

from kt_bench.core.errors import KtBenchError, first_line
from kt_bench.data.bundle import DataBundle, DatasetInfo, register_dataset
from kt_bench.data.image_cache import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ImageSource,
    Recipe,
    cache_folder,
    check_choices,
    file_identity,
    image_bundle,
)

ACCEPTED = ("a DatasetDict saved with save_to_disk, or parquet files DIR/<split>*.parquet, "
            "DIR/<split>/*.parquet or DIR/data/<split>-*.parquet")


def _datasets():
    """The ``datasets`` library; its absence is a one-line error naming the extra."""
    try:
        import datasets
    except ImportError:
        raise KtBenchError("dataset 'hf' needs the Hugging Face datasets library: "
                           "pip install 'kt-bench[datasets]'") from None
    return datasets


def _folder(path: str) -> Path:
    folder = Path(path).expanduser().resolve()
    if not folder.is_dir():
        raise KtBenchError(f"hf: path = {path!r} is not a folder; accepted: {ACCEPTED}")
    return folder


def _parquet_split(rel: tuple[str, ...]) -> str:
    """The split a parquet file belongs to, from its path relative to the dataset folder:
    ``<split>/x.parquet``, else the file name up to its first ``-`` or ``.``."""
    if rel[0] == "data" and len(rel) > 1:
        rel = rel[1:]
    if len(rel) > 1:
        return rel[-2]
    return rel[0].split("-")[0].split(".")[0]


def layout(folder: Path) -> tuple[str, dict[str, list[str]]]:
    """How the dataset in ``folder`` is stored, ``disk`` (save_to_disk) or ``parquet``, and
    its splits (for parquet, each split's files, sorted)."""
    if (folder / "dataset_dict.json").is_file():
        try:
            names = json.loads((folder / "dataset_dict.json").read_text())["splits"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise KtBenchError(f"hf: {folder / 'dataset_dict.json'} cannot be read: "
                               f"{first_line(exc)}") from None
        return "disk", {str(name): [] for name in names}
    if (folder / "state.json").is_file():
        raise KtBenchError(f"hf: {folder} holds one Dataset saved with save_to_disk, not a "
                           "DatasetDict; accepted: DatasetDict({'train': ..., 'test': ...})"
                           ".save_to_disk(DIR), or parquet files per split")
    files: dict[str, list[str]] = {}
    for f in sorted(folder.rglob("*.parquet")):
        files.setdefault(_parquet_split(f.relative_to(folder).parts), []).append(str(f))
    if not files:
        raise KtBenchError(f"hf: {folder} holds no dataset_dict.json and no parquet files; "
                           f"accepted: {ACCEPTED}")
    return "parquet", files


def choose_splits(folder: Path, splits: list[str], train_split: str,
                  eval_split: str | None) -> tuple[str, str]:
    """The training and evaluation splits; ``eval_split`` defaults to ``test``, else
    ``validation``. A split that is not there is a one-line error listing those that are."""
    have = ", ".join(splits)
    if eval_split is None:
        eval_split = next((s for s in ("test", "validation") if s in splits), None)
        if eval_split is None:
            raise KtBenchError(f"hf: {folder} has no 'test' or 'validation' split (splits: "
                               f"{have}); give eval_split")
    for key, name in (("train_split", train_split), ("eval_split", eval_split)):
        if name not in splits:
            raise KtBenchError(f"hf: {folder} has no split {name!r} ({key}); splits: {have}")
    return train_split, eval_split


def _features_and_rows(kind: str, folder: Path, files: dict[str, list[str]], split: str):
    """A split's features and number of rows, from metadata alone."""
    datasets = _datasets()
    if kind == "disk":
        ds = load_from_disk(folder)[split]
        return ds.features, ds.num_rows
    import pyarrow.parquet as pq

    try:
        schema = pq.read_schema(files[split][0])
        rows = sum(pq.ParquetFile(f).metadata.num_rows for f in files[split])
    except Exception as exc:  # noqa: BLE001 - a damaged parquet file is one line naming it
        raise KtBenchError(f"hf: the parquet files of split {split!r} in {folder} cannot be "
                           f"read: {first_line(exc)}") from None
    return datasets.Features.from_arrow_schema(schema), rows


def load_from_disk(folder: Path):
    """The DatasetDict saved in ``folder`` (memory-mapped; remembered until it is saved
    again)."""
    return _load_from_disk(str(folder), (folder / "dataset_dict.json").stat().st_mtime_ns)


@functools.lru_cache(maxsize=4)
def _load_from_disk(folder: str, stamp: int):
    datasets = _datasets()
    try:
        return datasets.load_from_disk(folder)
    except Exception as exc:  # noqa: BLE001 - a damaged dataset folder is one line
        raise KtBenchError(f"hf: {folder} cannot be loaded: {first_line(exc)}") from None


def columns(features: Any, split: str, folder: Path, image_column: str | None,
            label_column: str) -> tuple[str, str, list[str] | None]:
    """The image and label columns of a split, and the class names where the label is a
    ClassLabel; a column that is not there is a one-line error listing the columns."""
    datasets = _datasets()
    names = list(features)
    have = ", ".join(names)
    if image_column is None:
        images = [c for c in names if isinstance(features[c], datasets.Image)]
        image_column = "image" if "image" in names else (images[0] if images else None)
        if image_column is None:
            raise KtBenchError(f"hf: split {split!r} of {folder} has no column 'image' and no "
                               f"Image feature; columns: {have}; give image_column")
    for key, col in (("image_column", image_column), ("label_column", label_column)):
        if col not in names:
            raise KtBenchError(f"hf: split {split!r} of {folder} has no column {col!r} "
                               f"({key}); columns: {have}")
    label = features[label_column]
    return image_column, label_column, (list(label.names)
                                        if isinstance(label, datasets.ClassLabel) else None)


def _raw_labels(kind: str, folder: Path, files: dict[str, list[str]], split: str,
                column: str) -> list:
    """A split's label column, read alone."""
    if kind == "disk":
        return load_from_disk(folder)[split].data.column(column).to_pylist()
    import pyarrow.parquet as pq

    return pq.read_table(files[split], columns=[column]).column(column).to_pylist()


def class_labels(raw: dict[str, list], names: list[str] | None, column: str,
                 folder: Path) -> tuple[int, list[str] | None, dict[str, list[int]]]:
    """The number of classes, their names (where known) and each split's integer labels: a
    ClassLabel's classes (``names``), else integers 0..max, else the sorted distinct strings.
    A missing or negative label (``-1``: unlabelled) is a one-line error."""
    values = [v for labels in raw.values() for v in labels]
    if names is None and values and all(isinstance(v, str) for v in values):
        names = sorted(set(values))
        index = {n: i for i, n in enumerate(names)}
        return len(names), names, {s: [index[v] for v in labels] for s, labels in raw.items()}
    for split, labels in raw.items():
        bad = next((v for v in labels if not isinstance(v, int) or isinstance(v, bool)
                    or v < 0 or (names is not None and v >= len(names))), "ok")
        if bad != "ok":
            raise KtBenchError(f"hf: label column {column!r} of split {split!r} in {folder} "
                               f"holds {bad!r}; accepted: class indices 0.."
                               f"{len(names) - 1 if names else 'N-1'} (every image labelled)")
    n = len(names) if names is not None else max(values, default=-1) + 1
    return n, names, raw


class RowSource(ImageSource):
    """The images of one split's image column (Image feature values, ``{bytes, path}``
    structs or encoded bytes), decoded with PIL."""

    def __init__(self, dataset: Any, column: str, labels: list[int], split: str,
                 folder: Path, identity: Any) -> None:
        datasets = _datasets()
        if isinstance(dataset.features[column], datasets.Image):
            # undecoded: the encoded bytes, decoded here as every other source's images are
            dataset = dataset.cast_column(column, datasets.Image(decode=False))
        self.dataset = dataset.select_columns([column])
        self.column = column
        self.labels = labels
        self.split = split
        self.folder = folder
        self._identity = identity

    def load(self, index: int):
        """Row ``index``'s image as a PIL image."""
        import PIL.Image

        value = self.dataset[index][self.column]
        if isinstance(value, PIL.Image.Image):
            return value
        if isinstance(value, dict):
            data, path = value.get("bytes"), value.get("path")
            if data is None and path:
                with PIL.Image.open(path) as img:
                    img.load()
                    return img.copy()
            value = data
        if isinstance(value, (bytes, bytearray)):
            img = PIL.Image.open(io.BytesIO(value))
            img.load()
            return img
        raise KtBenchError(f"hf: column {self.column!r} of split {self.split!r} in "
                           f"{self.folder} holds {type(value).__name__} values, not images; "
                           "give image_column")

    def where(self, index: int) -> str:
        """The row and split."""
        return f"row {index} of split {self.split!r} in {self.folder}"

    def identity(self) -> Any:
        """The split's files (path, size, modification time) and columns."""
        return self._identity


def _describe(path: str, train_split: str, eval_split: str | None, image_column: str | None,
              label_column: str):
    folder = _folder(path)
    kind, files = layout(folder)
    train, held = choose_splits(folder, list(files), train_split, eval_split)
    found = {}
    for split in dict.fromkeys((train, held)):
        features, rows = _features_and_rows(kind, folder, files, split)
        found[split] = (*columns(features, split, folder, image_column, label_column), rows)
    return folder, kind, files, train, held, found


def _info(*, path: str, train_split: str = "train", eval_split: str | None = None,
          image_column: str | None = None, label_column: str = "label", image_size: int = 32,
          augment: str = "cifar", resize: int | None = None, cache: str = "auto",
          cache_limit_gb: float | None = None, workers: int = 4) -> DatasetInfo:
    check_choices("hf", image_size, augment, cache, resize, cache_limit_gb, workers)
    folder, kind, files, train, held, found = _describe(path, train_split, eval_split,
                                                        image_column, label_column)
    _, label, names, rows = found[train]
    if names is None:
        raw = {s: _raw_labels(kind, folder, files, s, found[s][1]) for s in found}
        n, _, _ = class_labels(raw, None, label, folder)
    else:
        n = len(names)
    return DatasetInfo(n, 3, image_size, rows)


@register_dataset("hf", info=_info)
def hf(data_root: str | None = None, *, path: str, train_split: str = "train",
       eval_split: str | None = None, image_column: str | None = None,
       label_column: str = "label", image_size: int = 32, augment: str = "cifar",
       resize: int | None = None, cache: str = "auto", cache_limit_gb: float | None = None,
       workers: int = 4, mean: tuple[float, ...] = IMAGENET_MEAN,
       std: tuple[float, ...] = IMAGENET_STD) -> DataBundle:
    """A Hugging Face dataset on disk: a DatasetDict (save_to_disk) or parquet files per split.

    ``path`` holds a ``DatasetDict`` saved with ``save_to_disk``, or parquet files laid out
    as ``path/<split>*.parquet``, ``path/<split>/*.parquet`` or (as the Hub lays them out)
    ``path/data/<split>-*.parquet``, read with ``datasets.load_dataset("parquet")`` (its
    Arrow copy kept in ``<data_root>/cache/hf``). Needs ``pip install 'kt-bench[datasets]'``.
    ``train_split`` (default ``train``) trains, ``eval_split`` (default ``test``, else
    ``validation``) is evaluated. ``image_column`` defaults to ``image``, else the first
    Image feature; ``label_column`` (default ``label``) gives the classes: a ClassLabel's,
    else integers 0..max, else the sorted distinct strings.

    ``image_size``, ``augment``, ``resize``, ``cache``, ``cache_limit_gb``, ``workers``,
    ``mean`` and ``std`` as for ``imagefolder`` (cache files
    ``<data_root>/cache/hf-<hash>.*.npy``, the hash covering the split's files).
    """
    what = "hf"
    check_choices(what, image_size, augment, cache, resize, cache_limit_gb, workers, mean, std)
    folder, kind, files, train, held, found = _describe(path, train_split, eval_split,
                                                        image_column, label_column)
    raw = {s: _raw_labels(kind, folder, files, s, found[s][1]) for s in found}
    num_classes, names, labels = class_labels(raw, found[train][2], found[train][1], folder)
    if kind == "disk":
        splits = load_from_disk(folder)
    else:
        splits = _load_parquet(folder, {s: files[s] for s in found}, data_root)
    sources = []
    for split in (train, held):
        ds = splits[split]
        ident = [split, found[split][:2],
                 file_identity(files[split] if kind == "parquet"
                               else [f["filename"] for f in ds.cache_files], folder)]
        sources.append(RowSource(ds, found[split][0], labels[split], split, folder, ident))
    recipe = Recipe.of(augment, image_size, resize, mean, std)
    key = ["hf", str(folder), sources[0].identity(), sources[1].identity()]
    record = {"path": str(folder), "train_split": train, "eval_split": held,
              "image_column": found[train][0], "label_column": found[train][1]}
    bundle = image_bundle(what, "hf", sources[0], sources[1], num_classes, recipe, cache,
                          cache_limit_gb, data_root, workers, key, record)
    bundle.classes = names
    return bundle


def _load_parquet(folder: Path, files: dict[str, list[str]], data_root: str | None):
    """The parquet splits through ``datasets.load_dataset`` (quietly)."""
    datasets = _datasets()
    shown = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bar()
    try:
        return datasets.load_dataset("parquet", data_files=files,
                                     cache_dir=str(cache_folder(data_root) / "hf"))
    except Exception as exc:  # noqa: BLE001 - a damaged parquet file is one line
        raise KtBenchError(f"hf: the parquet files in {folder} cannot be loaded: "
                           f"{first_line(exc)}") from None
    finally:
        if shown:
            datasets.enable_progress_bar()
