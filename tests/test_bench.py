"""kt-bench bench: it measures every loop and the bare-model limits in each precision and
reports consistent ratios (no timing asserts: speed is for the bench's output, not for
tests); the fused cohort or why it was not measured; the demo's setting on the digits."""

import dataclasses
import json
import math

import pytest
import torch
from torch import nn

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
    bench_data,
    crop_flip_of,
    expand_methods,
    fitted_steps,
    format_result,
    fused_cohort_times,
    nst_timing,
    plain_loop,
    random_cifar,
    run_bench,
)
from kt_bench.commands.bench import parse_spec
from kt_bench.commands.main import main
from kt_bench.core.options import Spec
from kt_bench.data.bundle import DataBundle, load_dataset
from kt_bench.models import build_model, register_model
from kt_bench.training.device import make_accelerator

#: Every figure of (d), the fused cohort.
FUSED_KEYS = ("fused_ips", "fused_peak_mem_mb", "fused_vs_cohort", "fused_vs_plain",
              "fused_of_limit", "fused_of_fused_limit", "bare_fused_ips", "bare_fused_step_ms")


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
        # (d): against (c), against (c)'s limit, and against its own: one teacher forward
        # and one fused bare step of all three students
        assert run["fused_why"] is None
        for key in FUSED_KEYS:
            assert math.isfinite(run[key]) and run[key] > 0, key
        assert run["fused_vs_cohort"] == pytest.approx(run["fused_ips"] / run["cohort_ips"])
        assert run["fused_vs_plain"] == pytest.approx(run["fused_ips"] / run["plain_ips"])
        fused_ms = 3 * r["images_per_epoch"] / run["fused_ips"] * 1000 / 2
        assert run["fused_of_limit"] == pytest.approx(limit_cohort_ms / fused_ms)
        limit_fused_ms = run["bare_fused_step_ms"] + teach
        assert run["bare_fused_ips"] == pytest.approx(3 * 16 / limit_fused_ms * 1000)
        assert run["fused_of_fused_limit"] == pytest.approx(limit_fused_ms / fused_ms)
        assert run["peak_mem_mb"] >= run["fused_peak_mem_mb"]
    bf16, fp32 = r["runs"]["bf16"], r["runs"]["fp32"]
    assert bf16["solo_vs_fp32"] == pytest.approx(bf16["solo_ips"] / fp32["solo_ips"])
    assert bf16["fused_vs_fp32"] == pytest.approx(bf16["fused_ips"] / fp32["fused_ips"])
    assert r["images_per_epoch"] == 32 and r["methods"] == ["student", "kd", "at"]
    assert r["dataset"] == "random CIFAR" and r["image_shape"] == [3, 32, 32]
    text = format_result(r)
    assert "fp32:" in text and "bf16:" in text and "of the limit" in text
    assert text.count("(d) kt-bench fused cohort") == 2
    assert text.count("bare models (limit, fused cohort)") == 2
    assert f"fused cohort vs cohort: {bf16['fused_vs_cohort']:.2f}x" in text
    assert f"fused cohort {bf16['fused_vs_fp32']:.2f}x" in text  # in the bf16 vs fp32 line


#: A command line of a bench that runs in seconds on the CPU (methods to add).
TINY_ARGS = ["bench", "--teacher", "resnet8", "--student", "resnet8", "--batch-size", "8",
             "--steps", "2", "--repeats", "1", "--warmup", "0", "--workers", "0",
             "--device", "cpu", "--precision", "no", "--no-nst", "--no-startup", "--json"]


