"""Downstream evaluations: the linear probe's value against a recomputation by hand, its cached
features and its resume after a kill; units run after their cells and for a folder trained
earlier, each in its own folder, failing alone; the grid tables' errors."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pandas as pd
import pytest
import torch

from kt_bench.commands.main import main
from kt_bench.core import atomic
from kt_bench.core.errors import ConfigError, KtBenchError
from kt_bench.core.options import Spec
from kt_bench.data import load_dataset
from kt_bench.downstream import DOWNSTREAM_KINDS, UnitContext
from kt_bench.downstream import linear_probe as lp
from kt_bench.downstream.linear_probe import ProbeOptions
from kt_bench.models import build_model
from kt_bench.sweep.config import grid_from_table
from kt_bench.training.checkpoints import load_plain

from .conftest import run_cli

PROBE = DOWNSTREAM_KINDS.get("linear_probe")
OPTIONS = ProbeOptions(epochs=6, milestones=(3,), batch_size=32)
#: A second dataset kt-bench makes, of the digits students' channels and size.
SYNTHETIC = Spec("synthetic", {"channels": 1, "image_size": 8, "num_classes": 4, "n_train": 64,
                               "n_test": 32, "noise": 0.5})
DIGITS = Spec("digits", {"image_size": 8})

GRID = """
name = "probed"
datasets = [{{ name = "digits", image_size = 8 }}]
methods = ["student", "kd"]
seeds = [0]

[[pairs]]
teacher = {{ name = "resnet8", width = 0.5 }}
student = {{ name = "resnet8", width = 0.25 }}

[recipe]
epochs = 1
batch_size = 64

[teacher_recipe]
epochs = 1
{downstream}
"""

PROBES = """
[[downstream]]
name = "probe-digits"
kind = "linear_probe"
dataset = { name = "digits", image_size = 8 }
options = { epochs = 4, milestones = [2] }

[[downstream]]
name = "probe-synthetic"
kind = "linear_probe"
options = { epochs = 4, milestones = [2] }
only = ["method=kd"]

[downstream.dataset]
name = "synthetic"
channels = 1
image_size = 8
num_classes = 4
n_train = 64
n_test = 32
"""


def _student(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model(Spec("resnet8", {"width": 0.25}), 10, 1, 8)


def _ctx(folder: Path, student: torch.nn.Module, dataset: Spec = DIGITS,
         options: ProbeOptions = OPTIONS) -> UnitContext:
    return UnitContext(folder, student, options, dataset, None, torch.device("cpu"), "no", 0,
                       lambda line: None)


def _write_grid(folder: Path, downstream: str = PROBES) -> Path:
    path = folder / "probed.toml"
    path.write_text(textwrap.dedent(GRID.format(downstream=downstream)))
    return path


@pytest.mark.parametrize("dataset", [DIGITS, SYNTHETIC], ids=["digits", "synthetic"])
def test_probe_top1_is_a_linear_classifier_on_the_pooled_last_stage(tmp_path, dataset):
    student = _student()
    metrics = PROBE.run(_ctx(tmp_path, student, dataset))
    data = load_dataset(dataset)
    # by hand: the last stage's map averaged over its positions, then the saved classifier
    maps = {}
    handle = student.layer3.register_forward_hook(lambda m, i, o: maps.__setitem__("s", o))
    x_test = torch.cat([x for x, _ in data.test_batches(1000, torch.device("cpu"))])
    y_test = torch.cat([y for _, y in data.test_batches(1000, torch.device("cpu"))])
    with torch.no_grad():
        student.eval()(x_test)
    handle.remove()
    feats = maps["s"].mean(dim=(2, 3))
    cached = load_plain(tmp_path / lp.FEATURES)
    torch.testing.assert_close(cached["test"], feats, rtol=1e-5, atol=1e-6)
    assert torch.equal(cached["test_labels"], y_test)
    assert cached["train"].shape == (data.n_train, feats.shape[1])
    saved = load_plain(tmp_path / lp.CHECKPOINT)
    assert saved["epoch"] == OPTIONS.epochs
    logits = feats @ saved["classifier"]["weight"].T + saved["classifier"]["bias"]
    expected = 100.0 * (logits.argmax(1) == y_test).float().mean().item()
    assert metrics["top1"] == pytest.approx(expected, abs=1e-9)
    assert 0.0 <= metrics["top1"] <= 100.0


def test_features_are_computed_once_and_again_for_other_weights(tmp_path, monkeypatch):
    first = PROBE.run(_ctx(tmp_path, _student()))
    calls, loads = [], []
    real, real_load = lp.extract, lp.load_dataset
    monkeypatch.setattr(lp, "extract", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setattr(lp, "load_dataset", lambda *a: loads.append(1) or real_load(*a))
    (tmp_path / lp.CHECKPOINT).unlink()  # the classifier trains again, on the cached features
    assert PROBE.run(_ctx(tmp_path, _student())) == first and calls == [] and loads == []
    other = PROBE.run(_ctx(tmp_path, _student(seed=1)))  # another student: computed again
    assert calls == [1, 1] and loads == [1] and other != first
    assert load_plain(tmp_path / lp.CHECKPOINT)["epoch"] == OPTIONS.epochs


def test_a_probe_interrupted_after_an_epoch_resumes_to_the_same_classifier(tmp_path,
                                                                           monkeypatch):
    whole = PROBE.run(_ctx(tmp_path / "whole", _student()))
    saves = []
    real = lp.save_checkpoint

    def stop_after_three(path, state):
        real(path, state)
        saves.append(path.name)
        if saves.count(lp.CHECKPOINT) == 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(lp, "save_checkpoint", stop_after_three)
    with pytest.raises(KeyboardInterrupt):
        PROBE.run(_ctx(tmp_path / "cut", _student()))
    assert load_plain(tmp_path / "cut" / lp.CHECKPOINT)["epoch"] == 3
    monkeypatch.setattr(lp, "save_checkpoint", real)
    assert PROBE.run(_ctx(tmp_path / "cut", _student())) == whole
    a = load_plain(tmp_path / "whole" / lp.CHECKPOINT)["classifier"]
    b = load_plain(tmp_path / "cut" / lp.CHECKPOINT)["classifier"]
    assert all(torch.equal(a[k], b[k]) for k in a)


KILLED = """
import os, signal, sys
from pathlib import Path
import torch
from kt_bench.core.options import Spec
from kt_bench.downstream import DOWNSTREAM_KINDS, UnitContext
from kt_bench.downstream import linear_probe as lp
from kt_bench.models import build_model

