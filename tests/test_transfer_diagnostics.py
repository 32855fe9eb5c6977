"""What a method transferred: agreement, KL and ECE against values worked out by hand, linear
CKA's defining properties, NST-poly MMD², the pairing of stages, the one-pass measurement of a
cohort against the same quantities computed directly, and a run's rows and
``diagnostics.json`` (written, kept from failing a cell, redone for a resumed cell)."""

from __future__ import annotations

import copy
import json
import math
import os
import re
import subprocess
import sys

import pytest
import torch
from kt_bench.methods.nst import nst_loss

import kt_bench.training.transfer as transfer
from kt_bench.core.errors import KtBenchError
from kt_bench.core.options import Spec
from kt_bench.data import load_dataset
from kt_bench.models import build_model
from kt_bench.models.taps import TapRecorder
from kt_bench.sweep import diagnostics as diag
from kt_bench.sweep.rows import DamagedRowError, check_row
from kt_bench.training.device import make_accelerator
from kt_bench.training.transfer import (
    calibration_bins,
    centred_gram,
    expected_calibration_error,
    kl_teacher_student,
    linear_cka,
    nst_poly_mmd2,
    pair_stages,
    stage_taps,
    top1_agreement,
)

from .conftest import rows_by_method, run_cli, write_tiny_grid

# ---- agreement, KL, ECE on four images worked out by hand ------------------------------------

#: Class probabilities of four images (3 classes); logits are their logs.
P_TEACHER = [[0.70, 0.20, 0.10], [0.10, 0.80, 0.10], [0.20, 0.20, 0.60], [0.50, 0.25, 0.25]]
P_STUDENT = [[0.62, 0.28, 0.10], [0.55, 0.35, 0.10], [0.07, 0.10, 0.83], [0.25, 0.20, 0.55]]
LABELS = [0, 1, 2, 0]


def _logits(p):
    return torch.tensor(p, dtype=torch.float64).log().float()


def test_agreement_kl_and_ece_of_a_tiny_example():
    t, s, y = _logits(P_TEACHER), _logits(P_STUDENT), torch.tensor(LABELS)
    # top-1: teacher 0, 1, 2, 0; student 0, 0, 2, 2 -> images 1 and 3 agree
    assert top1_agreement(t, s) == 50.0
    kl = [0.70 * math.log(0.70 / 0.62) + 0.20 * math.log(0.20 / 0.28),  # 3rd term log 1 = 0
          0.10 * math.log(0.10 / 0.55) + 0.80 * math.log(0.80 / 0.35),
          0.20 * math.log(0.20 / 0.07) + 0.20 * math.log(0.20 / 0.10)
          + 0.60 * math.log(0.60 / 0.83),
          0.50 * math.log(0.50 / 0.25) + 0.25 * math.log(0.25 / 0.20)
          + 0.25 * math.log(0.25 / 0.55)]
    # = 0.017658, 0.490868, 0.153896, 0.205245 nats
    assert kl_teacher_student(t, s) == pytest.approx(sum(kl) / 4, abs=1e-6)
    assert kl_teacher_student(t, s) == pytest.approx(0.216917, abs=1e-5)
    # student confidences 0.62 (right), 0.55 (wrong), 0.83 (right), 0.55 (wrong); bins of
    # width 1/15: 0.55 -> bin 8 (0.533, 0.6], 0.62 -> bin 9, 0.83 -> bin 12
    # ECE = 2/4 |0 - 0.55| + 1/4 |1 - 0.62| + 1/4 |1 - 0.83| = 0.275 + 0.095 + 0.0425
    assert expected_calibration_error(s, y) == pytest.approx(41.25, abs=1e-4)
    # one bin for all would give |0.5 - 0.6375| = 13.75 %: the binning matters
    assert expected_calibration_error(s, y, bins=1) == pytest.approx(13.75, abs=1e-4)
    bins = calibration_bins(s, y)
    assert bins[0, [8, 9, 12]].tolist() == [2, 1, 1] and bins[0].sum() == 4
    assert bins[2, [8, 9, 12]].tolist() == [0, 1, 1]


def test_the_same_distributions_agree_fully_with_no_divergence():
    t = _logits(P_TEACHER)
    assert top1_agreement(t, t + 3.0) == 100.0  # a shift changes no probability
    assert kl_teacher_student(t, t + 3.0) == pytest.approx(0.0, abs=1e-6)
    assert kl_teacher_student(t, t) >= 0.0


