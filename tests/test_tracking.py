"""Experiment trackers (``--log-with``): one run per cell in W&B (offline), MLflow (a local
file store) and TensorBoard, with cohorts on, read back from the files each library wrote;
per-step values of a lone cell; the routing of a cohort's records; a missing library."""

from __future__ import annotations

import json
import struct
import sys
from pathlib import Path

import pytest

from kt_bench.core.errors import KtBenchError
from kt_bench.training.tracking import (
    CellRuns,
    TrackerLog,
    TrackerRun,
    check_trackers,
    epoch_values,
    flat_params,
    mlflow_key,
    tracker_names,
)

from .conftest import run_cli, write_tiny_grid

pytest.importorskip("wandb")
pytest.importorskip("mlflow")
pytest.importorskip("tensorboard")


@pytest.fixture(scope="module")
def offline(tmp_path_factory):
    """The environment of a tracked run that never touches the network nor ``~``: W&B
    offline with its own folders, and no MLflow server."""
    home = tmp_path_factory.mktemp("home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WANDB_MODE", "offline")
        mp.delenv("WANDB_DISABLED", raising=False)
        mp.delenv("WANDB_API_KEY", raising=False)
        for var in ("WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR",
                    "WANDB_ARTIFACT_DIR"):
            mp.setenv(var, str(home / var.lower()))
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        mp.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # restored after, as kt-bench sets it
        yield mp


def _run(capsys, grid: Path, out: Path, trackers: str, *extra: str) -> None:
    code, _, err = run_cli(capsys, "run", "--grid", str(grid), "--out", str(out), "--device",
                           "cpu", "--log-with", trackers, "--no-report", *extra)
    assert code == 0, err
    assert "warning" not in err, err


def _history(out: Path) -> dict[str, list[dict]]:
    """Each cell's metrics.jsonl records, by method."""
    history = {}
    for cell in (out / "cells").iterdir():
        method = json.loads((cell / "config.json").read_text())["method"]
        history[method] = [json.loads(line)
                           for line in (cell / "metrics.jsonl").read_text().splitlines()]
    return history


@pytest.fixture(scope="module")
def cohort_run(tmp_path_factory, offline):
    """student and kd trained as one cohort, tracked in all three trackers: the output
    folder and each cell's history."""
    folder = tmp_path_factory.mktemp("tracked")
    grid = write_tiny_grid(folder)
    out = folder / "out"
    from kt_bench.commands.main import main

    assert main(["run", "--grid", str(grid), "--out", str(out), "--device", "cpu",
                 "--log-with", "wandb,mlflow,tensorboard", "--no-report"]) == 0
    return out, _history(out)


def _cell_ids(out: Path) -> dict[str, str]:
    """The cell id of each method."""
    return {json.loads((c / "config.json").read_text())["method"]: c.name
            for c in (out / "cells").iterdir()}


# --- reading what the libraries wrote ---------------------------------------------------

#: W&B's transaction log: a LevelDB-style log of 32 KiB blocks after a 7-byte header, each
#: chunk a 7-byte header (CRC32C, length, type) and a piece of a protobuf Record.
_BLOCK, _FULL, _LAST = 32768, 1, 4


