"""``student``: the baseline, trained on the labels alone (cross-entropy)."""

from __future__ import annotations

from kt_bench.api.method import CrossEntropyOnly, register_method


@register_method("student")
class Student(CrossEntropyOnly):
    """No transfer: the student's cross-entropy only; the teacher never runs."""