def test_a_confidence_of_one_falls_in_the_last_bin():
    logits = torch.tensor([[100.0, 0.0], [0.0, 100.0]])
    bins = calibration_bins(logits, torch.tensor([0, 0]))
    assert bins[0, 14] == 2 and bins[2, 14] == 1
    assert expected_calibration_error(logits, torch.tensor([0, 0])) == pytest.approx(50.0)


# ---- CKA -------------------------------------------------------------------------------------

def test_cka_of_one_feature_each_is_the_squared_correlation():
    # centred: x -> [-1, 0, 1], y -> [0, -1, 1]; covariance 1, variances 2 and 2: r = 0.5
    x = torch.tensor([[1.0], [2.0], [3.0]])
    y = torch.tensor([[1.0], [0.0], [2.0]])
    assert linear_cka(x, y) == pytest.approx(0.25, abs=1e-12)


def test_cka_is_one_for_identical_maps_and_blind_to_rotations_and_scale():
    g = torch.Generator().manual_seed(0)
    maps = torch.randn(40, 4, 3, 3, generator=g)  # 40 images, 36 features each
    q, _ = torch.linalg.qr(torch.randn(36, 36, generator=g, dtype=torch.float64))
    rotated = (maps.flatten(1).double() @ q).float()
    assert linear_cka(maps, maps) == pytest.approx(1.0, abs=1e-6)
    assert linear_cka(maps, rotated) == pytest.approx(1.0, abs=1e-5)
    assert linear_cka(maps, 2.5 * rotated) == pytest.approx(1.0, abs=1e-5)
    assert linear_cka(maps, maps + 7.0) == pytest.approx(1.0, abs=1e-5)  # centred
    other = torch.randn(40, 8, 2, 2, generator=g)  # another size of map
    unrelated = linear_cka(maps, other)
    assert 0.0 < unrelated < 0.7
    assert linear_cka(other, maps) == pytest.approx(unrelated, abs=1e-12)  # symmetric
    # a linear map that is not orthogonal changes it
    skew = maps.flatten(1) * torch.linspace(0.1, 5.0, 36)
    assert linear_cka(maps, skew) < 0.99


def test_cka_needs_the_same_images_and_is_undefined_without_variation():
    with pytest.raises(KtBenchError, match="same samples on both sides, got 3 and 4"):
        linear_cka(torch.zeros(3, 2), torch.zeros(4, 2))
    assert math.isnan(linear_cka(torch.ones(5, 3), torch.randn(5, 3)))


def test_the_gram_matrix_is_the_same_built_in_chunks(monkeypatch):
    x = torch.randn(6, 5, 2, 3)
    whole = centred_gram(x)
    monkeypatch.setattr(transfer, "GRAM_CHUNK", 7)  # 30 columns in chunks of 7
    flat = x.flatten(1).double()
    flat = flat - flat.mean(0)
    assert torch.allclose(centred_gram(x), flat @ flat.T, atol=1e-5)
    assert torch.allclose(whole, flat @ flat.T, atol=1e-5)


# ---- NST-poly MMD² ---------------------------------------------------------------------------

def test_mmd2_is_zero_for_identical_maps_and_positive_for_different_ones():
    f = torch.randn(3, 4, 5, 5)
    assert nst_poly_mmd2(f, f).item() == pytest.approx(0.0, abs=1e-6)
    assert nst_poly_mmd2(2.0 * f, f).item() == pytest.approx(0.0, abs=1e-6)  # normalised maps
    g = torch.randn(3, 6, 10, 10)  # other channels and size: aligned as NST aligns
    value = nst_poly_mmd2(g, f).item()
    assert value > 0.01
    assert value == pytest.approx(nst_loss(g, f, kernel="poly", degree=2, c=0.0,
                                           align="pool").item(), rel=1e-6)
    with pytest.raises(KtBenchError, match=r"needs \(B, C, H, W\) maps"):
        nst_poly_mmd2(torch.randn(3, 4), f)


# ---- which maps are compared -----------------------------------------------------------------

def test_stage_taps_are_the_numbered_stages_in_order():
    taps = {"stage0": "a", "stage10": "b", "stage2": "c", "stage1": "d", "stage2_pre": "e",
            "feat": "f", "pool": "g"}
    assert stage_taps(taps) == ["stage1", "stage2", "stage10"]
    assert stage_taps({"feat": "x", "pool": "y"}) == ["feat"]
    assert stage_taps({"pool": "y"}) == []


