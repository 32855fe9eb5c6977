"""Configuration as dataclasses: the training recipe and the grid, loaded from TOML files.

Every error names the file and the key, and says what is accepted.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import sys
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from kt_bench.core.errors import ConfigError, KtBenchError, first_line
from kt_bench.core.options import Spec, coerce, type_words
from kt_bench.core.registry import Registry
from kt_bench.training.recipe import Recipe


def dataclass_from_table(cls: type, table: Mapping[str, Any], where: str, base: Any = None):
    """Build dataclass ``cls`` from a TOML table, on top of ``base`` (an instance) if given.

    Unknown keys and values of the wrong type are one-line ConfigErrors naming ``where.key``.
    """
    if not isinstance(table, Mapping):
        raise ConfigError(f"{where} must be a table, got {table!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    values = {}
    for key, value in table.items():
        if key not in names:
            raise ConfigError(f"{where}: unknown key '{key}'; accepted: {', '.join(names)}")
        ok, conv = coerce(value, hints[key])
        if not ok:
            raise ConfigError(f"{where}.{key} must be {type_words(hints[key])}, got {value!r}")
        values[key] = conv
    start = base if base is not None else cls()
    return dataclasses.replace(start, **values)


def read_toml(path: Path) -> dict[str, Any]:
    """Parse a TOML file; a syntax error is one line naming the file."""
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a text file (UTF-8); accepted: a grid file in TOML"
                          ) from None
    except OSError as exc:  # a folder, no permission to read
        raise ConfigError(f"{path}: cannot be read: {exc.strerror or first_line(exc)}; "
                          "accepted: a grid file in TOML") from None


@dataclass(frozen=True)
class LauncherConfig:
    """What each cluster job asks for (a grid's ``[launcher]`` table; ``run`` flags replace
    its keys). Empty strings and 0 leave the choice to the cluster's defaults."""

    partition: str = ""
    gpus_per_job: int = 1
    cpus_per_job: int = 8
    mem_gb: int = 0
    time_min: int = 24 * 60
    array_parallelism: int = 64
    #: Jobs per submitted array at most (a cluster's MaxArraySize); more go in further arrays.
    max_array_size: int = 1000
    account: str = ""
    qos: str = ""

    def validate(self, where: str) -> LauncherConfig:
        """Check value ranges; ``where`` prefixes the message."""
        for key, low in (("gpus_per_job", 0), ("cpus_per_job", 1), ("mem_gb", 0),
                         ("time_min", 1), ("array_parallelism", 1), ("max_array_size", 1)):
            if getattr(self, key) < low:
                raise ConfigError(f"{where}.{key} must be an integer >= {low}, got "
                                  f"{getattr(self, key)!r}")
        return self


def scaled_milestones(recipe: Recipe, epochs: int) -> tuple[int, ...]:
    """``recipe``'s milestones moved to a run of ``epochs`` epochs in proportion (the same
    schedule shape, shorter or longer); milestones that fall on epoch 0 or at or after the
    last epoch are dropped."""
    scaled = (round(m * epochs / recipe.epochs) for m in recipe.milestones)
    return tuple(sorted({m for m in scaled if 1 <= m < epochs}))


def with_epochs(recipe: Recipe, epochs: int) -> Recipe:
    """``recipe`` run for ``epochs`` epochs, its multistep milestones scaled alike."""
    return dataclasses.replace(recipe, epochs=epochs,
                               milestones=scaled_milestones(recipe, epochs))


