"""kt-bench bench: it measures all three loops and the bare-model limit in each precision and
reports consistent ratios (no timing asserts: speed is for the bench's output, not for
tests)."""

import dataclasses
import json

import pytest
import torch

from kt_bench.api.method import (
    MAIN,
    METHODS,
    TEACHER_BATCH_STATISTICS,
    TEACHER_EVAL,
    Method,
    init_stage,
    register_method,
)
from kt_bench.bench.speed import (
    BenchConfig,
    expand_methods,
    format_result,
    nst_timing,
    plain_loop,
    random_cifar,
    run_bench,
)
from kt_bench.commands.main import main
from kt_bench.training.device import make_accelerator


def test_bench_reports_every_figure_and_consistent_ratios():
    cfg = BenchConfig(teacher="resnet8", student="resnet8", methods=("student", "kd", "at"),
                      batch_size=16, steps=2, warmup=1, repeats=1, device="cpu", workers=0,
                      nst=False, precisions=("no", "bf16"), startup=False)
    r = run_bench(cfg)
    assert r["precisions"] == ["fp32", "bf16"] and set(r["runs"]) == {"fp32", "bf16"}
    assert r["runs"]["bf16"]["precision"] == "bf16" and r["runs"]["fp32"]["precision"] == "no"
    for run in r["runs"].values():
        for key in ("plain_ips", "solo_ips", "cohort_ips", "solo_vs_plain", "cohort_vs_solo",
                    "peak_mem_mb", "cohort_bound", "bare_ips", "bare_cohort_ips",
                    "solo_of_limit", "cohort_of_limit", "bare_student_step_ms"):
            assert run[key] > 0, key
        assert run["solo_vs_plain"] == pytest.approx(run["solo_ips"] / run["plain_ips"])
        assert run["cohort_vs_solo"] == pytest.approx(run["cohort_ips"] / run["solo_ips"])
        # The bound: the solo runs' time over what a cohort cannot share. Two of the three
        # methods use the teacher, so one teacher forward per batch is saved, and two data
        # paths.
        assert run["methods_with_teacher"] == 2
        solo_ms = 3 * r["images_per_epoch"] / run["solo_ips"] * 1000 / 2  # per batch, all
        saved_ms = 1 * run["teacher_step_ms"] + 2 * run["data_step_ms"]
        assert run["cohort_bound"] == pytest.approx(solo_ms / (solo_ms - saved_ms))
        assert run["student_step_ms"] == pytest.approx(
            (solo_ms - 2 * run["teacher_step_ms"] - 3 * run["data_step_ms"]) / 3)
        # The limits: three bare student steps and two teacher forwards (solo); three
        # student steps and one teacher forward (cohort); each engine figure a fraction.
        bare, teach = run["bare_student_step_ms"], run["teacher_step_ms"]
        limit_solo_ms, limit_cohort_ms = 3 * bare + 2 * teach, 3 * bare + teach
        assert run["solo_of_limit"] == pytest.approx(limit_solo_ms / solo_ms)
        cohort_ms = 3 * r["images_per_epoch"] / run["cohort_ips"] * 1000 / 2
        assert run["cohort_of_limit"] == pytest.approx(limit_cohort_ms / cohort_ms)
        assert run["bare_ips"] == pytest.approx(3 * 16 / limit_solo_ms * 1000)
    assert r["runs"]["bf16"]["solo_vs_fp32"] == pytest.approx(
        r["runs"]["bf16"]["solo_ips"] / r["runs"]["fp32"]["solo_ips"])
    assert r["images_per_epoch"] == 32 and r["methods"] == ["student", "kd", "at"]
    text = format_result(r)
    assert "fp32:" in text and "bf16:" in text and "of the limit" in text