def test_stages_pair_by_order_and_else_by_relative_depth():
    three, four = ["s1", "s2", "s3"], ["t1", "t2", "t3", "t4"]
    assert pair_stages(three, ["t1", "t2", "t3"]) == [("s1", "t1"), ("s2", "t2"), ("s3", "t3")]
    # student i of 3 -> teacher round(4i/3): 1.33 -> 1, 2.67 -> 3, 4 -> 4
    assert pair_stages(three, four) == [("s1", "t1"), ("s2", "t3"), ("s3", "t4")]
    # student i of 4 -> teacher round(3i/4): 0.75 -> 1, 1.5 -> 2, 2.25 -> 2, 3 -> 3
    assert pair_stages(["a", "b", "c", "d"], ["t1", "t2", "t3"]) == [
        ("a", "t1"), ("b", "t2"), ("c", "t2"), ("d", "t3")]
    assert pair_stages(three, []) == [] and pair_stages([], four) == []


# ---- the measurement of a cohort -------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_set():
    """50 test images, a teacher and two different students (one with four stages)."""
    data = load_dataset(Spec("synthetic", {"n_train": 32, "n_test": 50, "image_size": 8}))
    torch.manual_seed(0)
    teacher = build_model(Spec("resnet8", {"width": 0.5}), data.num_classes, data.in_channels)
    students = [build_model(Spec("resnet8", {"width": 0.25}), data.num_classes,
                            data.in_channels),
                build_model(Spec("vgg8"), data.num_classes, data.in_channels)]
    return data, teacher, students


def _everything(model, data, taps):
    """Logits and ``taps`` of ``model`` on the whole test split in one batch."""
    (x, y), = data.test_batches(10_000, torch.device("cpu"))
    recorder = TapRecorder(model, model.tap_map, taps)
    try:
        with torch.inference_mode():
            return recorder.collect(model.eval()(x)), y
    finally:
        recorder.remove()


def test_a_student_identical_to_its_teacher_took_everything(tiny_set):
    data, teacher, _ = tiny_set
    (d,) = diag.measure_transfer(teacher, [copy.deepcopy(teacher)], data,
                                 make_accelerator("cpu"), batch_size=16)
    assert d["agreement"] == 100.0 and d["kl_teacher"] == pytest.approx(0.0, abs=1e-6)
    assert [s["stage"] for s in d["stages"]] == ["stage1", "stage2", "stage3"]
    for stage in d["stages"]:
        assert stage["teacher_tap"] == stage["student_tap"] == stage["stage"]
        assert stage["cka"] == pytest.approx(1.0, abs=1e-6)
        assert stage["mmd2_poly"] == pytest.approx(0.0, abs=1e-6)


def test_the_one_pass_measures_what_the_formulas_give_on_the_whole_test_set(tiny_set):
    data, teacher, students = tiny_set
    out = diag.measure_transfer(teacher, students, data, make_accelerator("cpu"), batch_size=16)
    t_all, y = _everything(teacher, data, ["stage1", "stage2", "stage3"])
    for student, d in zip(students, out, strict=True):
        s_taps = stage_taps(student.tap_map)
        s_all, _ = _everything(student, data, s_taps)
        assert d["agreement"] == pytest.approx(top1_agreement(t_all["logits"], s_all["logits"]))
        assert d["kl_teacher"] == pytest.approx(
            kl_teacher_student(t_all["logits"], s_all["logits"]), rel=1e-5)
        assert d["ece"] == pytest.approx(expected_calibration_error(s_all["logits"], y),
                                         rel=1e-5)
        assert d["cka_images"] == 50 and d["seconds"] > 0
        for stage, (s_tap, t_tap) in zip(d["stages"], pair_stages(s_taps, stage_taps(
                teacher.tap_map)), strict=True):
            assert (stage["student_tap"], stage["teacher_tap"]) == (s_tap, t_tap)
            assert stage["cka"] == pytest.approx(linear_cka(s_all[s_tap], t_all[t_tap]),
                                                 abs=1e-5)
            assert stage["mmd2_poly"] == pytest.approx(
                nst_poly_mmd2(s_all[s_tap], t_all[t_tap]).item(), rel=1e-4)
    # VGG-8 has four stages, the teacher three: paired by relative depth
    assert [(s["student_tap"], s["teacher_tap"]) for s in out[1]["stages"]] == [
        ("stage1", "stage1"), ("stage2", "stage2"), ("stage3", "stage2"), ("stage4", "stage3")]


