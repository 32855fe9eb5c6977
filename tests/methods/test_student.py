"""``student``: the crd-cifar100 cell's loss (cross-entropy alone) against RepDistiller's
vanilla training on the same weights and batch."""

from __future__ import annotations

import pytest

from .composition import PAIRS, check_cell_loss_equals_repdistillers


@pytest.mark.parametrize("teacher_name,student_name", PAIRS)
def test_cell_loss_equals_repdistillers(teacher_name, student_name):
    check_cell_loss_equals_repdistillers("student", teacher_name, student_name)
