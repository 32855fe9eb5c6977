"""kt-bench bench: it measures all three loops and the bare-model limit in each precision and
reports consistent ratios (no timing asserts: speed is for the bench's output, not for
tests)."""

import json

import pytest

from kt_bench.bench import BenchConfig, format_result, run_bench
from kt_bench.cli import main


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


def test_bench_times_the_start_up_of_a_short_run():
    """A real 1-epoch run in a subprocess: its phases, in order, add up to its first step."""
    from kt_bench.bench import startup_timing

    st = startup_timing("cpu", "no")
    assert list(st["phases"]) == ["imports", "plan", "data", "teacher", "networks", "first step"]
    assert st["first_step_s"] == pytest.approx(sum(st["phases"].values()))
    assert 0 < st["first_step_s"] < st["run_wall_s"]