def test_cka_reads_every_kth_image_when_it_may_keep_fewer(tiny_set):
    data, teacher, students = tiny_set
    (d,) = diag.measure_transfer(teacher, students[:1], data, make_accelerator("cpu"),
                                 batch_size=16, cka_images=10)
    t_all, _ = _everything(teacher, data, ["stage3"])
    s_all, _ = _everything(students[0], data, ["stage3"])
    every5 = torch.arange(0, 50, 5)
    assert d["cka_images"] == 10
    assert d["stages"][2]["cka"] == pytest.approx(
        linear_cka(s_all["stage3"][every5], t_all["stage3"][every5]), abs=1e-5)
    # a memory bound keeps fewer still: 1 image's maps of both networks fit, ceil(50/1)
    (small,) = diag.measure_transfer(teacher, students[:1], data, make_accelerator("cpu"),
                                     cka_memory=1)
    assert small["cka_images"] == 1 and small["stages"][0]["cka"] is None


def test_timm_and_zoo_networks_of_other_shapes_are_compared(tiny_set):
    pytest.importorskip("timm")
    data = load_dataset(Spec("synthetic", {"n_train": 32, "n_test": 12, "image_size": 32}))
    torch.manual_seed(0)
    vit = build_model({"name": "timm:vit_tiny_patch16_224", "patch_size": 8, "depth": 4},
                      data.num_classes, data.in_channels, 32)
    resnet = build_model(Spec("resnet8", {"width": 0.25}), data.num_classes, data.in_channels)
    (d,) = diag.measure_transfer(vit, [resnet], data, make_accelerator("cpu"), batch_size=5)
    # ViT taps are 4x4 maps of 192 channels, the ResNet's 32x32 of 4 up to 8x8 of 16
    assert [(s["student_tap"], s["teacher_tap"]) for s in d["stages"]] == [
        ("stage1", "stage1"), ("stage2", "stage3"), ("stage3", "stage4")]
    for stage in d["stages"]:
        assert 0.0 <= stage["cka"] <= 1.0 + 1e-6 and stage["mmd2_poly"] > 0.0


def test_row_columns_keep_the_finite_numbers():
    d = {"agreement": 80.0, "kl_teacher": 0.25, "ece": math.nan, "seconds": 1.5}
    assert diag.row_columns(d) == {"agreement": 80.0, "kl_teacher": 0.25, "diagnostics_s": 1.5}
    assert diag.row_columns(None) == {}


# ---- a run -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def measured_run(tmp_path_factory):
    """A tiny run (student and kd): its grid file and output folder."""
    from kt_bench.commands.main import main

    folder = tmp_path_factory.mktemp("measured")
    grid = write_tiny_grid(folder)
    assert main(["run", "--grid", str(grid), "--out", str(folder / "out"), "--no-report"]) == 0
    return grid, folder / "out"


def test_a_run_writes_the_columns_and_diagnostics_json(measured_run):
    _, out = measured_run
    rows = rows_by_method(out)
    for method in ("student", "kd"):
        row = rows.loc[method]
        assert 0 <= row.agreement <= 100 and row.kl_teacher >= 0 and 0 <= row.ece <= 100
        assert 0 < row.diagnostics_s < row.wall_s
        saved = json.loads((out / "cells" / row.cell_id / "diagnostics.json").read_text())
        assert (saved["agreement"], saved["kl_teacher"], saved["ece"]) == pytest.approx(
            (row.agreement, row.kl_teacher, row.ece))
        assert saved["seconds"] == pytest.approx(row.diagnostics_s)
        # resnet8 -> resnet8: one entry per stage, shallow to deep
        assert [(s["stage"], s["teacher_tap"], s["student_tap"]) for s in saved["stages"]] == [
            (f"stage{k}", f"stage{k}", f"stage{k}") for k in (1, 2, 3)]
        assert all(-1e-6 <= s["cka"] <= 1 + 1e-6 and s["mmd2_poly"] >= 0
                   for s in saved["stages"])


def test_a_resumed_cell_that_had_finished_training_is_measured(measured_run, tmp_path, capsys):
    import shutil

    grid, finished = measured_run
    out = tmp_path / "out"
    shutil.copytree(finished, out)
    kd = rows_by_method(out).loc["kd"].cell_id
    (out / "cells" / kd / "result.json").unlink()
    (out / "cells" / kd / "diagnostics.json").unlink()
    epochs_before = (out / "cells" / kd / "metrics.jsonl").read_text()
    code, _, _ = run_cli(capsys, "run", "--grid", str(grid), "--out", str(out), "--no-report")
    assert code == 0
    assert (out / "cells" / kd / "metrics.jsonl").read_text() == epochs_before  # no training
    assert (out / "cells" / kd / "diagnostics.json").exists()
    assert rows_by_method(out).loc["kd"].agreement >= 0


