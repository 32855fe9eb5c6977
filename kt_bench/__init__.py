"""kt-bench: a benchmark harness for knowledge-transfer methods for image classifiers.

The method API (``Method``, ``register_method``, ...), the downstream-evaluation API
(``DownstreamKind``, ``register_kind``, ``UnitContext``) and the Python API of notebooks and
scripts (``run``, ``report``, and ``Grid``, ``Pair``, ``Spec``, ``Recipe`` to build grids)
are importable from here; each is loaded on first use, so that commands which need no
network (``report``, ``status``) start without importing torch.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

#: The names this package exports, and the module each comes from.
_EXPORTS = {
    "METHODS": "kt_bench.api.method",
    "Batch": "kt_bench.api.method",
    "CombinedMethod": "kt_bench.api.method",
    "Method": "kt_bench.api.method",
    "build_method": "kt_bench.api.method",
    "register_method": "kt_bench.api.method",
    "run": "kt_bench.workflow.notebook",
    "report": "kt_bench.workflow.notebook",
    "Grid": "kt_bench.sweep.config",
    "Pair": "kt_bench.sweep.config",
    "Spec": "kt_bench.core.options",
    "Recipe": "kt_bench.training.recipe",
    "DownstreamKind": "kt_bench.downstream.kinds",
    "UnitContext": "kt_bench.downstream.kinds",
    "register_kind": "kt_bench.downstream.kinds",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'kt_bench' has no attribute {name!r}")
