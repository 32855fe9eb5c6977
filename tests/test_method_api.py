"""The method API: one ``loss_terms(student, teacher, batch)`` signature, one ``needs``
declaration (retired attributes and bad modes refused in one line), combinations merging their
members' needs, the batch checked against them, and the training hooks' calls."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from kt_bench.api.method import (
    TEACHER_BATCH_STATISTICS,
    TEACHER_EVAL,
    Batch,
    CombinedMethod,
    InitStage,
    Method,
    Needs,
    build_method,
    init_stage,
    register_method,
)
from kt_bench.core.errors import ConfigError, KtBenchError, PluginError
from kt_bench.core.options import Spec
from kt_bench.data import load_dataset
from kt_bench.models import build_model
from kt_bench.training.device import make_accelerator
from kt_bench.training.engine import train_cohort
from kt_bench.training.hooks import TrainingHooks
from kt_bench.training.lifecycle import Trainee, check_batch, plan_epoch, step_loss
from kt_bench.training.recipe import Recipe

DATA = Spec("synthetic", {"n_train": 96, "n_test": 48, "image_size": 8, "noise": 2.0})
TEACHER = Spec("resnet8", {"width": 0.5})
STUDENT = Spec("resnet8", {"width": 0.25})
LABELS = torch.zeros(4, dtype=torch.long)


def _one_line(exc: pytest.ExceptionInfo) -> str:
    message = str(exc.value)
    assert "\n" not in message
    return message


def test_a_loss_terms_without_the_batch_is_refused_at_class_definition():
    with pytest.raises(PluginError) as exc:
        class NoBatch(Method):
            """Written for the earlier API."""

            def loss_terms(self, student, teacher):
                return {}

    message = _one_line(exc)
    assert "NoBatch" in message and "loss_terms takes (self, student, teacher)" in message
    assert message.endswith("accepted: loss_terms(self, student, teacher, batch)")


def test_a_loss_terms_with_the_batch_is_accepted():
    class WithBatch(Method):
        """Reads the labels."""

        needs = Needs(labels=True)

        def loss_terms(self, student, teacher, batch):
            return {"n": batch.labels.float().sum()}

    assert WithBatch().loss_terms({}, {}, Batch(LABELS + 2))["n"].item() == 8


def test_setting_a_retired_attribute_names_its_replacement():
    class OldInit(Method):
        """Sets its initialisation stage the earlier way."""

        def __init__(self, weight=None):
            super().__init__(weight)
            self.init_epochs = 3

    with pytest.raises(PluginError) as exc:
        OldInit()
    message = _one_line(exc)
    assert "'init_epochs' is no longer read" in message and "needs.init" in message
    assert "init_stage(epochs, lr)" in message

    with pytest.raises(PluginError) as exc:
        class OldMode(Method):
            """Asks for the teacher's batch statistics the earlier way."""

            teacher_batch_statistics = True

    message = _one_line(exc)
    assert "OldMode" in message and "'teacher_batch_statistics' is no longer read" in message
    assert 'Needs(teacher_mode="batch_statistics")' in message


@pytest.mark.parametrize("name", ["init_epochs", "init_lr", "init_trains_student",
                                  "teacher_batch_statistics", "float32_terms"])
def test_every_retired_attribute_is_refused_when_set_and_absent_when_read(name):
    method = Method()
    with pytest.raises(PluginError, match=f"'{name}' is no longer read; declare it as "):
        setattr(method, name, 1)
    with pytest.raises(AttributeError):
        getattr(method, name)


def test_an_unknown_teacher_mode_lists_the_accepted_ones():
    with pytest.raises(PluginError) as exc:
        Needs(teacher_mode="bogus")
    assert _one_line(exc) == ("Needs(teacher_mode='bogus') is invalid; "
                              "accepted: eval, batch_statistics")


def test_the_taps_attribute_replaces_only_the_needs_taps():
    class Tapping(Method):
        """Declares its stage in needs; its taps in __init__."""

        needs = Needs(labels=True, init=init_stage(2))

        def __init__(self, weight=None):
            super().__init__(weight)
            self.taps = ["stage1", "logits"]

    method = Tapping()
    assert method.needs == Needs(taps=("stage1", "logits"), labels=True,
                                 init=InitStage(2, None, True))
    assert method.needs_teacher and method.needs.init_epochs == 2
    assert Tapping.needs.taps == ()  # the class's declaration is untouched
    assert Method().needs.init_epochs == 0 and not Method().needs_teacher


class _Reader(Method):
    """Reads the labels and two taps."""

    needs = Needs(taps=("feat", "logits"), labels=True)


class _Initialising(Method):
    """Reads the indices on the teacher's batch statistics, after an initialisation stage."""

    needs = Needs(taps=("logits", "stage2"), teacher_mode=TEACHER_BATCH_STATISTICS,
                  indices=True, init=init_stage(2, lr=0.1, trains_student=False))


