"""Initialisation stages, the batch's indices and the training set a method may read, and
methods that do not apply to a pair (status n/a): all through the plugin API, none named in
the engine."""

from __future__ import annotations

import dataclasses
import textwrap

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kt_bench.api.method import (
    INIT,
    MAIN,
    TEACHER_BATCH_STATISTICS,
    TEACHER_EVAL,
    Method,
    Needs,
    NotApplicable,
    build_method,
    init_stage,
    register_method,
)
from kt_bench.commands.main import main
from kt_bench.core.options import Spec
from kt_bench.data import load_dataset
from kt_bench.training.device import make_accelerator
from kt_bench.training.engine import train, train_cohort
from kt_bench.training.recipe import Recipe

from .conftest import write_tiny_grid

DATA = Spec("synthetic", {"n_train": 96, "n_test": 48, "image_size": 8, "noise": 2.0,
                          "augment": True})
TEACHER = Spec("resnet8", {"width": 0.5})
STUDENT = Spec("resnet8", {"width": 0.25})
RECIPE = Recipe(epochs=2, batch_size=32, lr=0.05)
SEEN: list = []


class _Interrupt(Exception):
    pass


class HintInit(Method):
    """Two initialisation epochs matching `stage2` through a 1x1 connector, then CE alone."""

    needs = Needs(labels=True, indices=True, init=init_stage(2, lr=0.02))

    def __init__(self, weight: float | None = None, crash_at: int = -1) -> None:
        super().__init__(weight)
        self.crash_at = crash_at
        self.taps = ("stage2",)
        self.connector: nn.Module | None = None

    def setup_data(self, labels, num_classes):
        SEEN.append(("data", labels.clone(), num_classes))

    def setup(self, student_shapes, teacher_shapes):
        self.connector = nn.Conv2d(student_shapes["stage2"][1], teacher_shapes["stage2"][1], 1)

    def loss_terms(self, student, teacher, batch):
        if batch.stage == INIT and batch.epoch == self.crash_at:
            raise _Interrupt
        SEEN.append(("batch", batch.stage, batch.epoch, batch.epochs, batch.indices.clone(),
                     batch.labels.clone(), batch.seed))
        if batch.stage == MAIN:
            return {}
        return {self.name: F.mse_loss(self.connector(student["stage2"]), teacher["stage2"])}

    def term_weights(self, epoch, epochs):
        return {}


@pytest.fixture(autouse=True)
def hint_init():
    """Registered for each test only (the conftest's registry isolation forgets it after)."""
    register_method("hint_init")(HintInit)


@pytest.fixture(scope="module")
def data():
    return load_dataset(DATA)


@pytest.fixture(scope="module")
def teacher(data):
    return train(data, TEACHER, build_method("student"), Recipe(epochs=2, batch_size=32), 0,
                 make_accelerator("cpu")).model


