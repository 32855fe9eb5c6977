"""kt-bench: a benchmark harness for knowledge-transfer methods for image classifiers."""

from kt_bench.method import (
    METHODS,
    Batch,
    CombinedMethod,
    Method,
    build_method,
    register_method,
)

__version__ = "0.1.0"

__all__ = ["METHODS", "Batch", "CombinedMethod", "Method", "build_method", "register_method"]
