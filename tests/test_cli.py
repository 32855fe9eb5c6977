"""The kt-bench command line end to end on tiny grids, and its one-line errors."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from kt_bench.commands.main import main
from kt_bench.core.errors import KtBenchError
from kt_bench.sweep.rows import RESULT_COLUMNS

from .conftest import run_cli, write_tiny_grid

README = Path(__file__).resolve().parents[1] / "README.md"
BUILTIN_METHODS = ["ab", "at", "cc", "crd", "dist", "dkd", "fitnet", "fsp", "ft", "kd", "kd_ls",
                   "nst_gauss", "nst_linear", "nst_poly", "ofa", "ofd", "pkt", "reviewkd", "rkd",
                   "sp", "student", "vid"]


def test_run_writes_tidy_rows_prints_the_table_and_reuses_the_teacher(tmp_path, capsys):
    grid = write_tiny_grid(tmp_path, methods=("student", "kd", "fitnet", "at", "nst_linear",
                                              "nst_poly", "nst_gauss", "kd+nst_poly"))
    out = tmp_path / "out"
    code, stdout, _ = run_cli(capsys, "run", "--grid", str(grid), "--out", str(out))
    assert code == 0
    rows = pd.read_csv(out / "results.csv")
    assert list(rows.columns[:len(RESULT_COLUMNS)]) == RESULT_COLUMNS
    assert len(rows) == 8 and set(rows["status"]) == {"ok"}
    assert rows["teacher_top1"].nunique() == 1 and rows["world_size"].eq(1).all()
    assert rows["cell_id"].is_unique
    for method in ("student", "kd+nst_poly", "nst_gauss"):
        assert re.search(rf"\| {re.escape(method)} +\|", stdout), method
    teachers = list((out / "teachers").glob("*.pt"))
    assert len(teachers) == 1
    stamp = teachers[0].stat().st_mtime_ns

    # again with one more seed: finished cells are skipped, the cached teacher of seed 0 reused
    code, stdout, _ = run_cli(capsys, "run", "--grid", str(grid), "--out", str(out),
                              "--methods", "student,kd", "--seeds", "0,1")
    assert code == 0
    assert teachers[0].stat().st_mtime_ns == stamp
    assert len(list((out / "teachers").glob("*.pt"))) == 2  # seed 1 has its own teacher
    rows = pd.read_csv(out / "results.csv")
    assert len(rows) == 10
    cell = json.loads(next((out / "cells").glob("*/config.json")).read_text())
    assert {"dataset", "student", "method", "method_config", "recipe", "teacher"} <= set(cell)


def test_dry_run_lists_the_demo_cells(capsys):
    code, stdout, _ = run_cli(capsys, "run", "--grid", "demo", "--dry-run")
    assert code == 0
    assert "24 cells; results would go to results/demo" in stdout
    for m in ("student", "kd", "fitnet", "at", "nst_linear", "nst_poly", "nst_gauss",
              "kd+nst_poly"):
        for seed in (0, 1, 2):
            assert re.search(rf"\s{re.escape(m)}\s+{seed}\s+12\s+[0-9.]+\n", stdout), m


@pytest.mark.parametrize("argv,message", [
    (["run", "--grid", "nope"],
     "kt-bench: error: unknown grid 'nope'; known: crd-cifar100, crd-cifar100-hetero, demo"),
    (["run", "--grid", "demo", "--methods", "kd,nope"],
     "kt-bench: error: unknown method 'nope'; known: " + ", ".join(BUILTIN_METHODS)),
    (["run", "--grid", "demo", "--seeds", "one"],
     "kt-bench: error: --seeds takes integers separated by commas, got 'one'"),
    (["run", "--grid", "demo", "--device", "tpu"],
     "kt-bench: error: unknown device 'tpu'; accepted: auto, cpu, cuda"),
    (["report", "/nonexistent"], "kt-bench: error: /nonexistent holds no results"),
    (["list", "methods", "--plugins", "/nonexistent"],
     "kt-bench: error: plugin folder /nonexistent does not exist"),
])
def test_bad_input_is_one_line_on_stderr(capsys, argv, message):
    code, _, err = run_cli(capsys, *argv)
    assert code == 2
    assert err.startswith(message) and err.count("\n") == 1


def test_unknown_model_or_dataset_in_a_grid_lists_the_known_ones(tmp_path, capsys):
    grid = write_tiny_grid(tmp_path)
    grid.write_text(grid.read_text().replace('name = "synthetic"', 'name = "mnist"'))
    code, _, err = run_cli(capsys, "run", "--grid", str(grid))
    assert code == 2
    assert ("unknown dataset 'mnist'; known: cifar10, cifar100, digits, hf, imagefolder, "
            "imagenet, stl10, synthetic, tiny_imagenet") in err
    grid = write_tiny_grid(tmp_path)
    grid.write_text(grid.read_text().replace('teacher = { name = "resnet8"',
                                             'teacher = { name = "resnet7"'))
    code, _, err = run_cli(capsys, "run", "--grid", str(grid))
    assert code == 2 and "unknown model 'resnet7'" in err and ", resnet110, " in err


def test_console_script_error_has_no_traceback():
    proc = subprocess.run([sys.executable, "-m", "kt_bench", "run", "--grid", "demo",
                           "--methods", "nst_pol"], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.startswith(
        "kt-bench: error: unknown method 'nst_pol' (did you mean 'nst_poly'?)")
    assert "Traceback" not in proc.stderr and proc.stderr.count("\n") == 1


@pytest.mark.parametrize("kind,expected", [
    ("methods", ["student", "nst_gauss", "fitnet", "stage1, stage2, stage3"]),
    # builds every model of the zoo twice (10 s on 2 cores)
    pytest.param("models", ["resnet56", "0.856M", "tv_resnet101"], marks=pytest.mark.slow),
    ("datasets", ["digits", "synthetic"]),
    ("grids", ["demo"]),
])
def test_list(capsys, kind, expected):
    code, stdout, _ = run_cli(capsys, "list", kind)
    assert code == 0
    for word in expected:
        assert word in stdout


def test_failed_cell_is_recorded_and_the_grid_goes_on(tmp_path, capsys):
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "bad.py").write_text(
        "from kt_bench.methods.kd import KD\n"
        "from kt_bench import register_method\n\n"
        "@register_method('explodes')\n"
        "class Explodes(KD):\n"
        "    '''Raises from its loss.'''\n"
        "    def loss_terms(self, student, teacher, batch):\n"
        "        raise ValueError('boom\\nsecond line')\n\n"
        "@register_method('nan_loss')\n"
        "class NaNLoss(KD):\n"
        "    '''Returns NaN.'''\n"
        "    def loss_terms(self, student, teacher, batch):\n"
        "        return {self.name: student['logits'].sum() * float('nan')}\n")
    grid = write_tiny_grid(tmp_path, methods=("explodes", "nan_loss", "kd"))
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "run", "--grid", str(grid), "--out", str(out),
                           "--plugins", str(plugins))
    assert code == 1
    rows = pd.read_csv(out / "results.csv").set_index("method")
    assert rows.loc["explodes", "status"] == "failed"
    assert rows.loc["explodes", "error"] == "ValueError: boom"
    assert rows.loc["nan_loss", "status"] == "diverged"
    assert rows.loc["kd", "status"] == "ok"
    assert "2 cell(s) did not finish ok" in err


def _readme_plugin() -> str:
    text = README.read_text()
    block = re.search(r"<!-- plugin-example:start -->\s*```python\n(.*?)```\s*"
                      r"<!-- plugin-example:end -->", text, re.S)
    assert block, "README lost its plugin example markers"
    return block.group(1)


def test_readme_plugin_example_works_verbatim(tmp_path, capsys):
    folder = tmp_path / "my_plugins"
    folder.mkdir()
    (folder / "logit_mse.py").write_text(_readme_plugin())
    grid = write_tiny_grid(tmp_path)
    out = tmp_path / "out"
    code, stdout, _ = run_cli(capsys, "run", "--grid", str(grid), "--out", str(out),
                              "--methods", "logit_mse", "--plugins", str(folder))
    assert code == 0, stdout
    rows = pd.read_csv(out / "results.csv")
    assert rows["method"].tolist() == ["logit_mse"] and rows["status"].tolist() == ["ok"]
    metrics = [json.loads(line) for line in
               next((out / "cells").glob("*/metrics.jsonl")).read_text().splitlines()]
    assert metrics[0]["logit_mse"] > 0


def test_run_corrects_its_table_as_asked_and_refuses_an_unknown_correction(tmp_path, capsys):
    grid = write_tiny_grid(tmp_path, seeds=(0, 1), epochs=1)
    out = str(tmp_path / "out")
    code, stdout, _ = run_cli(capsys, "run", "--grid", str(grid), "--out", out, "--no-report",
                              "--correct", "bh")
    assert code == 0 and "Benjamini–Hochberg" in stdout and "Holm" not in stdout
    code, stdout, _ = run_cli(capsys, "run", "--grid", str(grid), "--out", out, "--no-report")
    assert code == 0 and "Holm's step-down" in stdout  # the default; nothing trained again
    with pytest.raises(SystemExit):
        main(["run", "--grid", str(grid), "--correct", "bonferroni"])
    assert "invalid choice: 'bonferroni'" in capsys.readouterr().err
    import kt_bench

    with pytest.raises(KtBenchError, match=r"^correct 'bonferroni' is invalid; accepted: "
                                           r"holm, bh, none$"):
        kt_bench.run(grid, out=out, correct="bonferroni")