real = lp.save_checkpoint
count = [0]
def save(path, state):
    real(path, state)
    if path.name == lp.CHECKPOINT:
        count[0] += 1
        if count[0] == int(sys.argv[2]):
            os.kill(os.getpid(), signal.SIGKILL)
lp.save_checkpoint = save
torch.manual_seed(0)
student = build_model(Spec("resnet8", {"width": 0.25}), 10, 1, 8)
options = lp.ProbeOptions(epochs=6, milestones=(3,), batch_size=32)
ctx = UnitContext(Path(sys.argv[1]), student, options, Spec("digits", {"image_size": 8}), None,
                  torch.device("cpu"), "no", 0, print)
print("top1", DOWNSTREAM_KINDS.get("linear_probe").run(ctx)["top1"])
"""


def test_a_probe_killed_mid_run_resumes_from_its_files(tmp_path):
    script = tmp_path / "probe.py"
    script.write_text(KILLED)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    killed = subprocess.run([sys.executable, str(script), str(tmp_path / "unit"), "2"],
                            capture_output=True, text=True, env=env, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    features = (tmp_path / "unit" / lp.FEATURES).stat().st_mtime_ns
    assert load_plain(tmp_path / "unit" / lp.CHECKPOINT)["epoch"] == 2
    resumed = subprocess.run([sys.executable, str(script), str(tmp_path / "unit"), "99"],
                             capture_output=True, text=True, env=env, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert (tmp_path / "unit" / lp.FEATURES).stat().st_mtime_ns == features  # not recomputed
    assert "features:" not in resumed.stdout
    whole = subprocess.run([sys.executable, str(script), str(tmp_path / "whole"), "99"],
                           capture_output=True, text=True, env=env, timeout=300)
    assert resumed.stdout.strip() == whole.stdout.splitlines()[-1]
    a = load_plain(tmp_path / "whole" / lp.CHECKPOINT)["classifier"]
    b = load_plain(tmp_path / "unit" / lp.CHECKPOINT)["classifier"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_dataset_of_other_channels_is_one_line(tmp_path):
    three = Spec("synthetic", {"channels": 3, "image_size": 8, "n_train": 16, "n_test": 8})
    with pytest.raises(KtBenchError, match=r"^dataset synthetic\(.*\) has 3-channel images; "
                                           "the student takes 1-channel images$"):
        PROBE.run(_ctx(tmp_path, _student(), three))


@pytest.fixture(scope="module")
def probed(tmp_path_factory):
    """A tiny grid trained with two probes: its folder and grid file."""
    folder = tmp_path_factory.mktemp("probed")
    grid = _write_grid(folder)
    out = folder / "out"
    code = main(["run", "--grid", str(grid), "--out", str(out), "--device", "cpu",
                 "--precision", "no", "--no-report"])
    assert code == 0
    return out, grid


def test_run_evaluates_each_finished_cell_in_a_unit_of_its_own(probed):
    out, _ = probed
    rows = pd.read_csv(out / "results.csv")
    lines = pd.read_csv(out / "downstream.csv")
    assert set(lines["status"]) == {"ok"} and set(lines["metric"]) == {"top1"}
    pairs = sorted(zip(lines["unit"], lines["method"], strict=True))
    assert pairs == [("probe-digits", "kd"), ("probe-digits", "student"),
                     ("probe-synthetic", "kd")]  # only = ["method=kd"]
    assert lines["value"].between(0, 100).all()
    by_cell = rows.set_index("cell_id")
    for line in lines.itertuples():
        assert by_cell.loc[line.cell_id, "method"] == line.method
        assert by_cell.loc[line.cell_id, "setting_id"] == line.setting_id
        folder = next((out / "cells" / line.cell_id / "downstream").glob(f"{line.unit}-*"))
        config = atomic.read_json(folder / "config.json")
        assert config["kind"] == "linear_probe" and config["options"]["epochs"] == 4
        assert "CRD" in config["source"]
        assert (folder / lp.FEATURES).is_file() and (folder / "result.json").is_file()
    assert {t["name"] for t in atomic.read_json(out / "downstream.json")} == {
        "probe-digits", "probe-synthetic"}


def test_downstream_command_runs_a_missing_unit_again_and_leaves_the_rest(probed, capsys):
    out, _ = probed
    before = pd.read_csv(out / "downstream.csv")
    unit = next((out / "cells").glob("*/downstream/probe-synthetic-*"))
    (unit / "result.json").unlink()
    code, stdout, _ = run_cli(capsys, "downstream", str(out), "--device", "cpu",
                              "--precision", "no")
    assert code == 0
    assert "[downstream 3/3] probe-synthetic kd seed 0: top1" in stdout
    assert stdout.count("features:") == 0  # the features were cached
    after = pd.read_csv(out / "downstream.csv")
    cols = ["cell_id", "unit", "value"]
    assert after.sort_values(cols)[cols].equals(before.sort_values(cols)[cols])


def test_a_folder_trained_without_evaluations_gets_them_from_a_grid(tmp_path, capsys):
    grid = _write_grid(tmp_path, downstream="")
    out = tmp_path / "out"
    assert main(["run", "--grid", str(grid), "--out", str(out), "--device", "cpu",
                 "--precision", "no", "--no-report", "--methods", "student"]) == 0
    assert not (out / "downstream.csv").exists()
    code, _, err = run_cli(capsys, "downstream", str(out))
    assert code == 2 and "records no downstream evaluations" in err
    probes = _write_grid(tmp_path / "other" if (tmp_path / "other").mkdir() is None else tmp_path)
    code, stdout, _ = run_cli(capsys, "downstream", str(out), "--grid", str(probes),
                              "--device", "cpu", "--precision", "no", "--only", "seed=0")
    assert code == 0 and "1 ok, 0 failed" in stdout
    assert list(pd.read_csv(out / "downstream.csv")["unit"]) == ["probe-digits"]
    code, _, err = run_cli(capsys, "downstream", str(out), "--grid", "demo", "--only",
                           "method=kd")
    assert code == 2 and "no finished (ok) cell matching method=kd" in err


def test_a_failing_unit_fails_alone_and_leaves_its_cell_alone(tmp_path, capsys):
    missing = """
