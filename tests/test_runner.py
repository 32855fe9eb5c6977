"""Sweeps that survive: kill -9 and resume, concurrent runners, sweeps, tracking."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from kt_bench.commands.main import main
from kt_bench.sweep.cells import expand
from kt_bench.sweep.config import load_grid

from .conftest import SLOW_PLUGIN, share_fusion_choice, write_tiny_grid

TIMING = ["wall_s", "images_per_s", "diagnostics_s", "step_s", "cohort_step_s"]


@pytest.fixture
def slow_setup(tmp_path):
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "slow.py").write_text(SLOW_PLUGIN)
    grid = write_tiny_grid(tmp_path, methods=("slow_kd",), seeds=(0, 1, 2), epochs=4)
    return grid, plugins


def _command(grid: Path, out: Path, plugins: Path) -> list[str]:
    return [sys.executable, "-m", "kt_bench", "run", "--grid", str(grid), "--out", str(out),
            "--plugins", str(plugins), "--no-report"]


def _env():
    return {**os.environ, "PYTHONUNBUFFERED": "1"}


def _cells(out: Path) -> dict[int, Path]:
    """Cell folders by seed."""
    found = {}
    for config in out.glob("cells/*/config.json"):
        found[json.loads(config.read_text())["seed"]] = config.parent
    return found


def _wait_for(condition, timeout=120.0):
    start = time.time()
    while not condition():
        if time.time() - start > timeout:
            raise TimeoutError("condition not reached")
        time.sleep(0.05)


@pytest.mark.slow  # 15-50 s on 2 cores: in `pytest -m slow`, not the default run
def test_kill_9_mid_cell_then_rerun_equals_an_uninterrupted_run(slow_setup, tmp_path):
    grid, plugins = slow_setup
    out = tmp_path / "killed"
    proc = subprocess.Popen(_command(grid, out, plugins), env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)

    def second_cell_mid_way():
        cells = _cells(out)
        return (0 in cells and (cells[0] / "result.json").exists() and 1 in cells
                and (cells[1] / "checkpoint.pt").exists())

    try:
        _wait_for(second_cell_mid_way)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    cells = _cells(out)
    assert not (cells[1] / "result.json").exists()  # killed mid-cell
    first_done = (cells[0] / "result.json").stat().st_mtime_ns

    assert subprocess.run(_command(grid, out, plugins), env=_env(),
                          capture_output=True).returncode == 0
    assert (cells[0] / "result.json").stat().st_mtime_ns == first_done  # not run again
    log = (cells[1] / "log.txt").read_text()
    assert log.count(" start ") == 2 and "resuming from checkpoint.pt" in log

    clean = tmp_path / "clean"
    share_fusion_choice(out, clean)
    assert subprocess.run(_command(grid, clean, plugins), env=_env(),
                          capture_output=True).returncode == 0
    a = pd.read_csv(out / "results.csv").drop(columns=TIMING).sort_values("cell_id")
    b = pd.read_csv(clean / "results.csv").drop(columns=TIMING).sort_values("cell_id")
    pd.testing.assert_frame_equal(a.reset_index(drop=True), b.reset_index(drop=True))
    assert (cells[1] / "metrics.jsonl").read_text() == \
        (_cells(clean)[1] / "metrics.jsonl").read_text()


def test_two_runners_on_one_folder_run_each_cell_once(slow_setup, tmp_path):
    grid, plugins = slow_setup
    out = tmp_path / "shared"
    procs = [subprocess.Popen(_command(grid, out, plugins), env=_env(),
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
             for _ in range(2)]
    codes = [p.wait(timeout=300) for p in procs]
    assert codes == [0, 0], [p.stderr.read().decode()[-2000:] for p in procs]
    cells = _cells(out)
    assert sorted(cells) == [0, 1, 2]
    for folder in cells.values():
        assert (folder / "log.txt").read_text().count(" start ") == 1
    rows = pd.read_csv(out / "results.csv")
    assert len(rows) == 3 and set(rows["status"]) == {"ok"}
    pids = {(f / "log.txt").read_text().split("pid=")[1].split()[0] for f in cells.values()}
    assert len(pids) == 2  # both runners did work


def test_sweep_axes_make_cells_and_columns(tmp_path, capsys):
    grid_file = write_tiny_grid(tmp_path, methods=("student", "kd", "kd+nst_poly"))
    grid_file.write_text(grid_file.read_text()
                         + '\n[sweep]\n"kd.T" = [2.0, 8.0]\n"nst_poly.weight" = [1.0, 10.0]\n')
    cells = expand(load_grid(str(grid_file)))
    # student: 1 cell; kd: 2 (T); kd+nst_poly: 2 x 2
    assert len(cells) == 1 + 2 + 4
    assert {dict(c.params).get("kd.T") for c in cells if c.method == "kd"} == {2.0, 8.0}
    assert len({c.cell_id for c in cells}) == 7
    out = tmp_path / "out"
    assert main(["run", "--grid", str(grid_file), "--out", str(out)]) == 0
    rows = pd.read_csv(out / "results.csv")
    assert {"kd.T", "nst_poly.weight"} <= set(rows.columns)
    assert rows.loc[rows["method"] == "student", "kd.T"].isna().all()
    assert (out / "report" / "sensitivity_kd_T.png").exists()
    assert (out / "report" / "sensitivity_nst_poly_weight.pdf").exists()


def test_bad_sweep_keys_are_one_line_errors(tmp_path):
    from kt_bench.core.errors import KtBenchError

    grid_file = write_tiny_grid(tmp_path)
    base = grid_file.read_text()
    for sweep, message in [('"kd" = [1]', "sweep key 'kd' must be \"method.option\""),
                           ('"kd.T" = []', "sweep.kd.T must be a non-empty list"),
                           ('"kd.temp" = [1.0]', "unknown option 'temp' for method 'kd'"),
                           ('"kdx.T" = [1.0]', "unknown method 'kdx'")]:
        grid_file.write_text(base + f"\n[sweep]\n{sweep}\n")
        with pytest.raises(KtBenchError) as exc:
            load_grid(str(grid_file))
        assert str(exc.value).startswith(str(grid_file)) and message in str(exc.value)


def test_extends_merges_tables_and_replaces_values(tmp_path):
    write_tiny_grid(tmp_path)
    (tmp_path / "more.toml").write_text('name = "more"\nextends = "tiny.toml"\nseeds = [3, 4]\n'
                                        '[recipe]\nlr = 0.2\n')
    grid = load_grid(str(tmp_path / "more.toml"))
    assert grid.name == "more" and grid.seeds == [3, 4]
    assert grid.recipe.lr == 0.2 and grid.recipe.epochs == 2  # merged, not replaced
    assert grid.methods == ["student", "kd"]


def test_tensorboard_tracking_logs_every_term(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    grid = write_tiny_grid(tmp_path, methods=("kd+nst_poly",))
    out = tmp_path / "out"
    assert main(["run", "--grid", str(grid), "--out", str(out), "--log-with", "tensorboard",
                 "--no-report"]) == 0
    runs = [p for p in (out / "tracking").iterdir() if p.is_dir()]
    assert len(runs) == 1
    acc = EventAccumulator(str(runs[0]))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/kd", "train/nst_poly", "train/ce", "train/loss", "test/top1"} <= tags
    assert len(acc.Scalars("train/kd")) == 2 * 3  # 2 epochs x 3 steps


def test_cohort_rows_equal_solo_rows(tmp_path, capsys):
    methods = ("student", "kd", "fitnet", "at", "nst_linear", "nst_poly", "nst_gauss",
               "kd+nst_poly")
    grid = write_tiny_grid(tmp_path, methods=methods, seeds=(0, 1))
    outs = {}
    # unfused (--no-fuse) cohorts give the solo rows bit for bit; a fused one matches them to
    # rounding only (tests/test_fusion.py)
    for name, extra in (("cohort", ["--no-fuse"]), ("solo", ["--no-cohort"])):
        outs[name] = tmp_path / name
        assert main(["run", "--grid", str(grid), "--out", str(outs[name]), "--no-report",
                     *extra]) == 0
    logs = [p.read_text() for p in outs["cohort"].glob("cells/*/log.txt")]
    assert all("in a cohort of 8" in log for log in logs) and len(logs) == 16
    a, b = (pd.read_csv(outs[n] / "results.csv").drop(columns=TIMING).sort_values("cell_id")
            .reset_index(drop=True) for n in ("cohort", "solo"))
    assert not a["fused"].any()
    pd.testing.assert_frame_equal(a, b)
    assert not (outs["cohort"] / "fusion.json").exists()  # nothing measured with --no-fuse


def test_fusion_is_chosen_by_a_measurement_kept_in_the_run_folder(tmp_path, capsys):
    grid = write_tiny_grid(tmp_path, methods=("student", "kd", "at"), seeds=(0, 1))
    out = tmp_path / "out"
    assert main(["run", "--grid", str(grid), "--out", str(out), "--no-report"]) == 0
    (choice,) = json.loads((out / "fusion.json").read_text()).values()
    assert choice["unfused_s"] > 0 and choice["fused_s"] > 0
    assert choice["fuse"] == (choice["fused_s"] <= 0.95 * choice["unfused_s"])
    rows = pd.read_csv(out / "results.csv")
    assert (rows["fused"] == choice["fuse"]).all()
    assert capsys.readouterr().out.count("fusion: a bare step of 3 students") == 1  # once
    # a later run of the same kind of cohort reads the choice instead of measuring again
    choice["fuse"] = not choice["fuse"]
    (out / "fusion.json").write_text(json.dumps({next(iter(json.loads(
        (out / "fusion.json").read_text()))): choice}))
    assert main(["run", "--grid", str(grid), "--out", str(out), "--no-report", "--seeds", "2"]
                ) == 0
    assert "fusion: a bare step" not in capsys.readouterr().out
    rows = pd.read_csv(out / "results.csv")
    assert (rows[rows["seed"] == 2]["fused"] == choice["fuse"]).all()
