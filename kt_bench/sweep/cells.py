"""Cells: one (dataset, teacher/student pair, method, seed, recipe) point of a grid."""

from __future__ import annotations

import importlib.metadata
import json
import os
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kt_bench.core import atomic
from kt_bench.core.digests import json_hash, sha256_of_file
from kt_bench.core.errors import KtBenchError
from kt_bench.core.options import Spec
from kt_bench.sweep.config import Grid, Recipe, merge_options
from kt_bench.sweep.teacher_fetch import record_mismatch


def config_hash(config: Any, length: int = 12) -> str:
    """A stable short hash of a JSON-able config."""
    return json_hash(config, length)


#: SHA-256 of the files already hashed by this process, by absolute path and what a change
#: of content changes (size, modification and change time, inode: a file replaced by another).
_digests: dict[tuple[str, int, int, int, int], str] = {}


def file_sha256(path: str | os.PathLike) -> str | None:
    """The SHA-256 (hex) of the content of the file ``path``; None when there is no such file
    (whoever loads it says so). Each file is read once per process while it stays the same
    file with the same size and times. A file this user may not read is an
    :class:`~kt_bench.core.errors.UnreadableFileError`."""
    absolute = os.path.abspath(path)
    try:
        st = os.stat(absolute)
        if not stat.S_ISREG(st.st_mode):
            return None
        key = (absolute, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)
        if key not in _digests:
            _digests[key] = sha256_of_file(absolute)
    except PermissionError:
        raise atomic.unreadable(absolute) from None
    except OSError:
        return None
    return _digests[key]


def model_identity(spec: Spec) -> dict[str, Any]:
    """What determines model ``spec``'s weights, for cell ids and teacher cache keys: its
    options, a ``checkpoint`` file by content (SHA-256; the path where it is missing: the same
    file by another path is the same model, a changed file another) and, for timm's
    ``pretrained`` weights, the timm version that fetches them."""
    identity = spec.to_dict()
    checkpoint = identity.get("checkpoint")
    if isinstance(checkpoint, str):
        digest = file_sha256(os.path.expanduser(checkpoint))
        if digest:
            identity["checkpoint"] = f"sha256:{digest}"
    if identity.get("pretrained") and spec.name.startswith("timm:"):
        try:
            identity["timm_version"] = importlib.metadata.version("timm")
        except importlib.metadata.PackageNotFoundError:
            pass  # building the model says timm is missing
    return identity