def _same(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_the_initialisation_stage_runs_first_without_labels(data, teacher):
    SEEN.clear()
    result = train(data, STUDENT, build_method("hint_init"), RECIPE, 3, make_accelerator("cpu"),
                   teacher)
    assert [h.get("stage", MAIN) for h in result.history] == [INIT, INIT, MAIN, MAIN]
    assert [h["epoch"] for h in result.history] == [1, 2, 3, 4]
    init, main_ = result.history[:2], result.history[2:]
    assert all(h["lr"] == 0.02 for h in init)  # the stage's own constant rate
    assert all("ce" not in h and h["hint_init"] > 0 for h in init)
    assert all("ce" in h and "hint_init" not in h for h in main_)
    assert result.top1_best == max(h["top1"] for h in main_)
    # the method read the training set once, and each batch's indices point at its labels
    (_, labels, classes), *batches = SEEN
    assert classes == data.num_classes and torch.equal(labels, data.train_labels())
    stages = [(b[1], b[2], b[3]) for b in batches]
    assert stages[0] == (INIT, 0, 2) and stages[-1] == (MAIN, 1, 2)
    for _, _, _, _, idx, y, _ in batches:
        assert torch.equal(labels[idx], y)
    assert len({b[6] for b in batches}) == len(batches)  # a seed of its own per step


def test_the_classifier_is_left_alone_in_the_initialisation_stage(data, teacher):
    """No gradient reaches the classifier there: neither the rate nor weight decay move it
    (RepDistiller's init optimiser holds the feature modules only)."""
    one = Recipe(epochs=1, batch_size=32, lr=0.0, momentum=0.0, weight_decay=0.0)
    acc = make_accelerator("cpu")
    start = train(data, STUDENT, build_method("student"), one, 3, acc).model
    after = train(data, STUDENT, build_method("hint_init"), Recipe(
        epochs=1, batch_size=32, lr=0.0, momentum=0.0, weight_decay=0.5), 3, acc, teacher).model
    assert torch.equal(start.fc.weight, after.fc.weight)
    assert not torch.equal(start.conv1.weight, after.conv1.weight)  # the features did train


def test_a_run_killed_in_the_initialisation_stage_resumes_exactly(data, teacher, tmp_path):
    acc = make_accelerator("cpu")
    full = train(data, STUDENT, build_method("hint_init"), RECIPE, 1, acc, teacher)
    ckpt = tmp_path / "ckpt.pt"
    with pytest.raises(_Interrupt):
        train(data, STUDENT, build_method("hint_init", {"hint_init": {"crash_at": 1}}), RECIPE,
              1, acc, teacher, checkpoint=ckpt)
    resumed = train(data, STUDENT, build_method("hint_init"), RECIPE, 1, acc, teacher,
                    checkpoint=ckpt)
    assert resumed.history == full.history
    assert _same(resumed.model, full.model)


def test_a_cohort_with_an_initialising_member_equals_solo_runs(data, teacher):
    acc = make_accelerator("cpu")
    methods = ["kd", "hint_init", "student"]
    cohort = train_cohort(data, STUDENT, [build_method(m) for m in methods], RECIPE, 2, acc,
                          teacher)
    for m, got in zip(methods, cohort, strict=True):
        solo = train(data, STUDENT, build_method(m), RECIPE, 2, acc, teacher)
        assert got.error is None and got.history == solo.history, m
        assert _same(got.model, solo.model), m


NA_PLUGIN = '''
from kt_bench.api.method import Method, NotApplicable, register_method


@register_method("needs_equal")
class NeedsEqual(Method):
    """Applies only where student and teacher stages have equal channels."""

    def __init__(self, weight=None):
        super().__init__(weight)
        self.taps = ("stage1",)

    def setup(self, student_shapes, teacher_shapes):
        if student_shapes["stage1"][1] != teacher_shapes["stage1"][1]:
            raise NotApplicable("stage1 has 4 student and 8 teacher channels")
'''


def test_a_method_that_does_not_apply_gives_an_n_a_row(tmp_path, capsys):
    folder = tmp_path / "plugins"
    folder.mkdir()
    (folder / "na.py").write_text(textwrap.dedent(NA_PLUGIN))
    grid = write_tiny_grid(tmp_path, methods=("student", "needs_equal"))
    out = tmp_path / "out"
    args = ["run", "--grid", str(grid), "--out", str(out), "--no-report", "--plugins",
            str(folder)]
    assert main(args) == 0
    # (pandas reads "n/a" as missing unless told otherwise)
    rows = pd.read_csv(out / "results.csv", keep_default_na=False).set_index("method")
    assert rows.loc["needs_equal", "status"] == "n/a"
    assert rows.loc["needs_equal", "error"] == "stage1 has 4 student and 8 teacher channels"
    assert rows.loc["student", "status"] == "ok"
    capsys.readouterr()
    assert main(args) == 0  # an n/a cell is finished: not run again
    assert "2 cells" in capsys.readouterr().out
    assert issubclass(NotApplicable, Exception)


def test_a_method_on_the_teachers_batch_statistics_leaves_the_shared_teacher_alone(data,
                                                                                   teacher):
    acc = make_accelerator("cpu")
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    methods = ["kd", "ofd"]
    cohort = train_cohort(data, STUDENT, [build_method(m) for m in methods], RECIPE, 4, acc,
                          teacher)
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in before.items())
    for m, got in zip(methods, cohort, strict=True):
        solo = train(data, STUDENT, build_method(m), RECIPE, 4, acc, teacher)
        assert got.error is None and got.history == solo.history, m
    # OFD saw the batch-statistics teacher: not what an eval-mode teacher gives
    eval_ofd = build_method("ofd")
    assert eval_ofd.needs.teacher_mode == TEACHER_BATCH_STATISTICS
    eval_ofd.needs = dataclasses.replace(eval_ofd.needs, teacher_mode=TEACHER_EVAL)
    other = train(data, STUDENT, eval_ofd, RECIPE, 4, acc, teacher)
    assert other.history != cohort[1].history
