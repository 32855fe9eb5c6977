"""``student``: the baseline, trained on the labels alone (cross-entropy)."""

from __future__ import annotations

from kt_bench.method import Method, register_method


@register_method("student")
class Student(Method):
    """No transfer: the student's cross-entropy only; the teacher never runs."""

    default_weight = 0.0

    def term_weights(self, epoch: int, epochs: int) -> dict[str, float]:
        """No terms of its own."""
        return {}
