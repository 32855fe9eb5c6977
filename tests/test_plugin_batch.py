"""A plugin that declares ``batch`` in ``loss_terms`` gets the step's labels and epoch; one
that does not is called as before."""

from __future__ import annotations

import json
import sys
import textwrap

import pytest

from kt_bench.cli import main

from .conftest import write_tiny_grid

PLUGIN = '''
import torch.nn.functional as F

from kt_bench.method import Method, register_method

SEEN = []


@register_method("labelce")
class LabelCE(Method):
    """Cross-entropy of the student's logits against the batch's labels, as a term."""

    def __init__(self, weight=None):
        super().__init__(weight)
        self.taps = ("logits",)

    def loss_terms(self, student, teacher, batch):
        SEEN.append((batch.epoch, batch.epochs, batch.labels.shape[0]))
        return {self.name: F.cross_entropy(student["logits"].float(), batch.labels)}
'''


def test_a_method_reads_the_labels_and_the_epoch(tmp_path, capsys):
    folder = tmp_path / "plugins"
    folder.mkdir()
    (folder / "labelce.py").write_text(textwrap.dedent(PLUGIN))
    grid = write_tiny_grid(tmp_path, methods=("labelce", "kd+labelce"), epochs=2)
    out = tmp_path / "out"
    assert main(["run", "--grid", str(grid), "--out", str(out), "--no-report",
                 "--plugins", str(folder)]) == 0
    module = next(m for name, m in sys.modules.items() if name.startswith("kt_bench_plugin_"
                                                                           "labelce"))
    # 96 training images in batches of 32: 3 steps per epoch, 2 epochs, 2 students
    assert sorted(set(module.SEEN)) == [(0, 2, 32), (1, 2, 32)]
    assert len(module.SEEN) == 2 * 2 * 3
    for metrics in (out / "cells").glob("*/metrics.jsonl"):
        for epoch in map(json.loads, metrics.read_text().splitlines()):
            # the term is the cross-entropy of the same logits against the same labels
            assert epoch["labelce"] == pytest.approx(epoch["ce"], rel=1e-6)