def test_bench_json_and_bad_input(capsys, monkeypatch):
    assert main([*TINY_ARGS, "--methods", "kd"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert list(out["runs"]) == ["fp32"]
    run = out["runs"]["fp32"]
    assert {"plain_ips", "solo_ips", "cohort_ips", "solo_vs_plain", "cohort_vs_solo",
            "peak_mem_mb", "bare_ips", "solo_of_limit", "cohort_of_limit"} <= set(run)
    # one student has nothing to be fused with: (d)'s figures are None, with the reason
    assert run["fused_why"] == "fusion needs two or more methods"
    assert all(run[key] is None for key in FUSED_KEYS)
    assert main(["bench", "--methods", "kd,nope"]) == 2
    assert "unknown method 'nope'" in capsys.readouterr().err
    # a dataset streamed from disk (imagefolder, hf, imagenet) is not one the bench takes
    monkeypatch.setattr("kt_bench.bench.speed.load_dataset", lambda spec: DataBundle())
    assert main([*TINY_ARGS, "--dataset", "synthetic", "--methods", "kd"]) == 2
    assert ("bench --dataset needs an image dataset held in memory (cifar10, cifar100, "
            "digits, synthetic), not 'synthetic'") in capsys.readouterr().err
    assert main(["bench", "--precision", "fp32"]) == 2
    assert "unknown precision 'fp32'" in capsys.readouterr().err


def test_bench_json_carries_the_fused_cohort_and_no_fused_leaves_it_out(capsys):
    assert main([*TINY_ARGS, "--methods", "student,kd"]) == 0
    run = json.loads(capsys.readouterr().out)["runs"]["fp32"]
    assert run["fused_why"] is None
    for key in FUSED_KEYS:
        assert math.isfinite(run[key]) and run[key] > 0, key
    assert run["fused_vs_cohort"] == pytest.approx(run["fused_ips"] / run["cohort_ips"])
    assert main([*TINY_ARGS, "--methods", "student,kd", "--no-fused"]) == 0
    out = json.loads(capsys.readouterr().out)
    run = out["runs"]["fp32"]
    assert run["cohort_ips"] > 0
    assert not {*FUSED_KEYS, "fused_why"} & set(run)
    text = format_result(out)  # the text the command prints without --json
    assert "(c) kt-bench cohort" in text and "fused" not in text


@register_model("bench_layernorm_net")
class LayerNormNet(nn.Module):
    """A student kt-bench cannot fuse: its LayerNorm has weights and no fused form."""

    def __init__(self, num_classes: int, in_channels: int = 3) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, 4, 3, padding=1)
        self.norm = nn.LayerNorm(4)
        self.fc = nn.Linear(4, num_classes)
        self.tap_map = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.norm(self.conv(x).mean((2, 3))))


def test_fused_cohort_refused_under_compile_trains_nothing():
    seen: dict = {}
    _register_probe(seen)
    cfg = _tiny(("student", "probe"), compile=True)
    accelerator = make_accelerator("cpu", "no")
    teacher = build_model("resnet8", 10)
    times, why = fused_cohort_times(cfg, random_cifar(8), accelerator, teacher)
    assert times is None and why == "fusion does not run compiled networks"
    assert seen["batches"] == []  # refused before any training


def test_students_that_cannot_be_fused_leave_the_fused_figures_none_with_the_reason():
    r = run_bench(_tiny(("student", "kd"), student="bench_layernorm_net"))
    run = r["runs"]["fp32"]
    assert run["cohort_ips"] > 0  # (c) trained as ever
    # the line the engine logged when it trained them unfused
    assert "cannot be fused" in run["fused_why"]
    assert "layer 'norm' (LayerNorm) has tensors of its own" in run["fused_why"]
    assert all(run[key] is None for key in FUSED_KEYS)
    text = format_result(r)
    assert f"(d) fused cohort: not measured: {run['fused_why']}" in text
    assert "(d) kt-bench fused cohort" not in text and "fused cohort vs" not in text


