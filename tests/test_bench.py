"""kt-bench bench: it measures all three loops and reports consistent ratios (no timing
asserts: speed is for the bench's output, not for tests)."""

import json

import pytest

from kt_bench.bench import BenchConfig, run_bench
from kt_bench.cli import main


def test_bench_reports_every_figure_and_consistent_ratios():
    cfg = BenchConfig(teacher="resnet8", student="resnet8", methods=("student", "kd", "at"),
                      batch_size=16, steps=2, warmup=1, repeats=1, device="cpu", workers=0,
                      nst=False)
    r = run_bench(cfg)
    for key in ("plain_ips", "solo_ips", "cohort_ips", "solo_vs_plain", "cohort_vs_solo",
                "peak_mem_mb", "cohort_bound"):
        assert r[key] > 0, key
    assert r["solo_vs_plain"] == pytest.approx(r["solo_ips"] / r["plain_ips"])
    assert r["cohort_vs_solo"] == pytest.approx(r["cohort_ips"] / r["solo_ips"])
    assert r["images_per_epoch"] == 32 and r["methods"] == ["student", "kd", "at"]
    # The bound: the solo runs' time over what a cohort cannot share. Two of the three
    # methods use the teacher, so one teacher forward per batch is saved, and two data paths.
    assert r["methods_with_teacher"] == 2
    solo_ms = 3 * r["images_per_epoch"] / r["solo_ips"] * 1000 / 2  # per batch, all methods
    saved_ms = 1 * r["teacher_step_ms"] + 2 * r["data_step_ms"]
    assert r["cohort_bound"] == pytest.approx(solo_ms / (solo_ms - saved_ms))
    assert r["student_step_ms"] == pytest.approx(
        (solo_ms - 2 * r["teacher_step_ms"] - 3 * r["data_step_ms"]) / 3)


def test_bench_json_and_bad_input(capsys):
    assert main(["bench", "--teacher", "resnet8", "--student", "resnet8", "--methods", "kd",
                 "--batch-size", "8", "--steps", "2", "--repeats", "1", "--workers", "0",
                 "--device", "cpu", "--no-nst", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert {"plain_ips", "solo_ips", "cohort_ips", "solo_vs_plain", "cohort_vs_solo",
            "peak_mem_mb"} <= set(out)
    assert main(["bench", "--methods", "kd,nope"]) == 2
    assert "unknown method 'nope'" in capsys.readouterr().err
    assert main(["bench", "--dataset", "digits", "--no-nst"]) == 2
    assert "bench --dataset needs an image dataset held as uint8" in capsys.readouterr().err