@dataclass(frozen=True)
class Cell:
    """One training run of a grid, identified by the hash of its resolved config."""

    grid: str
    dataset: Spec
    teacher: Spec
    student: Spec
    method: str
    method_config: dict[str, Any]
    seed: int
    recipe: Recipe
    teacher_recipe: Recipe
    precision: str = "no"
    teacher_checkpoint: str | None = None
    #: The values of the grid's swept parameters in this cell (``"kd.T": 4.0``).
    params: tuple[tuple[str, Any], ...] = ()
    #: The seed the teacher trains with; None: the cell's own seed.
    teacher_seed: int | None = None
    #: The SHA-256 of ``teacher_checkpoint``'s content, which identifies the teacher (taken
    #: from the file when the cell is made; None while there is no such file).
    teacher_sha256: str | None = None

    def __post_init__(self) -> None:
        if self.teacher_checkpoint and self.teacher_sha256 is None:
            object.__setattr__(self, "teacher_sha256", file_sha256(self.teacher_checkpoint))

    @property
    def teacher_checkpoint_path(self) -> str | None:
        """The absolute path of ``teacher_checkpoint`` (None without one)."""
        return os.path.abspath(self.teacher_checkpoint) if self.teacher_checkpoint else None

    @property
    def teacher_training_seed(self) -> int:
        """The seed a trained teacher of this cell is trained with."""
        return self.seed if self.teacher_seed is None else self.teacher_seed

    @property
    def teacher_is_pretrained(self) -> bool:
        """Whether the teacher is loaded (a checkpoint or torchvision weights), not trained.
        (timm's ``pretrained`` and ``checkpoint`` are starting weights: such a teacher is
        trained on the dataset from them.)"""
        return bool(self.teacher_checkpoint) or bool(self.teacher.options.get("weights"))

    def teacher_config(self) -> dict[str, Any]:
        """What determines the teacher: its data and architecture, and either its checkpoint's
        content (SHA-256; the path where it is missing) or its seed, recipe and precision. The
        same file by another path is the same teacher; a changed file is another."""
        config: dict[str, Any] = {"dataset": self.dataset.to_dict(),
                                  "model": model_identity(self.teacher)}
        if self.teacher_sha256:
            config["checkpoint_sha256"] = self.teacher_sha256
        elif self.teacher_checkpoint:
            config["checkpoint"] = self.teacher_checkpoint
        elif not self.teacher_is_pretrained:
            config.update(seed=self.teacher_training_seed, recipe=self.teacher_recipe.to_dict(),
                          precision=self.precision)
        return config

    def _identifying_config(self) -> dict[str, Any]:
        """:meth:`config` without what does not identify the cell (the checkpoint's path)."""
        return {"dataset": self.dataset.to_dict(), "student": model_identity(self.student),
                "method": self.method, "method_config": self.method_config, "seed": self.seed,
                "recipe": self.recipe.to_dict(), "precision": self.precision,
                "teacher": self.teacher_config()}

    def config(self) -> dict[str, Any]:
        """The fully resolved config (method options with their defaults filled in), as the
        cell's config.json holds it; a teacher checkpoint appears by content (SHA-256) and,
        for information, by its absolute path."""
        config = self._identifying_config()
        if self.teacher_sha256:
            config["teacher"]["checkpoint"] = self.teacher_checkpoint_path
        return config

    @property
    def cell_id(self) -> str:
        """Stable id: the hash of :meth:`config` less the checkpoint's path."""
        return config_hash(self._identifying_config())

    def setting(self) -> dict[str, Any]:
        """What the cell runs with except its seed: :meth:`config` without the seed nor the
        checkpoint's path (a teacher trained with the cell's own seed is marked so). Cells with
        equal settings are repetitions of one configuration over seeds."""
        config = self._identifying_config()
        del config["seed"]
        if config["teacher"].get("seed") is not None and self.teacher_seed is None:
            config["teacher"]["seed"] = "the cell's seed"
        return config

    def identity(self) -> dict[str, Any]:
        """The identifying columns of the cell's result row, status line and tracker run:
        names, seed, epochs, the method's complete options, the swept values, and the hashes
        of the cell (``cell_id``), of its setting (``config_id``: the same for every seed)
        and of what its method is compared under (``setting_id``: the setting less the
        method, shared with the ``student`` baseline of the same run). A cell whose teacher
        is a checkpoint also names it: its absolute path and its SHA-256."""
        setting = self.setting()
        compared_under = {k: v for k, v in setting.items()
                          if k not in ("method", "method_config")}
        teacher_file = {"teacher_checkpoint": self.teacher_checkpoint_path,
                        "teacher_sha256": self.teacher_sha256}
        teacher_file = {k: v for k, v in teacher_file.items() if v is not None}
        return {"grid": self.grid, "dataset": self.dataset.label,
                "teacher": self.teacher.label, "student": self.student.label,
                "method": self.method, "seed": self.seed, "epochs": self.recipe.epochs,
                "precision": self.precision, "cell_id": self.cell_id,
                "config_id": config_hash(setting), "setting_id": config_hash(compared_under),
                "options": json.dumps(self.method_config, sort_keys=True),
                "config": json.dumps(setting, sort_keys=True, default=str),
                **teacher_file, **dict(self.params)}


def expand(grid: Grid, precision: str = "no", teacher_checkpoint: str | None = None,
           teachers_dir: str | None = None) -> list[Cell]:
    """The cells of ``grid`` (of each included grid in turn) in run order: dataset, pair,
    seed, then method. ``teacher_checkpoint`` replaces every pair's; ``teachers_dir`` (the
    unpacked published teachers of RepDistiller/mdistiller) gives each pair without a
    checkpoint of its own the published weights of its teacher. A cell that occurs twice (a
    grid included twice, a method listed twice) is kept once, where it first occurs."""
    # here: the method API loads torch, which readers of a results folder never need
    from kt_bench.api.method import split_method_name

    cells = [_cell(grid.name, *point, precision)
             for point in _points(grid, split_method_name, teacher_checkpoint, teachers_dir)]
    return _first_of_each(cells)


def count_cells(grid: Grid) -> int:
    """How many cells :func:`expand` gives for ``grid``, known without the method API (no
    torch): its points counted once each, by their settings as the grid writes them."""
    seen = {json.dumps([dataset.to_dict(), pair.teacher.to_dict(),
                        pair.student.to_dict(), pair.teacher_checkpoint,
                        (pair.recipe or leaf.recipe).to_dict(), leaf.teacher_recipe.to_dict(),
                        leaf.teacher_seed, seed, method, params,
                        merge_options(leaf.method_options, pair.method_options)],
                       sort_keys=True, default=str)
            for leaf, dataset, pair, seed, method, params, _ in
            _points(grid, lambda m: m.split("+"), None, None)}
    return len(seen)


