"""The training engine: reproducibility, exact resume, shared initialisation, divergence."""

from __future__ import annotations

import math

import pytest
import torch
from kt_bench.methods.kd import KD

from kt_bench.api.method import build_method, register_method
from kt_bench.core.errors import KtBenchError
from kt_bench.core.options import Spec
from kt_bench.data import load_dataset
from kt_bench.data.bundle import epoch_batches
from kt_bench.training.device import make_accelerator
from kt_bench.training.engine import DivergedError, train
from kt_bench.training.recipe import Recipe

DATA = Spec("synthetic", {"n_train": 96, "n_test": 48, "image_size": 8, "noise": 2.0,
                          "augment": True})
TEACHER = Spec("resnet8", {"width": 0.5})
STUDENT = Spec("resnet8", {"width": 0.25})
RECIPE = Recipe(epochs=3, batch_size=32, lr=0.05)


@pytest.fixture(scope="module")
def data():
    return load_dataset(DATA)


@pytest.fixture(scope="module")
def teacher(data):
    acc = make_accelerator("cpu")
    return train(data, TEACHER, build_method("student"), Recipe(epochs=2, batch_size=32), 0,
                 acc).model


def _params(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_same_cell_twice_gives_identical_numbers(data, teacher):
    acc = make_accelerator("cpu")
    a = train(data, STUDENT, build_method("kd+nst_poly"), RECIPE, 5, acc, teacher)
    b = train(data, STUDENT, build_method("kd+nst_poly"), RECIPE, 5, acc, teacher)
    assert a.history == b.history
    pa, pb = _params(a.model), _params(b.model)
    assert all(torch.equal(pa[k], pb[k]) for k in pa)
    c = train(data, STUDENT, build_method("kd+nst_poly"), RECIPE, 6, acc, teacher)
    assert c.history != a.history  # the seed matters


def test_every_method_of_a_seed_starts_from_the_same_student(data, teacher):
    acc = make_accelerator("cpu")
    frozen = Recipe(epochs=1, batch_size=32, lr=0.0, momentum=0.0, weight_decay=0.0)
    models = [train(data, STUDENT, build_method(m), frozen, 3, acc, teacher).model
              for m in ("student", "fitnet", "at")]
    first = dict(models[0].named_parameters())
    for other in models[1:]:
        for name, p in other.named_parameters():
            assert torch.equal(p, first[name]), name


class _Interrupt(RuntimeError):
    pass


@pytest.mark.parametrize("precision", ["no", "bf16"])
def test_resume_from_checkpoint_ends_with_the_same_numbers(data, teacher, tmp_path, precision):
    acc = make_accelerator("cpu", precision)
    full = train(data, STUDENT, build_method("fitnet"), RECIPE, 1, acc, teacher)

    @register_method("kd_crashing")
    class Crashing(KD):
        """KD that dies at the start of the third epoch, like a killed process."""

        def term_weights(self, epoch, epochs):
            if epoch == 2:
                raise _Interrupt
            return super().term_weights(epoch, epochs)

    ckpt = tmp_path / "ckpt.pt"
    kd_full = train(data, STUDENT, build_method("kd"), RECIPE, 1, acc, teacher)
    with pytest.raises(_Interrupt):
        train(data, STUDENT, build_method("kd_crashing"), RECIPE, 1, acc, teacher, checkpoint=ckpt)
    assert ckpt.exists()
    resumed = train(data, STUDENT, build_method("kd"), RECIPE, 1, acc, teacher, checkpoint=ckpt)
    assert len(resumed.history) == 3
    # the first two epochs were logged under the stand-in's name; the numbers are what count
    renamed = [{("kd" if k == "kd_crashing" else k): v for k, v in h.items()}
               for h in resumed.history]
    assert renamed == kd_full.history
    pa, pb = _params(kd_full.model), _params(resumed.model)
    assert all(torch.equal(pa[k], pb[k]) for k in pa)
    assert full.history != kd_full.history


def test_nan_loss_raises_diverged(data, teacher):
    @register_method("nan_method")
    class NaNMethod(KD):
        """Returns NaN."""

        def loss_terms(self, student, teacher, batch):
            return {self.name: student["logits"].sum() * float("nan")}

    with pytest.raises(DivergedError, match="loss became nan in epoch 1"):
        train(data, STUDENT, build_method("nan_method"), RECIPE, 0, make_accelerator("cpu"),
              teacher)


def test_method_needing_a_teacher_without_one_is_an_error(data):
    with pytest.raises(KtBenchError, match="method 'kd' needs a teacher"):
        train(data, STUDENT, build_method("kd"), RECIPE, 0, make_accelerator("cpu"))


def test_bf16_autocast_runs_on_cpu(data, teacher):
    acc = make_accelerator("cpu", "bf16")
    result = train(data, STUDENT, build_method("kd+nst_gauss"), Recipe(epochs=1, batch_size=32),
                   0, acc, teacher)
    assert math.isfinite(result.history[0]["loss"]) and 0 <= result.top1 <= 100


def test_two_stage_fitnet_trains_only_the_hint_path_first(data, teacher):
    acc = make_accelerator("cpu")
    method = build_method("fitnet", {"fitnet": {"hint_epochs": 1}})
    recipe = Recipe(epochs=1, batch_size=32)
    init = train(data, STUDENT, build_method("student"),
                 Recipe(epochs=1, batch_size=32, lr=0.0, momentum=0.0, weight_decay=0.0), 0,
                 acc).model
    hinted = train(data, STUDENT, method, recipe, 0, acc, teacher).model
    # stage 1: no labels, so the classifier and the last stage are untouched
    assert torch.equal(hinted.fc.weight, init.fc.weight)
    assert not torch.equal(hinted.layer1[0].conv1.weight, init.layer1[0].conv1.weight)


def test_epoch_batches_split_one_global_batch_over_processes():
    assert [b.numel() for b in epoch_batches(10, 4, seed=0, epoch=0)] == [4, 4, 2]
    # a last batch of fewer than two samples per process is dropped (BatchNorm needs two)
    assert [b.numel() for b in epoch_batches(9, 4, seed=0, epoch=0)] == [4, 4]
    whole = list(epoch_batches(12, 4, seed=0, epoch=0))
    parts = [list(epoch_batches(12, 4, seed=0, epoch=0, rank=r, world=2)) for r in (0, 1)]
    assert len(parts[0]) == len(whole) == 3
    for i, batch in enumerate(whole):
        assert sorted(torch.cat([parts[0][i], parts[1][i]]).tolist()) == sorted(batch.tolist())
    assert not torch.equal(whole[0], list(epoch_batches(12, 4, seed=0, epoch=1))[0])


def test_processes_train_on_their_share_of_the_one_process_augmented_batch(data):
    """Data parallelism changes who sees an image, not the image: each process's batch is
    its share of the one-process batch, augmentation included."""
    cpu = torch.device("cpu")
    whole = list(data.train_batches(1, 7, 32, cpu))
    parts = [list(data.train_batches(1, 7, 32, cpu, rank=r, world=2)) for r in (0, 1)]
    assert len(parts[0]) == len(parts[1]) == len(whole)
    for (x, y), (x0, y0), (x1, y1) in zip(whole, *parts, strict=True):
        assert torch.equal(x[0::2], x0) and torch.equal(x[1::2], x1)
        assert torch.equal(y[0::2], y0) and torch.equal(y[1::2], y1)


def test_unknown_device_and_precision_are_one_line_errors():
    with pytest.raises(KtBenchError, match="unknown device 'tpu'; accepted: auto, cpu, cuda"):
        make_accelerator("tpu")
    with pytest.raises(KtBenchError,
                       match="unknown precision 'fp8'; accepted: auto, no, bf16, fp16"):
        make_accelerator("cpu", "fp8")


@pytest.mark.parametrize("precision", ["no", "bf16"])
def test_a_cohort_gives_each_student_the_solo_run_numbers_bit_for_bit(data, teacher, precision):
    from kt_bench.training.engine import train_cohort

    acc = make_accelerator("cpu", precision)
    names = ["student", "kd", "fitnet", "at", "nst_linear", "nst_poly", "nst_gauss",
             "kd+nst_poly"]
    cohort = train_cohort(data, STUDENT, [build_method(n) for n in names], RECIPE, 4, acc,
                          teacher)
    for name, together in zip(names, cohort, strict=True):
        alone = train(data, STUDENT, build_method(name), RECIPE, 4, acc, teacher)
        assert together.error is None and together.history == alone.history, name
        pa, pb = _params(together.model), _params(alone.model)
        assert all(torch.equal(pa[k], pb[k]) for k in pa), name


def test_a_failing_student_stops_alone_in_its_cohort(data, teacher):
    from kt_bench.training.engine import train_cohort

    @register_method("nan_in_cohort")
    class NaNMethod(KD):
        """Returns NaN."""

        def loss_terms(self, student, teacher, batch):
            return {self.name: student["logits"].sum() * float("nan")}

    methods = [build_method("nan_in_cohort"), build_method("kd")]
    results = train_cohort(data, STUDENT, methods, RECIPE, 0, make_accelerator("cpu"), teacher)
    assert isinstance(results[0].error, DivergedError) and results[1].error is None
    assert len(results[1].history) == RECIPE.epochs
    assert results[1].history == train(data, STUDENT, build_method("kd"), RECIPE, 0,
                                       make_accelerator("cpu"), teacher).history


def test_networks_narrower_than_a_cpu_vector_train_in_the_default_layout():
    """PyTorch's channels-last BatchNorm backward on the CPU is several times slower below 16
    channels, so such a network trains in the default layout there; wider ones, and every
    network on CUDA, in channels_last. The engine's members follow the rule."""
    from kt_bench.api.method import Batch
    from kt_bench.models import build_model
    from kt_bench.training.device import training_memory_format
    from kt_bench.training.lifecycle import Trainee

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    narrow = build_model(Spec("resnet8", {"width": 0.5}), 10)  # 8, 16, 32 channels
    wide = build_model(Spec("resnet20"), 10)  # 16, 32, 64 channels
    assert training_memory_format(narrow, cpu) == torch.contiguous_format
    assert training_memory_format(wide, cpu) == torch.channels_last
    assert training_memory_format(narrow, cuda) == torch.channels_last
    # oneDNN's channels-last weight gradient of a strided 1x1 convolution with fewer than 8
    # input channels was wrong on an AVX2 CPU: such a network too trains in the default layout
    wide_but_strided = torch.nn.Sequential(torch.nn.Conv2d(4, 16, 1, stride=2),
                                           torch.nn.BatchNorm2d(16))
    assert training_memory_format(wide_but_strided, cpu) == torch.contiguous_format
    wide_but_strided[0] = torch.nn.Conv2d(8, 16, 1, stride=2)
    assert training_memory_format(wide_but_strided, cpu) == torch.channels_last
    wide_but_strided[0] = torch.nn.Conv2d(4, 16, 1, stride=1)
    assert training_memory_format(wide_but_strided, cpu) == torch.channels_last
    # a Trainee puts each batch into its student's layout
    seen = []
    narrow.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    trainee = Trainee(narrow, build_method("student"), torch.contiguous_format)
    trainee(torch.randn(2, 3, 8, 8).contiguous(memory_format=torch.channels_last), None,
            Batch(torch.zeros(2, dtype=torch.long)))
    assert seen[0].is_contiguous() and not seen[0].is_contiguous(
        memory_format=torch.channels_last)


def test_each_cohort_member_measures_its_own_step_time_in_this_call(
        data, teacher, tmp_path, monkeypatch):
    """A cohort's students share one wall time; each one's own steps are timed apart (what the
    report's cost figure shares that time out by), in this call only, as the wall time is."""
    import time as clock

    from kt_bench.training import device
    from kt_bench.training.engine import train_cohort

    acc = make_accelerator("cpu")
    spans = iter(range(10_000))  # a fake clock: every reading one second later

    monkeypatch.setattr(device.time, "perf_counter", lambda: float(next(spans)))
    cohort = train_cohort(data, STUDENT, [build_method("student"), build_method("kd")],
                          RECIPE, 0, acc, teacher)
    monkeypatch.undo()
    steps = 3 * 3  # 96 images in batches of 32, three epochs
    # each timed step reads the fake clock twice, one second apart
    assert [r.step_s for r in cohort] == [steps, steps]
    assert cohort[0].wall_s > steps  # the rest of the cohort's time is not theirs

    ckpt = tmp_path / "ckpt.pt"
    t0 = clock.perf_counter()
    first = train(data, STUDENT, build_method("kd"), RECIPE, 0, acc, teacher, checkpoint=ckpt)
    assert 0 < first.step_s < clock.perf_counter() - t0
    again = train(data, STUDENT, build_method("kd"), RECIPE, 0, acc, teacher, checkpoint=ckpt)
    assert again.step_s == 0 and again.history == first.history  # nothing left to train


def test_a_checkpoint_keeps_a_multistep_schedules_milestones(tmp_path):
    """A saved MultiStepLR state (its milestones are a Counter) loads back equal, so a resumed
    multistep recipe decays at the same epochs (a copy that rebuilt dicts from their items
    once turned the Counter {150: 1} into {(150, 1): 1}: no decay after a resume)."""
    from kt_bench.training.checkpoints import load_plain, save_checkpoint

    sgd = torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.1)
    schedule = torch.optim.lr_scheduler.MultiStepLR(sgd, [2, 4], 0.1)
    save_checkpoint(tmp_path / "c.pt", {"scheduler": schedule.state_dict()})
    assert load_plain(tmp_path / "c.pt")["scheduler"] == schedule.state_dict()
    resumed = torch.optim.lr_scheduler.MultiStepLR(sgd, [9], 0.5)
    resumed.load_state_dict(load_plain(tmp_path / "c.pt")["scheduler"])
    for _ in range(4):
        sgd.step()
        resumed.step()
    assert sgd.param_groups[0]["lr"] == pytest.approx(0.1 * 0.1 * 0.1)