[[downstream]]
name = "probe-stl10"
kind = "linear_probe"
dataset = { name = "stl10", download = false, image_size = 8 }
"""
    grid = _write_grid(tmp_path, missing)
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "run", "--grid", str(grid), "--out", str(out), "--device",
                           "cpu", "--precision", "no", "--no-report", "--methods", "student",
                           "--data-root", str(tmp_path / "nowhere"))
    assert code == 1 and "1 downstream unit(s) did not finish ok: probe-stl10 of student" in err
    rows = pd.read_csv(out / "results.csv")
    assert list(rows["status"]) == ["ok"]
    lines = pd.read_csv(out / "downstream.csv")
    assert list(lines["status"]) == ["failed"] and lines["value"].isna().all()
    error = lines["error"][0]
    assert str(tmp_path / "nowhere") in error and "\n" not in error


def _table(downstream: str) -> dict:
    import tomllib

    return tomllib.loads(textwrap.dedent(GRID.format(downstream=downstream)))


@pytest.mark.parametrize("table, message", [
    ('[[downstream]]\nkind = "probe"\ndataset = "digits"',
     r"downstream\[0\]\.kind: unknown downstream kind 'probe'.*known: .*linear_probe"),
    ('[[downstream]]\nkind = "linear_probe"',
     r"downstream\[0\]: missing key 'dataset'"),
    ('[[downstream]]\nkind = "linear_probe"\ndataset = "digits"\ncolour = 1',
     r"downstream\[0\]: unknown key 'colour'; accepted: name, kind, dataset, only, options"),
    ('[[downstream]]\nkind = "linear_probe"\ndataset = "digits"\noptions = { epoch = 3 }',
     r"downstream\[0\]\.options: unknown key 'epoch'; accepted: tap, epochs"),
    ('[[downstream]]\nkind = "linear_probe"\ndataset = "digits"\noptions = { epochs = "x" }',
     r"downstream\[0\]\.options\.epochs must be an integer"),
    ('[[downstream]]\nkind = "linear_probe"\ndataset = "digits"\noptions = { milestones = '
     '[500] }', r"options\.milestones = \(500,\) is invalid"),
    ('[[downstream]]\nkind = "linear_probe"\ndataset = "nothing"',
     r"downstream\[0\]: unknown dataset 'nothing'"),
    ('[[downstream]]\nkind = "linear_probe"\ndataset = "digits"\nonly = ["colour=red"]',
     r"downstream\[0\]\.only: 'colour=red' is invalid"),
    ('[[downstream]]\nkind = "linear_probe"\ndataset = "digits"\n'
     '[[downstream]]\nkind = "linear_probe"\ndataset = "digits"',
     r"two downstream tables are named 'linear_probe-digits'"),
])
def test_bad_downstream_tables_are_one_line_naming_the_key(table, message):
    with pytest.raises(ConfigError) as exc:
        grid_from_table(_table(table), "grid.toml")
    text = str(exc.value)
    assert "\n" not in text and text.startswith("grid.toml: ")
    assert re.search(message, text), text


def test_the_grid_files_evaluations_are_read(tmp_path):
    grid = grid_from_table(_table(PROBES), "grid.toml")
    assert [(d.name, d.kind, d.dataset.name, d.only) for d in grid.downstream] == [
        ("probe-digits", "linear_probe", "digits", ()),
        ("probe-synthetic", "linear_probe", "synthetic", ("method=kd",))]
    assert grid.downstream[0].options == ProbeOptions(epochs=4, milestones=(2,))


def test_the_demo_grid_probes_every_student(capsys):
    assert main(["run", "--grid", "demo", "--dry-run", "--only", "seed=0",
                 "--only", "method=student,kd"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"2 downstream units; estimate: [0-9.]+ GPU-hours", out)
    assert len(re.findall(r"probe-digits\s+linear_probe\s+digits\(image_size=16\)\s+[0-9.]+",
                          out)) == 2


DETECTION_GRID = """
name = "detected"
datasets = [{{ name = "synthetic", n_train = 64, n_test = 32, image_size = 8 }}]
methods = ["student", "kd"]

