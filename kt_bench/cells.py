"""Cells: one (dataset, teacher/student pair, method, seed, recipe) point of a grid."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from kt_bench.config import Grid, Recipe
from kt_bench.errors import KtBenchError
from kt_bench.method import build_method, split_method_name
from kt_bench.spec import Spec


def config_hash(config: Any, length: int = 12) -> str:
    """A stable short hash of a JSON-able config."""
    blob = json.dumps(config, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:length]


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

    @property
    def teacher_is_pretrained(self) -> bool:
        """Whether the teacher is loaded (a checkpoint or torchvision weights), not trained."""
        return bool(self.teacher_checkpoint) or bool(self.teacher.options.get("weights"))

    def teacher_config(self) -> dict[str, Any]:
        """What determines the teacher: its data and architecture, and either its checkpoint
        or its seed, recipe and precision."""
        config: dict[str, Any] = {"dataset": self.dataset.to_dict(),
                                  "model": self.teacher.to_dict()}
        if self.teacher_checkpoint:
            config["checkpoint"] = self.teacher_checkpoint
        elif not self.teacher_is_pretrained:
            config.update(seed=self.seed, recipe=self.teacher_recipe.to_dict(),
                          precision=self.precision)
        return config

    def config(self) -> dict[str, Any]:
        """The fully resolved config (method options with their defaults filled in)."""
        return {"dataset": self.dataset.to_dict(), "student": self.student.to_dict(),
                "method": self.method, "method_config": self.method_config, "seed": self.seed,
                "recipe": self.recipe.to_dict(), "precision": self.precision,
                "teacher": self.teacher_config()}

    @property
    def cell_id(self) -> str:
        """Stable id: the hash of :meth:`config`."""
        return config_hash(self.config())


def expand(grid: Grid, precision: str = "no", teacher_checkpoint: str | None = None
           ) -> list[Cell]:
    """The cells of ``grid`` (of each included grid in turn) in run order: dataset, pair,
    seed, then method. ``teacher_checkpoint`` replaces every pair's."""
    cells = []
    for leaf in grid.leaves():
        for dataset in leaf.datasets:
            for pair in leaf.pairs:
                for seed in leaf.seeds:
                    for method in leaf.methods:
                        for params in _sweep_points(leaf, split_method_name(method)):
                            cells.append(_cell(grid.name, leaf, dataset, pair, seed, method,
                                               params, precision, teacher_checkpoint))
    return cells


def _sweep_points(grid: Grid, members: list[str]) -> list[dict[str, Any]]:
    """Every combination of the sweep axes that touch one of ``members``."""
    axes = [(k, v) for k, v in grid.sweep.items() if k.partition(".")[0] in members]
    points: list[dict[str, Any]] = [{}]
    for key, values in axes:
        points = [{**p, key: v} for p in points for v in values]
    return points


def _cell(name: str, leaf: Grid, dataset: Spec, pair, seed: int, method: str,
          params: dict[str, Any], precision: str, teacher_checkpoint: str | None) -> Cell:
    members = split_method_name(method)
    opts = {m: dict(leaf.method_options.get(m, {})) for m in members}
    for key, value in params.items():
        member, _, option = key.partition(".")
        opts[member][option] = value
    described = build_method(method, opts).describe()
    if len(members) == 1:
        described = {members[0]: described}
    return Cell(name, dataset, pair.teacher, pair.student, method, described, seed,
                leaf.recipe, leaf.teacher_recipe, precision,
                teacher_checkpoint or pair.teacher_checkpoint, tuple(sorted(params.items())))


def select(cells: list[Cell], only: list[str]) -> list[Cell]:
    """The cells matching every ``key=value[,value...]`` filter (keys: dataset, teacher,
    student, method, seed; a value matches the name or the full label)."""
    keys = ("dataset", "teacher", "student", "method", "seed")
    for flt in only:
        key, sep, values = flt.partition("=")
        if not sep or key not in keys or not values:
            raise KtBenchError(f"--only takes key=value with key one of {', '.join(keys)}; "
                               f"got '{flt}'")
        wanted = set(values.split(","))

        def value_of(cell: Cell, key: str = key) -> set[str]:
            v = getattr(cell, key)
            return {v.name, v.label} if isinstance(v, Spec) else {str(v)}

        cells = [c for c in cells if value_of(c) & wanted]
    return cells