def _points(grid: Grid, members: Callable[[str], list[str]], teacher_checkpoint: str | None,
            teachers_dir: str | None) -> Iterator[tuple]:
    """Each cell's place in ``grid`` in run order: (leaf grid, dataset, pair, seed, method,
    swept values, teacher checkpoint); ``members`` splits a method name into its members."""
    for leaf in grid.leaves():
        for dataset in leaf.datasets:
            for pair in leaf.pairs:
                ckpt = (teacher_checkpoint or pair.teacher_checkpoint
                        or (published_teacher(teachers_dir, pair.teacher.name)
                            if teachers_dir else None))
                for seed in leaf.seeds:
                    for method in leaf.methods:
                        for params in _sweep_points(leaf, members(method)):
                            yield leaf, dataset, pair, seed, method, params, ckpt


def published_teacher(folder: str, teacher: str) -> str:
    """Where the unpacked published teachers ``folder`` keeps ``teacher``'s weights."""
    from kt_bench.training.reference_checkpoints import reference_teacher_path

    return str(reference_teacher_path(folder, teacher))


def check_published_teachers(cells: list[Cell], folder: str) -> None:
    """A one-line error for the first of ``cells`` whose published teacher is missing from
    ``folder`` (only the teachers of the cells that will run need to be there), or differs
    from the SHA-256 that ``kt-bench teachers fetch`` recorded beside it."""
    for cell in cells:
        if cell.teacher_checkpoint and not Path(cell.teacher_checkpoint).is_file():
            raise KtBenchError(f"--teachers-dir {folder}: no published teacher for "
                               f"'{cell.teacher.name}' at {cell.teacher_checkpoint}")
        altered = (record_mismatch(cell.teacher_checkpoint, cell.teacher_sha256)
                   if cell.teacher_checkpoint else None)
        if altered:
            raise KtBenchError(f"--teachers-dir {folder}: {altered}")


def _first_of_each(cells: list[Cell]) -> list[Cell]:
    """``cells`` with each cell id once, where it first occurs."""
    by_id: dict[str, Cell] = {}
    for cell in cells:
        by_id.setdefault(cell.cell_id, cell)
    return list(by_id.values())


def _sweep_points(grid: Grid, members: list[str]) -> list[dict[str, Any]]:
    """Every combination of the sweep axes that touch one of ``members``."""
    axes = [(k, v) for k, v in grid.sweep.items() if k.partition(".")[0] in members]
    points: list[dict[str, Any]] = [{}]
    for key, values in axes:
        points = [{**p, key: v} for p in points for v in values]
    return points


def _cell(name: str, leaf: Grid, dataset: Spec, pair, seed: int, method: str,
          params: dict[str, Any], teacher_checkpoint: str | None, precision: str) -> Cell:
    # here: the method API loads torch, which readers of a results folder never need
    from kt_bench.api.method import method_config

    swept: dict[str, dict[str, Any]] = {}
    for key, value in params.items():
        member, _, option = key.partition(".")
        swept.setdefault(member, {})[option] = value
    options = merge_options(leaf.method_options, pair.method_options, swept)
    return Cell(name, dataset, pair.teacher, pair.student, method,
                method_config(method, options), seed, pair.recipe or leaf.recipe,
                leaf.teacher_recipe,
                precision, teacher_checkpoint or pair.teacher_checkpoint,
                tuple(sorted(params.items())), leaf.teacher_seed)


SELECT_KEYS = ("dataset", "teacher", "student", "method", "seed")


def _values_of(cell: Cell, key: str) -> set[str]:
    """What an ``--only`` value may give to match ``cell``'s ``key``: a name or a label."""
    value = getattr(cell, key)
    return {value.name, value.label} if isinstance(value, Spec) else {str(value)}


def _shown_value(cell: Cell, key: str) -> str:
    """``cell``'s ``key`` as an error message lists it."""
    value = getattr(cell, key)
    return value.label if isinstance(value, Spec) else str(value)


def select(cells: list[Cell], only: list[str]) -> list[Cell]:
    """The cells matching every ``key=value[,value...]`` filter (keys: dataset, teacher,
    student, method, seed; a value matches the name or the full label). A filter that
    matches no cell is an error listing the values the cells have."""
    for i, flt in enumerate(only):
        key, sep, values = flt.partition("=")
        if not sep or key not in SELECT_KEYS or not values:
            raise KtBenchError(f"--only takes key=value with key one of "
                               f"{', '.join(SELECT_KEYS)}; got '{flt}'")
        wanted = set(values.split(","))
        kept = [c for c in cells if _values_of(c, key) & wanted]
        if not kept:
            have = ", ".join(dict.fromkeys(_shown_value(c, key) for c in cells))
            where = "in this grid" if i == 0 else "left by the --only filters before it"
            raise KtBenchError(f"no cell matches --only {flt}; {key}s {where}: {have}")
        cells = kept
    return cells