def merge_options(*layers: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per-method option tables merged: later layers replace earlier ones key by key."""
    out: dict[str, dict[str, Any]] = {}
    for layer in layers:
        for method, opts in layer.items():
            out.setdefault(method, {}).update(opts)
    return out


@dataclass(frozen=True)
class Pair:
    """A teacher and the student it teaches; ``teacher_checkpoint`` loads a trained teacher;
    ``method_options`` replace the grid's for this pair (e.g. DKD's beta per pair)."""

    teacher: Spec
    student: Spec
    teacher_checkpoint: str | None = None
    method_options: dict[str, dict[str, Any]] = field(default_factory=dict, hash=False)
    #: The students' recipe of this pair where it differs from the grid's (RepDistiller
    #: trains MobileNet and ShuffleNet students at lr 0.01); None: the grid's.
    recipe: Recipe | None = None


@dataclass
class Grid:
    """A sweep: datasets x teacher/student pairs x methods x seeds under one recipe."""

    name: str
    datasets: list[Spec]
    pairs: list[Pair]
    methods: list[str]
    seeds: list[int] = field(default_factory=lambda: [0])
    recipe: Recipe = field(default_factory=Recipe)
    teacher_recipe: Recipe = field(default_factory=Recipe)
    method_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: Sweep axes: ``"member.option" -> values``; each value makes its own cells.
    sweep: dict[str, list[Any]] = field(default_factory=dict)
    description: str = ""
    source: str = "<memory>"
    #: The grids this one is the union of (``include``); empty for a grid of its own cells.
    parts: list[Grid] = field(default_factory=list)
    #: What cluster jobs ask for (``--launcher slurm``).
    launcher: LauncherConfig = field(default_factory=LauncherConfig)
    #: The seed the teacher is trained with; None: each cell's own seed (a teacher per seed).
    teacher_seed: int | None = None
    #: The downstream evaluations of the finished students (``[[downstream]]`` tables, as
    #: :class:`~kt_bench.sweep.downstream_config.Downstream`).
    downstream: list[Any] = field(default_factory=list)

    def leaves(self) -> list[Grid]:
        """The grids that hold cells: this one, or its included grids (recursively)."""
        if not self.parts:
            return [self]
        return [leaf for part in self.parts for leaf in part.leaves()]

    def overridden(self, methods: list[str] | None = None, epochs: int | None = None,
                   seeds: list[int] | None = None, teacher_epochs: int | None = None) -> Grid:
        """This grid with the command line's replacements applied to every part: the methods,
        the students' epochs and the teacher's (multistep milestones scaled alike) and the
        seeds."""
        if self.parts:
            parts = [p.overridden(methods, epochs, seeds, teacher_epochs) for p in self.parts]
            return dataclasses.replace(self, parts=parts)
        changes: dict[str, Any] = {}
        if methods is not None:
            changes["methods"] = list(methods)
        if epochs is not None:
            changes["recipe"] = with_epochs(self.recipe, epochs)
            changes["pairs"] = [p if p.recipe is None else
                                dataclasses.replace(p, recipe=with_epochs(p.recipe, epochs))
                                for p in self.pairs]
        if seeds is not None:
            changes["seeds"] = unique(seeds)
        if teacher_epochs is not None:
            changes["teacher_recipe"] = with_epochs(self.teacher_recipe, teacher_epochs)
        return dataclasses.replace(self, **changes).validate() if changes else self

    def validate(self) -> Grid:
        """Check every name against the registries, every option against its builder's
        signature (names and types) and the seeds."""
        try:
            self._check_specs()
            self._check_data()
            self._check_methods()
        except KtBenchError as exc:
            raise type(exc)(f"{self.source}: {exc}") from None
        if not self.seeds:
            raise ConfigError(f"{self.source}: seeds is empty; give at least one seed")
        if any(seed < 0 for seed in self.seeds):
            raise ConfigError(f"{self.source}: seeds = {self.seeds} is invalid; accepted: "
                              "integers >= 0")
        return self

    def _check_specs(self) -> None:
        """Every dataset's and model's options resolved against its builder's signature."""
        from kt_bench.data import DATASETS
        from kt_bench.models import MODELS
        from kt_bench.models.zoo import HARNESS_OPTIONS

        for i, d in enumerate(self.datasets):
            _check_spec(DATASETS.get(d.name), d, "dataset", f"datasets[{i}]", ("data_root",))
        for i, pair in enumerate(self.pairs):
            for role, model in (("teacher", pair.teacher), ("student", pair.student)):
                _check_spec(MODELS.get(model.name), model, "model", f"pairs[{i}].{role}",
                            HARNESS_OPTIONS)

    def _batch_sizes(self) -> list[tuple[str, int]]:
        """Every training batch size of the grid with its key: the students' recipes and,
        where some teacher is trained, the teachers'."""
        sizes = [("recipe.batch_size", self.recipe.batch_size)]
        sizes += [(f"pairs[{i}].recipe.batch_size", p.recipe.batch_size)
                  for i, p in enumerate(self.pairs) if p.recipe is not None]
        if any(not p.teacher_checkpoint and not p.teacher.options.get("weights")
               for p in self.pairs):
            sizes.append(("teacher_recipe.batch_size", self.teacher_recipe.batch_size))
        return sizes

    def _check_data(self) -> None:
        """Every dataset's images and training set checked against what training needs: a
        positive ``image_size`` whose images fit in memory, and batch sizes no larger than
        the training set (each known from the dataset's spec, before any data is loaded)."""
        from kt_bench.data.bundle import DATASETS, dataset_info

        for i, d in enumerate(self.datasets):
            if d.name not in DATASETS:  # the unknown name is the cells' error, with the list
                continue
            info = dataset_info(d)
            if info.n_train < 2:  # BatchNorm needs two samples a batch
                raise ConfigError(f"datasets[{i}]: {d.label} has {info.n_train} training "
                                  "images; accepted: a dataset of at least 2")
            _check_image_size(d, info, f"datasets[{i}]", self._batch_sizes(),
                              self.recipe.eval_batch_size)
            for key, size in self._batch_sizes():
                if size > info.n_train:
                    raise ConfigError(f"{key} = {size} is more than the {info.n_train} "
                                      f"training images of {d.label}; accepted: an integer "
                                      f"in [2, {info.n_train}]")

    def _check_methods(self) -> None:
        """Every method (and every swept value) configured for every pair."""
        for pair in self.pairs:
            options = merge_options(self.method_options, pair.method_options)
            for m in self.methods:
                _method_config(m, options)
            for key, values in self.sweep.items():
                member, _, option = key.partition(".")
                for value in values:
                    _method_config(member, merge_options(options, {member: {option: value}}))