def wandb_records(path: Path):
    """The protobuf records of a W&B ``.wandb`` file, in order."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, pieces = 7, b""
    while pos + 7 <= len(data):
        if _BLOCK - pos % _BLOCK < 7:  # a block's tail too short for a header is padding
            pos += _BLOCK - pos % _BLOCK
            continue
        length, kind = struct.unpack("<HB", data[pos + 4:pos + 7])
        pieces += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (_FULL, _LAST):
            record = pb.Record()
            record.ParseFromString(pieces)
            pieces = b""
            yield record


def wandb_runs(out: Path) -> dict[str, dict]:
    """Each offline W&B run under ``out/tracking``, by run name: its project, config and
    history rows."""
    runs = {}
    for path in (out / "tracking" / "wandb").glob("offline-run-*/run-*.wandb"):
        run = {"history": []}
        for record in wandb_records(path):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                run["name"], run["project"] = record.run.display_name, record.run.project
                run["config"] = {i.key: json.loads(i.value_json)
                                 for i in record.run.config.update}
            elif kind == "history":
                run["history"].append({i.key or "/".join(i.nested_key): json.loads(i.value_json)
                                       for i in record.history.item})
        runs[run["name"]] = run
    return runs


def mlflow_client(out: Path):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=(out / "tracking" / "mlruns").resolve().as_uri())


# --- a cohort of two cells, tracked -----------------------------------------------------

def test_the_cohort_trains_as_one_with_tracking_on(cohort_run):
    out, _ = cohort_run
    logs = [p.read_text() for p in out.glob("cells/*/log.txt")]
    assert len(logs) == 2 and all("in a cohort of 2" in log for log in logs)


def test_wandb_has_one_offline_run_per_cell_with_its_config_and_epochs(cohort_run):
    out, history = cohort_run
    ids = _cell_ids(out)
    runs = wandb_runs(out)
    assert set(runs) == set(ids.values())  # one run per cell, named by its id
    for method, cell_id in ids.items():
        run = runs[cell_id]
        assert run["project"] == "tiny"
        assert run["config"]["method"] == method and run["config"]["cell_id"] == cell_id
        assert run["config"]["config.recipe.lr"] == 0.05  # the resolved config, flattened
        rows = [r for r in run["history"] if "epoch" in r]
        assert [r["epoch"] for r in rows] == [1, 2]
        for row, record in zip(rows, history[method], strict=True):
            assert row["test/top1"] == pytest.approx(record["top1"])
            assert row["test/top5"] == pytest.approx(record["top5"])
            assert row["lr"] == pytest.approx(record["lr"])
            assert row["loss_total"] == pytest.approx(record["loss"])
            assert row["term/ce"] == pytest.approx(record["ce"])
        assert not [r for r in run["history"] if "train/step" in r]  # no steps in a cohort
    kd_row = [r for r in runs[ids["kd"]]["history"] if "epoch" in r][0]
    assert kd_row["term/kd"] == pytest.approx(history["kd"][0]["kd"])  # unweighted term
    assert "term/kd" not in [r for r in runs[ids["student"]]["history"] if "epoch" in r][0]


def test_mlflow_has_one_file_store_run_per_cell_with_its_params_and_epochs(cohort_run):
    out, history = cohort_run
    ids = _cell_ids(out)
    client = mlflow_client(out)
    experiment = client.get_experiment_by_name("tiny")
    runs = {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}
    assert set(runs) == set(ids.values())
    for method, cell_id in ids.items():
        run = runs[cell_id]
        assert run.info.status == "FINISHED"
        assert run.data.params["method"] == method and run.data.params["seed"] == "0"
        assert run.data.params["config.recipe.batch_size"] == "32"
        terms = [k for k in history[method][0]
                 if k not in ("epoch", "lr", "top1", "top5", "loss", "stage")]
        assert terms  # the unweighted terms of the method, each logged per epoch
        for key, name in [("top1", "test/top1"), ("top5", "test/top5"), ("lr", "lr"),
                          ("loss", "loss_total"), *[(t, f"term/{t}") for t in terms]]:
            logged = client.get_metric_history(run.info.run_id, name)
            assert [(m.step, m.value) for m in sorted(logged, key=lambda m: m.step)] == [
                (r["epoch"], pytest.approx(r[key])) for r in history[method]], name
    assert {"ce", "kd"} <= set(history["kd"][0])


def test_tensorboard_has_one_run_per_cell_in_the_cohort(cohort_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    out, history = cohort_run
    for method, cell_id in _cell_ids(out).items():
        folder = out / "tracking" / cell_id
        assert len(list(folder.iterdir())) == 1  # one event file: TensorBoard polls the last
        acc = EventAccumulator(str(folder))
        acc.Reload()
        top1 = acc.Scalars("test/top1")
        assert [(s.step, s.value) for s in top1] == [
            (r["epoch"], pytest.approx(r["top1"])) for r in history[method]]
        assert ("term/kd" in acc.Tags()["scalars"]) == (method == "kd")
        start = plugin_data_pb2.HParamsPluginData.FromString(
            acc.PluginTagToContent("hparams")["_hparams_/session_start_info"]).session_start_info
        assert start.hparams["method"].string_value == method
        assert start.hparams["config.recipe.lr"].number_value == pytest.approx(0.05)


# --- a cell alone: every step too -------------------------------------------------------

def test_a_lone_cell_also_logs_every_step_on_its_own_axis(tmp_path, capsys, cohort_run):
    grid = write_tiny_grid(tmp_path, methods=("kd",))
    out = tmp_path / "out"
    # the cohort's teacher is this grid's too: taken from its cache, not trained again
    _run(capsys, grid, out, "mlflow,wandb", "--teacher-cache", str(cohort_run[0] / "teachers"))
    client = mlflow_client(out)
    (run,) = client.search_runs([client.get_experiment_by_name("tiny").experiment_id])
    steps = client.get_metric_history(run.info.run_id, "train/kd")
    assert sorted(m.step for m in steps) == list(range(1, 7))  # 2 epochs x 3 batches of 32
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "test/top1")) \
        == [1, 2]
    (wb,) = wandb_runs(out).values()
    assert [r["train/step"] for r in wb["history"] if "train/step" in r] == list(range(1, 7))
    assert [r["epoch"] for r in wb["history"] if "epoch" in r] == [1, 2]
    assert all("epoch" not in r for r in wb["history"] if "train/step" in r)


# --- through the local launcher ---------------------------------------------------------

@pytest.mark.slow  # a submitit job: a fresh process that imports torch (10-30 s on 2 cores)
def test_a_local_job_tracks_its_cohort(tmp_path, capsys, offline):
    pytest.importorskip("submitit")
    grid = write_tiny_grid(tmp_path)
    out = tmp_path / "out"
    _run(capsys, grid, out, "mlflow", "--launcher", "local")
    logs = [p.read_text() for p in out.glob("cells/*/log.txt")]
    assert len(logs) == 2 and all("in a cohort of 2" in log for log in logs)
    client = mlflow_client(out)
    runs = client.search_runs([client.get_experiment_by_name("tiny").experiment_id])
    assert {r.info.run_name for r in runs} == set(_cell_ids(out).values())
    for run in runs:
        assert len(client.get_metric_history(run.info.run_id, "test/top1")) == 2


# --- the parts ----------------------------------------------------------------------------

def test_tracker_names_are_parsed_and_checked():
    assert tracker_names(None) == () and tracker_names("none") == ()
    assert tracker_names("wandb, mlflow,wandb") == ("wandb", "mlflow")
    with pytest.raises(KtBenchError, match=r"^--log-with: unknown tracker 'comet'; accepted: "
                                           r"tensorboard, wandb, mlflow"):
        tracker_names("wandb,comet")


def test_a_missing_library_is_an_error_naming_its_extra_before_any_training(
        tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "mlflow", None)  # as if not installed
    with pytest.raises(KtBenchError, match=r"^--log-with mlflow needs the mlflow package: "
                                           r"pip install 'kt-bench\[mlflow\]'$"):
        check_trackers(("tensorboard", "mlflow"))
    grid = write_tiny_grid(tmp_path)
    code, _, err = run_cli(capsys, "run", "--grid", str(grid), "--out", str(tmp_path / "o"),
                           "--log-with", "tensorboard,mlflow")
    assert code == 2 and "pip install 'kt-bench[mlflow]'" in err
    assert not (tmp_path / "o" / "cells").exists()  # nothing trained


def test_epoch_values_name_each_unweighted_term_and_the_weighted_total():
    record = {"epoch": 3, "lr": 0.01, "top1": 71.5, "top5": 90.0, "loss": 1.75, "ce": 1.0,
              "kd": 0.5, "stage": "init"}
    assert epoch_values(record) == {"test/top1": 71.5, "test/top5": 90.0, "lr": 0.01,
                                    "loss_total": 1.75, "term/ce": 1.0, "term/kd": 0.5}


def test_mlflow_keys_keep_what_mlflow_accepts():
    assert mlflow_key("config.method_config.kd.T") == "config.method_config.kd.T"
    assert mlflow_key("term/nst-poly x:1") == "term/nst-poly x:1"
    assert mlflow_key("kd+nst_poly.weight[0]") == "kd_nst_poly.weight_0_"


def test_flat_params_flatten_tables_and_keep_scalars():
    assert flat_params({"recipe": {"lr": 0.1, "milestones": [2, 3]}, "seed": 0, "a": None,
                        "ok": True}, "config.") == {
        "config.recipe.lr": 0.1, "config.recipe.milestones": "[2, 3]", "config.seed": 0,
        "config.ok": True}


class _Kept(TrackerRun):
    """A run keeping what it is given; failing to write from the ``fail_at``-th value on."""

    tracker = "kept"

    def __init__(self, cell_id: str, fail_at: int | None = None) -> None:
        super().__init__(cell_id)
        self.logged: list[tuple[dict, int, bool]] = []
        self.fail_at, self.closed = fail_at, None

    def _write(self, values, step, per_epoch):
        if self.fail_at is not None and len(self.logged) >= self.fail_at:
            raise OSError("disk full")
        self.logged.append((dict(values), step, per_epoch))

    def _close(self, stopped, failed):
        self.closed = "stopped" if stopped else "failed" if failed else "finished"


def test_each_students_record_goes_to_its_own_cells_runs():
    a, b, c = _Kept("a"), _Kept("b"), _Kept("c")
    # cells 0, 1 and 2 of a cohort; cell 1 failed to build: the students are cells 0 and 2
    runs = CellRuns({0: [a], 1: [b], 2: [c]})
    hook = runs.hook([0, 2])
    assert isinstance(hook, TrackerLog) and not hook.wants_step_values
    rec = {"epoch": 1, "lr": 0.1, "top1": 10.0, "top5": 50.0, "loss": 2.0, "ce": 2.0}
    hook.epoch_end(3, {0: rec, 1: {**rec, "top1": 20.0}})
    assert a.logged == [(epoch_values(rec), 1, True)]
    assert c.logged == [(epoch_values({**rec, "top1": 20.0}), 1, True)] and b.logged == []
    runs.finish(stopped=True)
    assert (a.closed, b.closed, c.closed) == ("stopped",) * 3
    assert CellRuns().hook([0, 1]) is None


def test_a_cell_that_did_not_finish_ok_closes_its_runs_as_failed():
    a, b = _Kept("a"), _Kept("b")
    CellRuns({0: [a], 1: [b]}).finish(stopped=False, failed=[1])
    assert (a.closed, b.closed) == ("finished", "failed")


def test_a_failing_run_is_named_once_and_left_out(capsys):
    broken, fine = _Kept("abc", fail_at=0), _Kept("def")
    hook = CellRuns({0: [broken, fine]}).hook([0])
    assert hook.wants_step_values  # one student: every step too
    rec = {"epoch": 1, "lr": 0.1, "top1": 10.0, "top5": 50.0, "loss": 2.0}
    hook.epoch_end(3, {0: rec})
    hook.epoch_end(6, {0: {**rec, "epoch": 2}})
    err = capsys.readouterr().err
    assert err.count("warning") == 1 and "kept run of cell abc: logging failed" in err
    assert "disk full" in err and [s for _, s, _ in fine.logged] == [1, 2]
