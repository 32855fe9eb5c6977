"""Downstream evaluations of trained students: what a distilled representation is worth beyond
its own top-1 (a linear probe on another dataset, detection fine-tuning). Each kind is a
registered :class:`~kt_bench.downstream.kinds.DownstreamKind`; the sweep runs one unit of work
per (finished cell, ``[[downstream]]`` table).

Every module of this package but the infrastructure (``kinds``, ``student``, ``voc``)
registers a kind when imported, so a new kind is one file."""

from kt_bench.core.registry import import_modules
from kt_bench.downstream.kinds import (
    DOWNSTREAM_KINDS,
    DownstreamKind,
    UnitContext,
    register_kind,
)

#: Modules of this package that register no kind.
INFRASTRUCTURE = ("kinds", "student", "voc")

import_modules(__name__, __path__, INFRASTRUCTURE)

__all__ = ["DOWNSTREAM_KINDS", "DownstreamKind", "UnitContext", "register_kind"]