def test_demo_times_the_demo_setting_on_the_digits(capsys):
    assert main(["bench", "--demo", "--methods", "student,kd", "--steps", "2", "--repeats", "1",
                 "--warmup", "0", "--workers", "1", "--device", "cpu", "--precision", "no",
                 "--no-nst", "--no-startup", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert (out["teacher"], out["student"]) == ("resnet20", "resnet8(width=0.5)")
    assert out["dataset"] == "digits(image_size=16)" and out["image_shape"] == [1, 16, 16]
    assert out["methods"] == ["student", "kd"] and out["batch_size"] == 64
    assert out["images_per_epoch"] == 128
    run = out["runs"]["fp32"]
    for key in ("plain_ips", "solo_ips", "cohort_ips", "bare_ips", *FUSED_KEYS):
        assert math.isfinite(run[key]) and run[key] > 0, key


def test_demo_flags_replace_its_parts_and_keep_the_rest():
    from kt_bench.commands.bench import bench_config
    from kt_bench.commands.main import build_parser

    args = build_parser(["bench"]).parse_args(
        ["bench", "--demo", "--student", "resnet14:width=0.25", "--batch-size", "32",
         "--no-fused", "--precision", "no", "--device", "cpu"])
    cfg = bench_config(args)
    assert cfg.teacher == Spec("resnet20") and cfg.student == Spec("resnet14", {"width": 0.25})
    assert cfg.dataset == Spec("digits", {"image_size": 16}) and cfg.batch_size == 32
    assert cfg.methods == ("student", "kd", "fitnet", "at", "nst_linear", "nst_poly",
                           "nst_gauss", "kd+nst_poly")
    assert cfg.fused is False and cfg.precisions == ("no",)
    plain = bench_config(build_parser(["bench"]).parse_args(["bench", "--device", "cpu"]))
    assert (plain.teacher, plain.student, plain.dataset) == (Spec("resnet56"),
                                                             Spec("resnet20"), None)
    assert plain.fused is True and plain.batch_size == 64


def test_the_bench_takes_the_whole_batches_a_small_dataset_holds():
    cfg = BenchConfig(dataset=Spec("digits", {"image_size": 16}), batch_size=64, steps=30)
    data = bench_data(cfg)
    assert data.n_train == 22 * 64  # the digits hold 1438 training images
    assert fitted_steps(cfg, data).steps == 22
    short = dataclasses.replace(cfg, steps=10)
    assert bench_data(short).n_train == 640 and fitted_steps(short, data) is short


def test_plain_loop_crops_float_images_per_image_as_the_dataset_augments():
    digits = load_dataset(Spec("digits", {"image_size": 16}))
    assert crop_flip_of(digits) == (2, False)  # a shift of up to 1/8 of the side, no flip
    assert crop_flip_of(random_cifar(8)) == (4, True)
    assert crop_flip_of(load_dataset("synthetic")) == (0, False)  # no augmentation
    from kt_bench.bench.speed import _FloatDataset

    served = _FloatDataset(digits)
    torch.manual_seed(0)
    offsets = set()
    for i in range(20):
        x, label, index = served[i]
        assert x.shape == (1, 16, 16) and label == digits.train.labels[i] and index == i
        padded = torch.nn.functional.pad(digits.train.images[i], (2, 2, 2, 2))
        found = [(t, left) for t in range(5) for left in range(5)
                 if torch.equal(x, padded[:, t:t + 16, left:left + 16])]
        assert found, i  # a crop of the zero-padded image, never flipped
        offsets.update(found)
    assert len(offsets) > 1  # the crops differ from image to image


@pytest.mark.parametrize("text, spec", [
    ("resnet8", Spec("resnet8")),
    ("resnet8:width=0.5", Spec("resnet8", {"width": 0.5})),
    ("timm:resnet18", Spec("timm:resnet18")),
    ("timm:resnet18:pretrained=false,drop_rate=0.1",
     Spec("timm:resnet18", {"drop_rate": 0.1, "pretrained": False})),
    ("digits:image_size=16,augment=true", Spec("digits", {"augment": True, "image_size": 16})),
])
def test_a_model_or_dataset_flag_takes_options(text, spec):
    assert parse_spec(text, "--student") == spec


@pytest.mark.parametrize("text", ["resnet8:", "resnet8:width=", "resnet8:=0.5", ":width=0.5",
                                  "resnet8:width=1,width=2", "resnet8:width=0.5,", "a::b"])
def test_a_bad_spec_form_is_a_one_line_error(capsys, text):
    assert main(["bench", "--student", text]) == 2
    err = capsys.readouterr().err
    assert err == (f"kt-bench: error: --student: expected NAME or "
                   f"NAME:OPTION=VALUE[,OPTION=VALUE...], got {text!r}\n")


def test_a_bad_model_option_is_refused_before_anything_runs(capsys):
    assert main(["bench", "--student", "resnet8:widht=0.5"]) == 2
    assert capsys.readouterr().err == ("kt-bench: error: unknown option 'widht' for --student "
                                       "resnet8; accepted: width\n")


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