def physical_memory() -> float:
    """This machine's memory in bytes; infinite where the system does not say."""
    try:
        return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (AttributeError, ValueError, OSError):
        return math.inf


def _check_image_size(dataset: Spec, info: Any, where: str, batch_sizes: list[tuple[str, int]],
                      eval_batch_size: int) -> None:
    """``info.image_size`` of ``dataset`` checked to be >= 1 and small enough that the images
    held at once fit in this machine's memory as float32: the whole training set of a
    dataset kept in memory, the largest batch of one streamed from disk."""
    from kt_bench.data.bundle import holds_in_memory

    size = info.image_size
    if size < 1:
        raise ConfigError(f"{where}.image_size = {size} is invalid; accepted: an integer >= 1")
    if holds_in_memory(dataset.name) and info.held_size is not None:
        # held small, resized a batch at a time: the largest batch is what the size costs
        held, what = max([eval_batch_size, *(b for _, b in batch_sizes)]), "images of a batch"
    elif holds_in_memory(dataset.name):
        held, what = info.n_train, "training images"
    else:
        held, what = max([eval_batch_size, *(b for _, b in batch_sizes)]), "images of a batch"
    per_pixel = held * info.in_channels * 4
    memory = physical_memory()
    if per_pixel * size * size > memory:
        largest = math.isqrt(int(memory // per_pixel))
        raise ConfigError(f"{where}.image_size = {size} is too large: its {held} {what} would "
                          f"take {per_pixel * size * size / 1e9:.0f} GB, more than this "
                          f"machine's {memory / 1e9:.0f} GB of memory; accepted: an integer in "
                          f"[1, {largest}]")


def _check_spec(builder: Any, spec: Spec, kind: str, where: str, fixed: tuple[str, ...]
                ) -> None:
    """``spec``'s options checked (names and types) against ``builder``'s signature; an
    error names ``where`` (e.g. ``pairs[0].student``)."""
    from kt_bench.core.options import resolve_options

    try:
        resolve_options(builder, spec.options, f"{kind} '{spec.name}'", fixed)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def _method_config(method: str, options: Mapping[str, Mapping[str, Any]]) -> None:
    """Check ``method`` with ``options``; a plugin constructor's own exception is one line."""
    from kt_bench.api.method import method_config

    try:
        method_config(method, options)
    except KtBenchError:
        raise
    except Exception as exc:  # noqa: BLE001 - a plugin's constructor may raise anything
        raise ConfigError(f"method '{method}' cannot be built: {first_line(exc)}") from None


def unique(values: list[Any]) -> list[Any]:
    """``values`` without repeats, in the order of their first occurrence."""
    return list(dict.fromkeys(values))


#: A grid name is a file name: it names the results folder ``results/<name>``.
_SAFE_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*")


def _grid_name(table: Mapping[str, Any], source: str) -> str:
    """The grid's ``name``, checked to be a safe file name."""
    if "name" not in table:
        raise ConfigError(f"{source}: missing key 'name'")
    name = table["name"]
    if not isinstance(name, str) or not _SAFE_NAME.fullmatch(name):
        raise ConfigError(f"{source}: name = {name!r} is invalid; accepted: a file name of "
                          "letters, digits, '.', '_' and '-', not starting with '.'")
    return name


GRID_KEYS = ("name", "description", "datasets", "pairs", "methods", "seeds", "recipe",
             "teacher_recipe", "teacher_seed", "method_options", "sweep", "launcher", "extends",
             "downstream")
COMPOSITE_KEYS = ("name", "description", "include", "launcher")
PAIR_KEYS = ("teacher", "student", "teacher_checkpoint", "method_options", "recipe")


def _list_of(table: Mapping, key: str, where: str, kind: type) -> list:
    value = table.get(key)
    if not isinstance(value, list) or not value:
        raise ConfigError(f"{where}: key '{key}' must be a non-empty list")
    for v in value:
        if kind is int and (not isinstance(v, int) or isinstance(v, bool)):
            raise ConfigError(f"{where}: key '{key}' must hold integers, got {v!r}")
        if kind is str and not isinstance(v, str):
            raise ConfigError(f"{where}: key '{key}' must hold strings, got {v!r}")
    return value


def _composite(table: Mapping[str, Any], source: str, seen: tuple[str, ...], validate: bool
               ) -> Grid:
    for key in table:
        if key not in COMPOSITE_KEYS:
            raise ConfigError(f"{source}: unknown key '{key}' in a grid with 'include'; "
                              f"accepted: {', '.join(COMPOSITE_KEYS)}")
    names = _list_of(table, "include", source, str)
    grid_name = _grid_name(table, source)
    parts = []
    for name in names:
        target = _grid_path(name, source)
        if _file_key(target) in seen or _file_key(target) == _file_key(source):
            raise ConfigError(f"{source}: include '{name}' forms a cycle")
        parts.append(load_grid(str(target), seen + (_file_key(target),), validate))
    return Grid(name=grid_name, description=str(table.get("description", "")),
                datasets=[], pairs=[], methods=[], source=source, parts=parts,
                launcher=_launcher(table, source))


def _launcher(table: Mapping[str, Any], source: str) -> LauncherConfig:
    where = f"{source}: launcher"
    return dataclass_from_table(LauncherConfig, table.get("launcher", {}), where).validate(where)


def _method_options(table: Any, where: str) -> dict[str, dict[str, Any]]:
    if not isinstance(table, Mapping) or not all(isinstance(v, Mapping) for v in table.values()):
        raise ConfigError(f"{where} must hold one table per method name")
    return {k: dict(v) for k, v in table.items()}


def _run_names(methods: list[str]) -> list[str]:
    """The names a method-options table may take for a grid running ``methods``: each method
    and each member of a combination (``kd+nst_poly``: also ``kd`` and ``nst_poly``)."""
    names = [part.strip() for m in methods for part in (m, *m.split("+"))]
    return unique([n for n in names if n])


def _is_registered(name: str) -> bool:
    """Whether ``name`` is a registered method or a combination of registered methods (kept
    in a grid file for a run whose ``--methods`` names it, as ``demo`` does for ``ab``)."""
    from kt_bench.api.method import METHODS

    parts = [p.strip() for p in name.split("+")]
    return all(p in METHODS for p in parts)


def check_option_tables(options: Mapping[str, Any], methods: list[str], where: str) -> None:
    """A one-line ConfigError for a table of ``options`` (at ``where``, e.g. ``grid.toml:
    method_options``) that names neither one of ``methods`` (the grid file's own; a member of
    a combination counts) nor a registered method: a misspelt name that would be ignored."""
    from kt_bench.api.method import METHODS

    known = _run_names(methods)
    for name in options:
        if name in known or _is_registered(name):
            continue
        hint = (difflib.get_close_matches(name, known, n=1)
                or difflib.get_close_matches(name, METHODS.names(), n=1))
        did_you_mean = f" (did you mean '{hint[0]}'?)" if hint else ""
        raise ConfigError(f"{where}.{name} is for a method the grid does not run and no "
                          f"registered one{did_you_mean}; the grid's methods: "
                          f"{', '.join(methods)}")


def _pair(p: Any, where: str, recipe: Recipe) -> Pair:
    """One ``[[pairs]]`` table; its own ``recipe`` holds only what differs from the grid's
    ``recipe``."""
    keys = set(p) if isinstance(p, Mapping) else set()
    if not {"teacher", "student"} <= keys or keys - set(PAIR_KEYS):
        raise ConfigError(f"{where} must be a table with the keys teacher and student "
                          "(and optionally teacher_checkpoint, method_options, recipe)")
    ckpt = p.get("teacher_checkpoint")
    if ckpt is not None and not isinstance(ckpt, str):
        raise ConfigError(f"{where}.teacher_checkpoint must be a path string")
    own = None
    if "recipe" in p:
        own = dataclass_from_table(Recipe, p["recipe"], f"{where}.recipe", base=recipe
                                   ).validate(f"{where}.recipe")
    return Pair(Spec.parse(p["teacher"], f"{where}.teacher"),
                Spec.parse(p["student"], f"{where}.student"), ckpt,
                _method_options(p.get("method_options", {}), f"{where}.method_options"), own)


def _merged(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """``over`` on top of ``base``: tables merge key by key, every other value replaces."""
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _merged(out[key], value)
        else:
            out[key] = value
    return out


def _file_key(path: str | Path) -> str:
    """``path`` made absolute and normalised (``sub/../a.toml`` is ``a.toml``), so a cycle
    is seen whatever way it names a file."""
    return str(Path(path).resolve())


def _grid_path(name: str, relative_to: str) -> Path:
    if name.endswith(".toml"):
        return Path(relative_to).parent / name
    try:
        return builtin_grids().get(name)
    except KtBenchError as exc:
        raise ConfigError(f"{relative_to}: {exc}; or a path to a .toml file") from None


def _sweep(table: Any, source: str) -> dict[str, list[Any]]:
    if not isinstance(table, Mapping):
        raise ConfigError(f"{source}: sweep must be a table of \"method.option\" = [values]")
    for key, values in table.items():
        member, dot, option = key.partition(".")
        if not dot or not member or not option:
            raise ConfigError(f"{source}: sweep key '{key}' must be \"method.option\", "
                              "e.g. \"nst_poly.weight\"")
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{source}: sweep.{key} must be a non-empty list of values")
    return {k: list(v) for k, v in table.items()}


def grid_from_table(table: Mapping[str, Any], source: str, seen: tuple[str, ...] = (),
                    validate: bool = True) -> Grid:
    """Build a Grid from a parsed TOML table read from ``source``; with ``validate``, check
    its names and options against the registries too (which loads the plugins, hence torch).

    ``include = [...]`` makes a grid the union of other grids; ``extends = "base"`` starts
    from another grid's table (tables merged key by key, other values replaced).
    """
    if "include" in table:
        return _composite(table, source, seen, validate)
    if "extends" in table:
        return _extended(table, source, seen, validate)
    _check_grid_keys(table, source)
    recipe = dataclass_from_table(Recipe, table.get("recipe", {}), f"{source}: recipe")
    recipe.validate(f"{source}: recipe")
    pairs = [_pair(p, f"{source}: pairs[{i}]", recipe)
             for i, p in enumerate(_list_of(table, "pairs", source, object))]
    options = _method_options(table.get("method_options", {}), f"{source}: method_options")
    methods = _list_of(table, "methods", source, str)
    if validate:  # against the registered methods
        check_option_tables(options, methods, f"{source}: method_options")
        for i, pair in enumerate(pairs):
            check_option_tables(pair.method_options, methods,
                                f"{source}: pairs[{i}].method_options")
    grid = Grid(
        name=_grid_name(table, source),
        description=str(table.get("description", "")),
        datasets=[Spec.parse(d, f"{source}: datasets")
                  for d in _list_of(table, "datasets", source, object)],
        pairs=pairs,
        methods=methods,
        seeds=unique(_list_of(table, "seeds", source, int)) if "seeds" in table else [0],
        recipe=recipe,
        teacher_recipe=_teacher_recipe(table.get("teacher_recipe", {}), recipe, source),
        method_options=options,
        teacher_seed=_teacher_seed(table, source),
        sweep=_sweep(table.get("sweep", {}), source),
        source=source,
        launcher=_launcher(table, source),
        # read with the kinds, which load torch: only where the grid is checked
        downstream=_downstream(table.get("downstream", []), source) if validate else [],
    )
    return grid.validate() if validate else grid


def _downstream(value: Any, source: str) -> list[Any]:
    """The grid's ``[[downstream]]`` evaluations (imported here: the kinds load torch)."""
    if not value:
        return []
    from kt_bench.sweep.downstream_config import downstream_from_tables

    return downstream_from_tables(value, source)


def _extended(table: Mapping[str, Any], source: str, seen: tuple[str, ...], validate: bool
              ) -> Grid:
    """The grid of a table with ``extends``: its base grid's table with this one on top."""
    base_name = table["extends"]
    if not isinstance(base_name, str):
        raise ConfigError(f"{source}: key 'extends' must be a grid name or file")
    base_path = _grid_path(base_name, source)
    if _file_key(base_path) in seen or _file_key(base_path) == _file_key(source):
        raise ConfigError(f"{source}: extends '{base_name}' forms a cycle")
    base = read_toml(base_path)
    if "include" in base:
        raise ConfigError(f"{source}: extends '{base_name}', a grid made with include; "
                          "extend one of its parts instead")
    rest = {k: v for k, v in table.items() if k != "extends"}
    return grid_from_table(_merged(base, rest), source, seen + (_file_key(base_path),),
                           validate)


def _check_grid_keys(table: Mapping[str, Any], source: str) -> None:
    """A one-line error for an unknown key or a missing required one."""
    for key in table:
        if key not in GRID_KEYS:
            raise ConfigError(f"{source}: unknown key '{key}'; accepted: {', '.join(GRID_KEYS)}")
    for key in ("name", "datasets", "pairs", "methods"):
        if key not in table:
            raise ConfigError(f"{source}: missing key '{key}'")


def _teacher_seed(table: Mapping[str, Any], source: str) -> int | None:
    """The grid's ``teacher_seed`` (None: each seed's own), checked."""
    teacher_seed = table.get("teacher_seed")
    if teacher_seed is not None and (not isinstance(teacher_seed, int)
                                     or isinstance(teacher_seed, bool) or teacher_seed < 0):
        raise ConfigError(f"{source}: teacher_seed = {teacher_seed!r} is invalid; accepted: an "
                          "integer >= 0")
    return teacher_seed


def _teacher_recipe(table: Any, recipe: Recipe, source: str) -> Recipe:
    """The ``[teacher_recipe]`` table on top of the students' ``recipe``, validated; bad
    milestones it inherits say so."""
    where = f"{source}: teacher_recipe"
    teacher = dataclass_from_table(Recipe, table, where, base=recipe)
    try:
        return teacher.validate(where)
    except ConfigError as exc:
        if f"{where}.milestones" in str(exc) and "milestones" not in table:
            raise ConfigError(f"{exc} (inherited from [recipe]; give [teacher_recipe] "
                              "milestones of its own)") from None
        raise


def builtin_grids() -> Registry[Path]:
    """The grids shipped in ``kt_bench/grids``: name -> file."""
    grids: Registry[Path] = Registry("grid")
    for path in (Path(__file__).parent.parent / "grids").glob("*.toml"):
        grids.register(path.stem, path, origin=str(path))
    return grids


def load_grid(name_or_path: str, seen: tuple[str, ...] = (), validate: bool = True) -> Grid:
    """A built-in grid by name, or a grid file by path (``*.toml``); ``validate``: see
    :func:`grid_from_table`."""
    path = Path(name_or_path)
    if not (name_or_path.endswith(".toml") or path.is_file()):
        try:
            path = builtin_grids().get(name_or_path)
        except KtBenchError as exc:
            raise ConfigError(f"{exc}; or a path to a .toml file") from None
    return grid_from_table(read_toml(path), str(path), seen, validate)