def test_a_combination_merges_its_members_needs():
    combined = CombinedMethod([_Reader(), _Initialising()])
    assert combined.needs == Needs(
        taps=("feat", "logits", "stage2"), teacher_mode=TEACHER_BATCH_STATISTICS,
        labels=True, indices=True, init=InitStage(2, 0.1, False))
    # no member asks for more than the eval-mode teacher, no stage, no labels: neither does it
    plain = CombinedMethod([_Reader(), Method()])
    assert plain.needs.teacher_mode == TEACHER_EVAL and plain.needs.init is None
    assert plain.needs.labels and not plain.needs.indices


def test_a_combination_through_the_registry_merges_the_same_way():
    register_method("reader")(_Reader)
    register_method("initialising")(_Initialising)
    combined = build_method("reader+initialising")
    assert isinstance(combined, CombinedMethod)
    assert combined.needs.taps == ("feat", "logits", "stage2")
    assert combined.needs.init == InitStage(2, 0.1, False)


def test_a_combination_of_two_initialisation_stages_is_refused():
    with pytest.raises(ConfigError, match="at most one member may have an initialisation"):
        CombinedMethod([_Initialising(), _Initialising()])


def test_a_batch_without_the_indices_a_method_reads_is_a_one_line_error():
    method = _Initialising()
    method.name = "needs_indices"
    with pytest.raises(KtBenchError) as exc:
        check_batch(method, Batch(LABELS))
    assert _one_line(exc) == ("method 'needs_indices' needs the samples' indices in the "
                              "training set, and this loop gives none")
    check_batch(method, Batch(LABELS, indices=torch.arange(4)))
    check_batch(_Reader(), Batch(LABELS))  # a method that reads no indices needs none
    no_indices = dataclasses.replace(method.needs, indices=False)
    method.needs = no_indices
    check_batch(method, Batch(LABELS))


class _Recorder(TrainingHooks):
    """Records every hook call in order."""

    def __init__(self, wants_step_values: bool = False) -> None:
        self.calls: list[tuple] = []
        self.wants_step_values = wants_step_values

    def networks_ready(self) -> None:
        """Record the call."""
        self.calls.append(("networks_ready",))

    def start(self, total_steps: int) -> None:
        """Record the call and the total steps."""
        self.calls.append(("start", total_steps))

    def step(self) -> None:
        """Record the call."""
        self.calls.append(("step",))

    def step_values(self, step, values) -> None:
        """Record the step and the names of its values."""
        self.calls.append(("step_values", step, sorted(values)))

    def epoch_end(self, step, records) -> None:
        """Record the step and copies of the records."""
        self.calls.append(("epoch_end", step, {i: dict(r) for i, r in records.items()}))

    def end(self) -> None:
        """Record the call."""
        self.calls.append(("end",))


@pytest.fixture(scope="module")
def data():
    return load_dataset(DATA)


def test_a_cohort_calls_its_hooks_once_per_step_epoch_and_run(data):
    teacher = build_model(TEACHER, data.num_classes, data.in_channels)  # untrained will do
    recipe = Recipe(epochs=2, batch_size=32, lr=0.05)
    recorder = _Recorder()
    results = train_cohort(data, STUDENT, [build_method("student"), build_method("kd")],
                           recipe, 0, make_accelerator("cpu"), teacher, hooks=[recorder])
    steps = 3  # 96 training images in batches of 32
    kinds = [c[0] for c in recorder.calls]
    assert kinds == (["networks_ready", "start"] + (["step"] * steps + ["epoch_end"]) * 2
                     + ["end"])
    assert recorder.calls[1] == ("start", 2 * steps)
    ends = [c for c in recorder.calls if c[0] == "epoch_end"]
    for epoch, (_, step, records) in enumerate(ends):
        assert step == (epoch + 1) * steps
        assert records == {i: r.history[epoch] for i, r in enumerate(results)}  # both


def test_a_lone_student_gives_its_step_values_to_a_hook_that_wants_them(data):
    recorder = _Recorder(wants_step_values=True)
    train_cohort(data, STUDENT, [build_method("student")], Recipe(epochs=1, batch_size=32),
                 0, make_accelerator("cpu"), hooks=[recorder])
    values = [c for c in recorder.calls if c[0] == "step_values"]
    assert values == [("step_values", s, ["ce", "loss"]) for s in (1, 2, 3)]


def test_a_step_without_the_indices_its_method_reads_is_a_one_line_error():
    """step_loss, the one step of every loop, checks the batch against the method's needs."""
    method = _Initialising()
    trainee = Trainee(build_model("resnet8", 10, 3), method)
    plan = plan_epoch(method, 2, 1, 1.0)  # its main stage
    with pytest.raises(KtBenchError, match="needs the samples' indices"):
        step_loss(trainee, torch.randn(2, 3, 8, 8), plan.batch(LABELS[:2]), {}, plan)
