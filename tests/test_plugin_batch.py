"""A plugin's ``loss_terms`` gets the step's batch (its labels and epoch); a plugin file whose
``loss_terms`` does not take it is refused when loaded, in one line."""

from __future__ import annotations

import json
import sys
import textwrap

import pytest

from kt_bench.commands.main import main

from .conftest import write_tiny_grid

PLUGIN = '''
import torch.nn.functional as F

from kt_bench.api.method import Method, Needs, register_method

SEEN = []


@register_method("labelce")
class LabelCE(Method):
    """Cross-entropy of the student's logits against the batch's labels, as a term."""

    needs = Needs(taps=("logits",), labels=True)

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


OLD_SIGNATURE_PLUGIN = '''
from kt_bench.api.method import Method, register_method


@register_method("no_batch")
class NoBatch(Method):
    """Written for an earlier API: loss_terms without the batch."""

    def loss_terms(self, student, teacher):
        return {}
'''


def test_a_plugin_file_whose_loss_terms_lacks_the_batch_is_refused_in_one_line(tmp_path,
                                                                                capsys):
    folder = tmp_path / "plugins"
    folder.mkdir()
    (folder / "old.py").write_text(textwrap.dedent(OLD_SIGNATURE_PLUGIN))
    grid = write_tiny_grid(tmp_path, methods=("student",))
    assert main(["run", "--grid", str(grid), "--out", str(tmp_path / "out"), "--no-report",
                 "--plugins", str(folder)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert "old.py" in err and "NoBatch" in err
    assert "accepted: loss_terms(self, student, teacher, batch)" in err