def test_a_failed_measurement_fails_no_cell(measured_run, tmp_path, capsys, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("no memory left for the maps\nsecond line")

    monkeypatch.setattr(diag, "measure_transfer", broken)
    grid = write_tiny_grid(tmp_path)
    code, _, err = run_cli(capsys, "run", "--grid", str(grid), "--out", str(tmp_path / "out"),
                           "--no-report", "--teacher-cache", str(measured_run[1] / "teachers"))
    assert code == 0
    warnings = [line for line in err.splitlines() if "transfer diagnostics" in line]
    assert len(warnings) == 1
    assert warnings[0].startswith("kt-bench: warning: transfer diagnostics failed "
                                  "(RuntimeError: no memory left for the maps); the rows of ")
    rows = rows_by_method(tmp_path / "out")
    assert list(rows.status) == ["ok", "ok"]
    assert "agreement" not in rows.columns
    assert not list((tmp_path / "out" / "cells").glob("*/diagnostics.json"))


def test_an_interrupt_during_the_measurement_stops_the_run(measured_run, tmp_path, capsys,
                                                           monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(diag, "measure_transfer", interrupted)
    grid = write_tiny_grid(tmp_path)
    code, _, err = run_cli(capsys, "run", "--grid", str(grid), "--out", str(tmp_path / "out"),
                           "--no-report", "--teacher-cache", str(measured_run[1] / "teachers"))
    assert code == 130 and "interrupted" in err
    assert not list((tmp_path / "out" / "cells").glob("*/result.json"))


@pytest.mark.parametrize("field,value,reason", [
    ("agreement", 101.0, "agreement = 101.0 is not a number in [0, 100]"),
    ("ece", -0.5, "ece = -0.5 is not a number in [0, 100]"),
    ("kl_teacher", -1e-3, "kl_teacher = -0.001 is not a finite number >= 0"),
    ("diagnostics_s", math.inf, "diagnostics_s = inf is not a finite number >= 0"),
])
def test_rows_with_bad_transfer_columns_are_damaged(measured_run, field, value, reason):
    _, out = measured_run
    path = next((out / "cells").glob("*/result.json"))
    row = json.loads(path.read_text())
    assert check_row(row, path.parent.name) is row  # as written: accepted
    with pytest.raises(DamagedRowError, match=re.escape(reason)):
        check_row({**row, field: value}, path.parent.name)
    del row[field]  # a row measured before, or whose measurement failed
    assert check_row(row, path.parent.name) is row


# ---- distributed -----------------------------------------------------------------------------

DDP_SCRIPT = '''
import json, sys, torch
from kt_bench.core.options import Spec
from kt_bench.data import load_dataset
from kt_bench.models import build_model
from kt_bench.sweep.diagnostics import measure_transfer
from kt_bench.training.device import make_accelerator

accelerator = make_accelerator("cpu")
data = load_dataset(Spec("synthetic", {"n_train": 32, "n_test": 37, "image_size": 8}))
torch.manual_seed(0)
teacher = build_model(Spec("resnet8", {"width": 0.5}), data.num_classes, data.in_channels)
student = build_model(Spec("vgg8"), data.num_classes, data.in_channels)
out = measure_transfer(teacher, [student], data, accelerator, batch_size=8, cka_images=12)
if accelerator.is_main_process:
    with open(sys.argv[1], "w") as fh:
        json.dump(out, fh)
if torch.distributed.is_initialized():  # a clean exit: gloo may abort at teardown otherwise
    torch.distributed.destroy_process_group()
'''


@pytest.mark.slow  # two processes start torch: ~20 s on 2 cores
def test_two_processes_measure_what_one_process_does(tmp_path):
    """Over 2 gloo processes each test image counts once (37: 19 and 18) and CKA compares
    the same subset of images, gathered, as one process does."""
    script = tmp_path / "measure.py"
    script.write_text(DDP_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, str(script), str(tmp_path / "one.json")],
                         capture_output=True, text=True, timeout=600, env=env)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(script), str(tmp_path / "two.json")],
        capture_output=True, text=True, timeout=600, env=env)
    assert two.returncode == 0, two.stderr[-3000:]
    (a,), (b,) = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two"))
    assert a["cka_images"] == b["cka_images"] == 10  # every 4th of 37
    for key in ("agreement", "kl_teacher", "ece"):
        assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), key
    for sa, sb in zip(a["stages"], b["stages"], strict=True):
        assert sb["cka"] == pytest.approx(sa["cka"], abs=1e-5)
        assert sb["mmd2_poly"] == pytest.approx(sa["mmd2_poly"], rel=1e-4)