def test_bench_json_and_bad_input(capsys):
    assert main(["bench", "--teacher", "resnet8", "--student", "resnet8", "--methods", "kd",
                 "--batch-size", "8", "--steps", "2", "--repeats", "1", "--workers", "0",
                 "--device", "cpu", "--precision", "no", "--no-nst", "--no-startup",
                 "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert list(out["runs"]) == ["fp32"]
    assert {"plain_ips", "solo_ips", "cohort_ips", "solo_vs_plain", "cohort_vs_solo",
            "peak_mem_mb", "bare_ips", "solo_of_limit", "cohort_of_limit"} <= set(
        out["runs"]["fp32"])
    assert main(["bench", "--methods", "kd,nope"]) == 2
    assert "unknown method 'nope'" in capsys.readouterr().err
    assert main(["bench", "--dataset", "digits", "--no-nst"]) == 2
    assert "bench --dataset needs an image dataset held as uint8" in capsys.readouterr().err
    assert main(["bench", "--precision", "fp32"]) == 2
    assert "unknown precision 'fp32'" in capsys.readouterr().err


@pytest.mark.slow  # 15-50 s on 2 cores: in `pytest -m slow`, not the default run
def test_bench_times_the_start_up_of_a_short_run():
    """A real 1-epoch run in a subprocess: its phases, in order, add up to its first step."""
    from kt_bench.bench.speed import startup_timing

    st = startup_timing("cpu", "no")
    assert list(st["phases"]) == ["imports", "plan", "data", "teacher", "networks", "first step"]
    assert st["first_step_s"] == pytest.approx(sum(st["phases"].values()))
    assert 0 < st["first_step_s"] < st["run_wall_s"]


#: The batch uses the bench's solo and cohort loops are checked on: the labels (DKD), the
#: samples' indices (CRD), a batch-statistics teacher (OFD), an initialisation stage (AB).
BATCH_READERS = ("dkd", "crd", "ofd", "ab")


def _tiny(methods: tuple[str, ...], **kw) -> BenchConfig:
    """A bench configuration that runs in seconds on the CPU."""
    settings = dict(teacher="resnet8", student="resnet8", methods=methods, batch_size=8,
                    steps=1, warmup=0, repeats=1, device="cpu", workers=0, nst=False,
                    precisions=("no",), startup=False)
    return BenchConfig(**{**settings, **kw})


def _register_probe(seen: dict, init_epochs: int = 0, batch_statistics: bool = False) -> None:
    """Register method ``probe``, which records the labels it is set up with, every batch it
    is given, and the mode of every teacher forward that feeds a training step."""

    def record_mode(module, inputs, output) -> None:
        if torch.is_inference_mode_enabled():  # a training step's, not a shape probe's
            seen["teacher_training"].append(module.training)

    @register_method("probe")
    class Probe(Method):
        """Matches the teacher's logits; records what the loops give it."""

        def __init__(self, weight=None):
            super().__init__(weight)
            self.taps = ("logits",)
            self.needs = dataclasses.replace(
                self.needs, labels=True, indices=True, init=init_stage(init_epochs),
                teacher_mode=TEACHER_BATCH_STATISTICS if batch_statistics else TEACHER_EVAL)

        def setup_data(self, labels, num_classes):
            seen["labels"] = labels.clone()

        def setup_teacher(self, teacher):
            teacher.register_forward_hook(record_mode)

        def loss_terms(self, student, teacher, batch):
            seen["batches"].append(batch)
            return {self.name: (student["logits"] - teacher["logits"]).pow(2).mean()}

    seen.update(labels=None, batches=[], teacher_training=[])


def test_every_loop_gives_a_method_its_batch_in_the_main_stage():
    seen: dict = {}
    _register_probe(seen, init_epochs=2)
    cfg = _tiny(("probe",), steps=2, warmup=1, repeats=1)
    r = run_bench(cfg)
    data = random_cifar(16)  # the bench's own data: batch 8 x 2 steps
    assert torch.equal(seen["labels"], data.train.labels)
    # plain, solo, cohort: 2 epochs of 2 steps each, all in the main stage (the initialisation
    # stage skipped), each batch's labels those of its samples
    assert len(seen["batches"]) == 3 * 2 * 2
    for b in seen["batches"]:
        assert b.stage == MAIN and b.epochs == 2 and b.indices is not None
        assert torch.equal(b.labels.cpu(), data.train.labels[b.indices.cpu()])
    plain, solo = seen["batches"][:4], seen["batches"][4:8]
    assert [b.epoch for b in plain] == [0, 0, 1, 1]
    for epoch in (plain[:2], plain[2:]):  # every sample once an epoch
        assert sorted(torch.cat([b.indices for b in epoch]).tolist()) == list(range(16))
    assert [b.seed for b in plain] == [b.seed for b in solo]  # the engine's step seeds
    assert r["main_stage_only"] == ["probe"]
    assert "probe: timed in the main stage" in format_result(r)


@pytest.mark.parametrize("batch_statistics", [False, True])
def test_plain_loop_runs_the_teacher_a_method_reads(batch_statistics):
    seen: dict = {}
    _register_probe(seen, batch_statistics=batch_statistics)
    cfg = _tiny(("probe",), steps=2)
    plain_loop(cfg, random_cifar(16), "probe", make_accelerator("cpu", "no"), 0)
    # OFD's kind reads the train-mode copy of the teacher, every other the frozen eval one
    assert seen["teacher_training"] == [batch_statistics] * 2


def test_every_registered_method_is_timed():
    """Every method in the plain loop; those reading each kind of batch data in all three."""
    cfg = _tiny(BATCH_READERS)
    data = random_cifar(8)
    accelerator = make_accelerator("cpu", "no")
    for name in METHODS.names():
        if name not in BATCH_READERS:
            (seconds,) = plain_loop(cfg, data, name, accelerator, 0)
            assert 8 / seconds > 0, name
    r = run_bench(cfg)
    run = r["runs"]["fp32"]
    assert list(run["method_ips"]) == list(BATCH_READERS)
    for name, ips in run["method_ips"].items():
        assert ips["plain"] > 0 and ips["solo"] > 0, name
    assert run["cohort_ips"] > 0
    assert r["main_stage_only"] == ["ab"]
    text = format_result(r)
    assert "solo images/s" in text and "ab: timed in the main stage" in text


def test_bench_methods_all_and_bad_counts(capsys):
    names = expand_methods(["kd", "all", "at"])
    assert names[0] == "kd" and sorted(names) == sorted(METHODS.names())
    assert main(["bench", "--methods", " , "]) == 2
    assert "--methods needs at least one method name" in capsys.readouterr().err
    assert main(["bench", "--methods", "kd", "--warmup", "-1"]) == 2
    assert "--warmup must be >= 0" in capsys.readouterr().err


def test_nst_timing_times_both_forms_of_nst_poly():
    """The NST figure of the bench runs the plugin through the method API (two images)."""
    timing = nst_timing(torch.device("cpu"), reps=1, images=2)
    assert set(timing) == {"nst_auto_ms", "nst_kernel_ms", "nst_speedup"}
    assert timing["nst_auto_ms"] > 0 and timing["nst_kernel_ms"] > 0
    assert timing["nst_speedup"] == timing["nst_kernel_ms"] / timing["nst_auto_ms"]
