"""Cells: one (dataset, teacher/student pair, method, seed, recipe) point of a grid."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from kt_bench.config import Grid, Recipe
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

    def teacher_config(self) -> dict[str, Any]:
        """What determines the teacher: its data, architecture, seed, recipe and precision."""
        return {"dataset": self.dataset.to_dict(), "model": self.teacher.to_dict(),
                "seed": self.seed, "recipe": self.teacher_recipe.to_dict(),
                "precision": self.precision}

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


def expand(grid: Grid, precision: str = "no") -> list[Cell]:
    """The cells of ``grid`` in run order: dataset, pair, seed, then method."""
    cells = []
    for dataset in grid.datasets:
        for pair in grid.pairs:
            for seed in grid.seeds:
                for method in grid.methods:
                    members = split_method_name(method)
                    opts = {m: grid.method_options.get(m, {}) for m in members}
                    described = build_method(method, opts).describe()
                    if len(members) == 1:
                        described = {members[0]: described}
                    cells.append(Cell(grid.name, dataset, pair.teacher, pair.student, method,
                                      described, seed, grid.recipe, grid.teacher_recipe,
                                      precision))
    return cells