[[pairs]]
teacher = {{ name = "resnet8", width = 0.5 }}
student = {{ name = "resnet8", width = 0.25 }}

[recipe]
epochs = 1
batch_size = 32

[[downstream]]
name = "voc"
kind = "detection"
dataset = {{ name = "voc2007", root = "{root}" }}

[downstream.options]
epochs = 1
batch_size = 4
min_size = 64
max_size = 96
workers = 0
warmup_iters = 0

[[downstream]]
name = "voc-stage4"
kind = "detection"
dataset = {{ name = "voc2007", root = "{root}" }}
options = {{ epochs = 1, min_size = 64, max_size = 96, workers = 0, layers = ["stage4"] }}
only = ["method=student"]
"""


def test_a_grid_fine_tunes_its_students_as_detectors_and_a_missing_tap_fails_alone(tmp_path,
                                                                                 capsys):
    from .test_downstream_detection import write_voc

    write_voc(tmp_path / "voc")
    grid = tmp_path / "detected.toml"
    grid.write_text(DETECTION_GRID.format(root=tmp_path / "voc"))
    out = tmp_path / "out"
    code, stdout, err = run_cli(capsys, "run", "--grid", str(grid), "--out", str(out),
                                "--device", "cpu", "--precision", "no")
    assert code == 1 and "voc-stage4 of student seed 0" in err
    assert list(pd.read_csv(out / "results.csv")["status"]) == ["ok", "ok"]
    lines = pd.read_csv(out / "downstream.csv").sort_values(["unit", "method"])
    assert list(zip(lines["unit"], lines["method"], lines["status"], strict=True)) == [
        ("voc", "kd", "ok"), ("voc", "student", "ok"), ("voc-stage4", "student", "failed")]
    assert set(lines["metric"].dropna()) == {"map50"}
    assert lines.loc[lines["status"] == "ok", "value"].between(0, 100).all()
    error = lines.loc[lines["status"] == "failed", "error"].item()
    assert "stage4" in error and "stage3" in error and "\n" not in error
    assert "voc map50 (Δ vs student" in stdout  # the table's column
    report = (out / "report.md").read_text()
    assert "## Downstream evaluations" in report and "voc-stage4" in report


def test_no_downstream_records_the_evaluations_for_later_and_a_new_recipe_replaces_the_old(
        tmp_path, capsys):
    grid = _write_grid(tmp_path)
    out = tmp_path / "out"
    assert main(["run", "--grid", str(grid), "--out", str(out), "--device", "cpu",
                 "--precision", "no", "--no-report", "--methods", "kd", "--no-downstream"]) == 0
    assert not (out / "downstream.csv").exists() and (out / "downstream.json").is_file()
    capsys.readouterr()
    code, stdout, _ = run_cli(capsys, "downstream", str(out), "--device", "cpu")
    assert code == 0 and "2 ok, 0 failed" in stdout
    units = sorted(p.name for p in (out / "cells").glob("*/downstream/*"))
    # a run-only option (the batch of the feature pass) resumes the same unit
    grid.write_text(grid.read_text().replace("epochs = 4, milestones = [2] }",
                                             "epochs = 4, milestones = [2], "
                                             "eval_batch_size = 7 }", 1))
    code, stdout, _ = run_cli(capsys, "downstream", str(out), "--grid", str(grid))
    assert code == 0 and sorted(p.name for p in (out / "cells").glob("*/downstream/*")) == units
    # another recipe is another unit, and the table keeps the new one's value only
    grid.write_text(grid.read_text().replace("epochs = 4, milestones = [2], ",
                                             "epochs = 5, milestones = [2], ", 1))
    code, stdout, _ = run_cli(capsys, "downstream", str(out), "--grid", str(grid))
    assert code == 0 and len(list((out / "cells").glob("*/downstream/*"))) == 3
    lines = pd.read_csv(out / "downstream.csv")
    assert sorted(lines["unit"]) == ["probe-digits", "probe-synthetic"]
    newest = next(p for p in (out / "cells").glob("*/downstream/probe-digits-*")
                  if p.name not in units)
    value = atomic.read_json(newest / "result.json")["metrics"]["top1"]
    assert lines.set_index("unit").loc["probe-digits", "value"] == value
    assert atomic.read_json(newest / "config.json")["options"]["epochs"] == 5


def test_each_part_of_a_composite_grid_evaluates_its_own_cells():
    import dataclasses

    from kt_bench.workflow.downstream import evaluations_of

    leaf = grid_from_table(_table(PROBES), "grid.toml")
    other = dataclasses.replace(leaf, name="other", methods=["student"], downstream=[])
    both = dataclasses.replace(leaf, parts=[leaf, other])
    evaluations = evaluations_of(both)
    assert [e.name for e in evaluations] == ["probe-digits", "probe-synthetic"]
    assert evaluations[1].only == ("method=kd", "dataset=digits", "teacher=resnet8",
                                   "student=resnet8", "method=student,kd")
    assert evaluations_of(leaf)[1].only == ("method=kd",)
