"""The Python API: the README's notebook example runs as written; ``kt_bench.run`` takes a
grid by name, file, dict or ``Grid`` with the flags of ``kt-bench run`` as keywords, returns
the grid's rows and resumes; ``kt_bench.report`` returns the comparison table; bad input is
one-line ``KtBenchError``s (a dict's grid errors read as a grid file's), and ``import
kt_bench`` with ``kt_bench.report`` stays free of torch."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

import kt_bench
from kt_bench.core.errors import ConfigError, KtBenchError
from kt_bench.sweep.config import load_grid
from kt_bench.sweep.rows import RESULT_COLUMNS
from kt_bench.workflow.settings import SETTING_NAMES, RunSettings

from .test_docs import readme, section

#: The README example's output folder, relative to where it runs.
OUT = "nb-results"


def readme_example() -> str:
    """The ```python block of the README's "Python API" section."""
    blocks = re.findall(r"```python\n(.*?)```", section(readme(), "Python API"), re.S)
    assert len(blocks) == 1, "the Python API section should hold one python block"
    return blocks[0]


@pytest.fixture(scope="module")
def example(tmp_path_factory):
    """The README example run in a fresh folder: that folder, the names the example defines,
    and what it printed."""
    folder = tmp_path_factory.mktemp("notebook")
    names: dict = {}
    printed = io.StringIO()
    before, data = Path.cwd(), os.environ.get("KT_BENCH_DATA")
    os.environ["KT_BENCH_DATA"] = str(folder / "data")
    try:
        os.chdir(folder)
        with contextlib.redirect_stdout(printed):
            exec(compile(readme_example(), "README.md (Python API)", "exec"), names)
    finally:
        os.chdir(before)
        if data is None:
            del os.environ["KT_BENCH_DATA"]
        else:
            os.environ["KT_BENCH_DATA"] = data
    return folder, names, printed.getvalue()


def stamps(out: Path) -> dict[str, int]:
    """Each cell's ``result.json`` and teacher file with its modification time."""
    files = [*(out / "cells").glob("*/result.json"), *(out / "teachers").glob("*.pt")]
    return {str(f): f.stat().st_mtime_ns for f in files}


def test_the_readme_example_returns_the_rows_and_the_comparison_table(example):
    folder, names, printed = example
    out = folder / OUT
    rows, table = names["rows"], names["table"]
    assert list(rows.columns[:len(RESULT_COLUMNS)]) == RESULT_COLUMNS
    assert list(rows["method"]) == ["student", "kd"] and set(rows["status"]) == {"ok"}
    on_disk = pd.read_csv(out / "results.csv").set_index("cell_id")
    assert on_disk.loc[rows["cell_id"], "top1"].tolist() == pytest.approx(rows["top1"].tolist())
    assert (out / "report.md").is_file() and (out / "report" / "summary.csv").is_file()
    # one seed each: the line's top-1 is the row's, and Δ is kd's top-1 less student's
    top1 = rows.set_index("method")["top1"]
    lines = table.set_index("method")
    assert list(table["method"]) == ["student", "kd"] and lines["seeds"].tolist() == [1, 1]
    assert lines["top1"].tolist() == pytest.approx([top1["student"], top1["kd"]])
    assert lines.loc["kd", "delta"] == pytest.approx(top1["kd"] - top1["student"])
    assert pd.isna(lines.loc["student", "delta"])
    assert "top1" in printed and "kd" in printed and "grid 'nb-digits'" not in printed  # quiet


def test_a_second_run_and_a_grid_object_resume_without_training(example):
    folder, names, _ = example
    out = folder / OUT
    before = stamps(out)
    assert len(before) == 3  # two rows, one teacher
    again = kt_bench.run(names["grid"], out=out, report=False, quiet=True)
    pd.testing.assert_frame_equal(again, names["rows"])
    recipe = kt_bench.Recipe(epochs=1, batch_size=64)
    grid = kt_bench.Grid(
        name="nb-digits", datasets=[{"name": "digits", "image_size": 8}],
        pairs=[kt_bench.Pair({"name": "resnet8", "width": 0.5},
                             kt_bench.Spec("resnet8", {"width": 0.25}))],
        methods=["student", "kd"], recipe=recipe, teacher_recipe=recipe)
    as_object = kt_bench.run(grid, out=str(out), report=False, quiet=True)
    pd.testing.assert_frame_equal(as_object, names["rows"])
    only_kd = kt_bench.run(names["grid"], out=out, methods=["kd"], seeds=0, report=False,
                           quiet=True)
    pd.testing.assert_frame_equal(only_kd, names["rows"].iloc[[1]].reset_index(drop=True))
    assert stamps(out) == before  # nothing trained or rewritten


def test_a_grid_name_takes_methods_epochs_and_seeds(tmp_path):
    plan = kt_bench.run("demo", methods="student,kd", epochs=2, seeds=[0, 1], dry_run=True,
                        out=tmp_path / "demo", quiet=True)
    assert sorted(plan[["method", "seed"]].values.tolist()) == [
        ["kd", 0], ["kd", 1], ["student", 0], ["student", 1]]
    assert set(plan["epochs"]) == {2} and (plan["gpu_hours"] > 0).all()
    plan = kt_bench.run("demo", methods=["kd"], seeds=3, dry_run=True, quiet=True)
    assert plan[["method", "seed", "epochs"]].values.tolist() == [["kd", 3, 12]]
    assert not (tmp_path / "demo").exists()  # a dry run writes nothing


def test_an_unknown_setting_is_one_line_naming_the_accepted_ones():
    with pytest.raises(KtBenchError) as error:
        kt_bench.run("demo", epoch=2)
    accepted = ", ".join([*SETTING_NAMES, "quiet"])
    assert str(error.value) == ("kt_bench.run: unknown setting 'epoch' (did you mean "
                                f"'epochs'?); accepted: {accepted}")


@pytest.mark.parametrize("settings,message", [
    ({"epochs": "2"}, "kt_bench.run: epochs = '2' is invalid; accepted: an integer"),
    ({"cohort": "no"}, "kt_bench.run: cohort = 'no' is invalid; accepted: True or False"),
    ({"seeds": [0, "1"]}, "kt_bench.run: seeds = [0, '1'] is invalid; accepted: an integer, "
                          "comma-separated integers or a list of integers"),
    ({"quiet": 1}, "kt_bench.run: quiet = 1 is invalid; accepted: True or False"),
    ({"epochs": 0}, "epochs must be >= 1, got 0"),
    ({"seeds": [1, -2]}, "seeds takes integers >= 0, got '1,-2'"),
    ({"methods": []}, "methods needs at least one method name"),
    ({"launcher": "pbs"}, "unknown launcher 'pbs'; accepted: local, slurm"),
    ({"teacher_checkpoint": "a.pt", "teachers_dir": "t"},
     "give teacher_checkpoint or teachers_dir, not both"),
])
def test_a_bad_setting_is_one_line_naming_the_keyword(settings, message):
    with pytest.raises(KtBenchError) as error:
        kt_bench.run("demo", **{"dry_run": True, "quiet": True, **settings})
    assert str(error.value) == message


GRID_TOML = """\
name = "x"
datasets = ["digits"]
methods = ["student"]
{extra}

[[pairs]]
teacher = "resnet8"
student = "resnet8"
"""


@pytest.mark.parametrize("extra,key,value", [
    ("epoch = 1", "epoch", 1),
    ('recipe = { epochs = "one" }', "recipe", {"epochs": "one"}),
    ('method_options = { kdd = { T = 2.0 } }', "method_options", {"kdd": {"T": 2.0}}),
])
def test_a_bad_grid_dict_is_the_error_of_the_same_grid_file(tmp_path, extra, key, value):
    path = tmp_path / "x.toml"
    path.write_text(GRID_TOML.format(extra=extra))
    with pytest.raises(ConfigError) as from_file:
        load_grid(str(path))
    table = {"name": "x", "datasets": ["digits"], "methods": ["student"], key: value,
             "pairs": [{"teacher": "resnet8", "student": "resnet8"}]}
    with pytest.raises(ConfigError) as from_dict:
        kt_bench.run(table, quiet=True)
    assert str(from_file.value).startswith(f"{path}: ")
    assert str(from_dict.value) == str(from_file.value).replace(str(path), "<python>")


@pytest.mark.parametrize("change,message", [
    ({"name": "a b"}, "<python>: name = 'a b' is invalid; accepted: a file name of"),
    ({"recipe": {"epochs": 1}}, "<python>: recipe must be a kt_bench.Recipe, got dict"),
    ({"pairs": ["resnet8"]}, "<python>: pairs[0] must be a kt_bench.Pair, got str"),
    ({"methods": []}, "<python>: key 'methods' must be a non-empty list"),
    ({"datasets": ["mnist"]}, "<python>: unknown dataset 'mnist'; known: "),
    ({"method_options": {"kdd": {"T": 2.0}}}, "<python>: method_options.kdd is for a method "
                                              "the grid does not run"),
])
def test_a_bad_grid_object_is_a_grid_error(change, message):
    grid = kt_bench.Grid(name="x", datasets=["digits"], methods=["student"],
                         pairs=[kt_bench.Pair("resnet8", "resnet8")])
    with pytest.raises(KtBenchError) as error:  # a ConfigError, or an UnknownNameError
        kt_bench.run(dataclasses.replace(grid, **change), dry_run=True, quiet=True)
    assert str(error.value).startswith(message) and "\n" not in str(error.value)


def test_a_grid_of_another_kind_is_a_config_error():
    with pytest.raises(ConfigError, match="^a grid must be a built-in grid's name, a .toml "
                                          "file's path, a kt_bench.Grid or a dict shaped like "
                                          "a grid file; got int$"):
        kt_bench.run(42)


def test_report_of_a_folder_without_rows_raises_instead_of_exiting(tmp_path):
    with pytest.raises(KtBenchError, match="holds no results"):
        kt_bench.report(tmp_path)
    with pytest.raises(KtBenchError, match="^kt_bench.report: versus = 3 is invalid"):
        kt_bench.report(tmp_path, versus=3)


def test_the_settings_are_the_run_flags_with_their_defaults():
    from kt_bench.commands.main import build_parser
    from kt_bench.commands.run import settings_from_args

    args = build_parser(["run"]).parse_args(["run", "--grid", "demo"])
    negated = {"no_cohort": "cohort", "no_fuse": "fuse", "no_report": "report",
               "no_wait": "wait", "no_downstream": "downstream"}
    flags = {negated.get(name, name) for name in vars(args)} - {"command", "grid"}
    assert flags == set(SETTING_NAMES)
    assert settings_from_args(args) == dataclasses.replace(RunSettings(), cli=True)


def test_import_and_report_load_no_torch(example):
    folder, _, _ = example
    code = ("import sys, kt_bench; kt_bench.Grid; kt_bench.report(sys.argv[1], quiet=True); "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'accelerate'}))")
    proc = subprocess.run([sys.executable, "-c", code, str(folder / OUT)], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout == "[]\n"
