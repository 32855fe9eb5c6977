"""The training recipe: how one network is trained (SGD with momentum, a per-epoch schedule)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from kt_bench.core.errors import ConfigError

#: The learning-rate schedules a recipe may name.
SCHEDULES = ("cosine", "multistep", "constant")


@dataclass(frozen=True)
class Recipe:
    """How one network is trained: SGD with momentum and a per-epoch learning-rate schedule."""

    epochs: int = 10
    batch_size: int = 64
    lr: float = 0.05
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4
    schedule: str = "cosine"
    milestones: tuple[int, ...] = ()
    gamma: float = 0.1
    ce_weight: float = 1.0
    eval_batch_size: int = 512

    def validate(self, where: str) -> Recipe:
        """Check value ranges; ``where`` prefixes the message (file and table)."""
        checks = [
            (self.epochs >= 1, "epochs", "an integer >= 1"),
            (self.batch_size >= 2, "batch_size", "an integer >= 2"),
            (self.eval_batch_size >= 1, "eval_batch_size", "an integer >= 1"),
            (self.lr > 0, "lr", "a number > 0"),
            (0 <= self.momentum < 1, "momentum", "a number in [0, 1)"),
            (self.weight_decay >= 0, "weight_decay", "a number >= 0"),
            (self.schedule in SCHEDULES, "schedule", f"one of {', '.join(SCHEDULES)}"),
            (self.ce_weight >= 0, "ce_weight", "a number >= 0"),
            (all(m >= 1 for m in self.milestones), "milestones", "a list of epochs >= 1"),
            (self.schedule != "multistep" or all(m < self.epochs for m in self.milestones),
             "milestones", f"a list of epochs m with 1 <= m < epochs ({self.epochs})"),
        ]
        for ok, key, accepted in checks:
            if not ok:
                value = getattr(self, key)
                raise ConfigError(f"{where}.{key} = {value!r} is invalid; accepted: {accepted}")
        return self

    def to_dict(self) -> dict[str, Any]:
        """A plain dict (lists for tuples), stable for hashing."""
        d = dataclasses.asdict(self)
        d["milestones"] = list(self.milestones)
        return d
