"""The downstream-evaluation plugin surface: a kind declares its recipe (a dataclass of options
with defaults), the metrics it reports, how to check its dataset before anything runs, a
compute estimate for dry runs, and how to run one unit."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from kt_bench.core.options import Spec, plain
from kt_bench.core.registry import Registry


@dataclass
class UnitContext:
    """What one downstream unit runs with: its own ``folder`` (every file it keeps, its cache
    and checkpoints included, goes there), the cell's trained ``student`` (weights loaded, on
    the CPU; the kind moves it), the kind's resolved ``options``, the unit's ``dataset`` and
    ``data_root``, the ``device`` and ``precision`` (``no``, ``bf16``, ``fp16``) to run at, the
    ``seed`` of its random draws and a ``log`` for its progress lines."""

    folder: Path
    student: nn.Module
    options: Any
    dataset: Spec
    data_root: str | None
    device: torch.device
    precision: str
    seed: int
    log: Callable[[str], None]


class DownstreamKind:
    """A kind of downstream evaluation; subclass, set the class attributes and register an
    instance with :func:`register_kind`.

    ``run`` must be resumable: a unit stopped at any point (Ctrl-C, a kill) and run again
    with the same context gives the same metrics as one that was never stopped. Bad input
    (a missing dataset folder, a student without the taps the kind needs) is a one-line
    :class:`~kt_bench.core.errors.KtBenchError`."""

    #: The registered name (``kind = "..."`` in a grid's ``[[downstream]]`` table).
    name: ClassVar[str] = ""
    #: The recipe: a dataclass whose fields (all with defaults) are the table's options.
    Options: ClassVar[type] = object
    #: The metrics ``run`` returns, in the order tables show them (e.g. ``("top1",)``).
    metrics: ClassVar[tuple[str, ...]] = ()
    #: Where the kind's recipe comes from, for the README and the unit's ``config.json``.
    source: ClassVar[str] = ""
    #: Options that change how a unit runs, not what it computes (batch sizes of inference,
    #: loader processes): left out of the unit's identity, so changing one resumes the unit.
    run_only: ClassVar[tuple[str, ...]] = ()

    def result_options(self, options: Any) -> dict[str, Any]:
        """``options`` (an :attr:`Options` instance) as plain data, less the ``run_only`` ones:
        what decides a unit's result (its identity, and what a checkpoint must match)."""
        return {k: v for k, v in plain(dataclasses.asdict(options)).items()
                if k not in self.run_only}

    def check(self, dataset: Spec, options: Any) -> None:
        """Check, before anything runs, that ``dataset`` is one this kind evaluates on (known,
        of the right sort) and that ``options`` hold; a one-line error if not. Data is not
        loaded here."""

    def flops(self, student: nn.Module, student_shape: tuple[int, int, int], dataset: Spec,
              options: Any) -> float:
        """Rough training and evaluation FLOPs of one unit for a dry run's GPU-hour estimate
        (``student`` built without weights; ``student_shape`` the (C, H, W) it trained on)."""
        return 0.0

    def run(self, ctx: UnitContext) -> dict[str, float]:
        """Run one unit (resuming from what ``ctx.folder`` holds) and return its metrics."""
        raise NotImplementedError


#: The registered downstream kinds by name.
DOWNSTREAM_KINDS: Registry[DownstreamKind] = Registry("downstream kind")


def register_kind(kind: type[DownstreamKind]) -> type[DownstreamKind]:
    """Class decorator: register an instance of ``kind`` under ``kind.name``."""
    DOWNSTREAM_KINDS.register(kind.name, kind())
    return kind
