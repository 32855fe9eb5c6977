"""Bad input is refused when the run is planned, as one line naming what is wrong and what is
accepted (the file and key for grid files), never as a traceback; and input that only looked
bad (repeated seeds, a grid included twice) gives each cell once."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pandas as pd
import pytest
import torch

from kt_bench.core.errors import ConfigError
from kt_bench.core.options import Spec
from kt_bench.models import build_model
from kt_bench.sweep.cells import expand
from kt_bench.sweep.config import load_grid

from .conftest import run_cli, write_tiny_grid


def one_error(capsys, *argv: str) -> str:
    """Run ``kt-bench argv``, check that it failed with exactly one error line on stderr and
    no traceback, and return that line."""
    code, out, err = run_cli(capsys, *argv)
    assert code == 2, (out, err)
    assert err.startswith("kt-bench: error: ") and err.count("\n") == 1, err
    assert "Traceback" not in out + err
    return err


def edited(path: Path, old: str, new: str) -> str:
    """Replace ``old`` (which must be there) by ``new`` in the file; its path as a string."""
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new))
    return str(path)


def appended(path: Path, text: str) -> str:
    """Append TOML ``text`` to the file; its path as a string."""
    path.write_text(path.read_text() + "\n" + textwrap.dedent(text))
    return str(path)


# 4. A selection that matches no cell


@pytest.mark.parametrize("dry_run", [True, False])
def test_only_matching_no_cell_names_the_values_the_grid_has(tmp_path, capsys, dry_run):
    grid = str(write_tiny_grid(tmp_path))
    argv = ["run", "--grid", grid, "--out", str(tmp_path / "out"), "--only", "method=kdd"]
    err = one_error(capsys, *argv, *(["--dry-run"] if dry_run else []))
    assert "no cell matches --only method=kdd; methods in this grid: student, kd" in err
    err = one_error(capsys, "run", "--grid", grid, "--only", "method=kd", "--only", "seed=3",
                    "--dry-run")
    assert "no cell matches --only seed=3; seeds" in err and err.rstrip().endswith(": 0")


# 5. Repeated seeds and includes


def test_repeated_seeds_and_includes_give_each_cell_once(tmp_path, capsys):
    grid = write_tiny_grid(tmp_path, seeds=(1, 0, 1, 0))
    assert load_grid(str(grid)).seeds == [1, 0]
    code, out, _ = run_cli(capsys, "run", "--grid", str(grid), "--seeds", "0,0", "--dry-run")
    assert code == 0 and "2 cells;" in out
    both = tmp_path / "twice.toml"
    both.write_text('name = "twice"\ninclude = ["tiny.toml", "tiny.toml"]\n')
    cells = expand(load_grid(str(both)))
    assert [(c.seed, c.method) for c in cells] == [(1, "student"), (1, "kd"), (0, "student"),
                                                   (0, "kd")]
    assert len({c.cell_id for c in cells}) == len(cells)


# 6. Milestones beyond the last epoch


@pytest.mark.parametrize("table,milestones,key", [
    ("[recipe]", "[1, 2]", "recipe.milestones"),
    ("[teacher_recipe]", "[5]", "teacher_recipe.milestones"),
])
def test_milestone_at_or_after_the_last_epoch_is_refused(tmp_path, capsys, table, milestones,
                                                         key):
    path = write_tiny_grid(tmp_path)  # students: 2 epochs, teacher: 2 epochs
    edited(path, 'schedule = "cosine"', 'schedule = "multistep"')
    path = edited(path, f"{table}\n", f"{table}\nmilestones = {milestones}\n")
    err = one_error(capsys, "run", "--grid", path, "--dry-run")
    assert f"{path}: {key} = " in err and "accepted: a list of epochs m with 1 <= m < epochs" in err


def test_inherited_teacher_milestones_are_named_as_inherited(tmp_path, capsys):
    path = write_tiny_grid(tmp_path, epochs=4)
    edited(path, 'schedule = "cosine"', 'schedule = "multistep"')
    path = edited(path, "epochs = 4\n", "epochs = 4\nmilestones = [2, 3]\n")
    err = one_error(capsys, "run", "--grid", path, "--dry-run")
    assert f"{path}: teacher_recipe.milestones = (2, 3) is invalid" in err
    assert "(inherited from [recipe]; give [teacher_recipe] milestones of its own)" in err


def test_epochs_flag_still_scales_milestones(tmp_path, capsys):
    path = write_tiny_grid(tmp_path, epochs=4)
    edited(path, 'schedule = "cosine"', 'schedule = "multistep"')
    edited(path, "[teacher_recipe]\n", '[teacher_recipe]\nschedule = "cosine"\n')
    path = edited(path, "epochs = 4\n", "epochs = 4\nmilestones = [2, 3]\n")
    assert load_grid(path).overridden(epochs=8).recipe.milestones == (4, 6)
    code, _, err = run_cli(capsys, "run", "--grid", path, "--epochs", "2", "--dry-run")
    assert code == 0, err


# 7. An output folder that cannot be written


@pytest.mark.parametrize("dry_run", [True, False])
def test_out_that_cannot_be_created_is_refused_before_any_work(tmp_path, capsys, dry_run):
    (tmp_path / "a_file").write_text("not a folder")
    out = tmp_path / "a_file" / "out"
    argv = ["run", "--grid", str(write_tiny_grid(tmp_path)), "--out", str(out)]
    err = one_error(capsys, *argv, *(["--dry-run"] if dry_run else []))
    assert f"--out folder {out} cannot be created or written" in err


def test_out_without_write_permission_is_refused(tmp_path, capsys, monkeypatch):
    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr("kt_bench.commands.common.tempfile.mkstemp", refuse)
    out = tmp_path / "out"
    err = one_error(capsys, "run", "--grid", str(write_tiny_grid(tmp_path)), "--out", str(out))
    assert f"--out folder {out} cannot be created or written: Permission denied" in err
    assert not (out / "cells").exists()


def test_report_into_a_folder_that_cannot_be_written_is_refused(tmp_path, capsys):
    (tmp_path / "cells" / "abc").mkdir(parents=True)
    (tmp_path / "cells" / "abc" / "result.json").write_text("{}")
    (tmp_path / "report").write_text("a file where the report folder goes")
    err = one_error(capsys, "report", str(tmp_path))
    assert f"report folder {tmp_path / 'report'} cannot be created or written" in err


# 8. Grid names that are no safe file name


@pytest.mark.parametrize("name", ["../../escaped", "/tmp/escaped", ".hidden", "a b", ""])
def test_grid_name_must_be_a_safe_file_name(tmp_path, capsys, name):
    path = edited(write_tiny_grid(tmp_path), 'name = "tiny"', f"name = {name!r}")
    err = one_error(capsys, "run", "--grid", path, "--dry-run")
    assert f"{path}: name = {name!r} is invalid; accepted: a file name of letters" in err
    composite = tmp_path / "both.toml"
    composite.write_text(f'name = {name!r}\ninclude = ["demo"]\n')
    err = one_error(capsys, "run", "--grid", str(composite), "--dry-run")
    assert f"{composite}: name = {name!r} is invalid" in err


# 9. Tracebacks that became one line


@pytest.mark.parametrize("dry_run", [True, False])
def test_model_option_of_the_wrong_type_names_file_and_key(tmp_path, capsys, dry_run):
    path = edited(write_tiny_grid(tmp_path), "width = 0.25", 'width = "half"')
    argv = ["run", "--grid", path, "--out", str(tmp_path / "out")]
    err = one_error(capsys, *argv, *(["--dry-run"] if dry_run else []))
    assert (f"{path}: pairs[0].student: model 'resnet8': option width = 'half' is invalid; "
            "accepted: a number") in err


def test_build_model_checks_option_types():
    with pytest.raises(ConfigError, match=r"^model 'resnet8': option width = 'half' is "
                                          r"invalid; accepted: a number$"):
        build_model(Spec("resnet8", {"width": "half"}), num_classes=10)


def test_dataset_option_of_the_wrong_type_names_file_and_key(tmp_path, capsys):
    path = edited(write_tiny_grid(tmp_path), "n_train = 96", 'n_train = "many"')
    err = one_error(capsys, "run", "--grid", path, "--dry-run")
    assert (f"{path}: datasets[0]: dataset 'synthetic': option n_train = 'many' is invalid; "
            "accepted: an integer") in err


def test_include_cycle_through_another_spelling_of_the_path(tmp_path, capsys):
    (tmp_path / "sub").mkdir()
    path = tmp_path / "self.toml"
    path.write_text('name = "self"\ninclude = ["sub/../self.toml"]\n')
    err = one_error(capsys, "run", "--grid", str(path), "--dry-run")
    assert f"{path}: include 'sub/../self.toml' forms a cycle" in err


def test_method_option_of_the_wrong_type_in_a_grid_file(tmp_path, capsys):
    path = appended(write_tiny_grid(tmp_path), '[method_options.kd]\nT = "4"\n')
    err = one_error(capsys, "run", "--grid", path, "--dry-run")
    assert f"{path}: method 'kd': option T = '4' is invalid; accepted: a number" in err


# 10. Values that were not checked


@pytest.mark.parametrize("value,shown", [
    ("nan", "nan"), ("inf", "inf"), ("-1.0", "-1.0"), ('"1"', "'1'"), ("true", "True"),
])
def test_bad_weight_in_a_grid_file_names_the_file(tmp_path, capsys, value, shown):
    path = appended(write_tiny_grid(tmp_path), f"[method_options.kd]\nweight = {value}\n")
    err = one_error(capsys, "run", "--grid", path, "--dry-run")
    assert f"{path}: method 'kd': " in err and f"weight = {shown} is invalid" in err


def test_negative_seed_is_refused_in_a_grid_file_and_on_the_command_line(tmp_path, capsys):
    path = write_tiny_grid(tmp_path, seeds=(0, -1))
    err = one_error(capsys, "run", "--grid", str(path), "--dry-run")
    assert f"{path}: seeds = [0, -1] is invalid; accepted: integers >= 0" in err
    path = write_tiny_grid(tmp_path)
    err = one_error(capsys, "run", "--grid", str(path), "--seeds=1,-2", "--dry-run")
    assert "--seeds takes integers >= 0, got '1,-2'" in err


@pytest.mark.parametrize("flags,message", [
    (["--device", "tpu"], "unknown device 'tpu'; accepted: auto, cpu, cuda"),
    (["--precision", "fp32"], "unknown precision 'fp32'; accepted: auto, no, bf16, fp16"),
    pytest.param(["--device", "cuda"], "--device cuda was asked for, but no CUDA device",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA present")),
])
def test_dry_run_checks_device_and_precision(tmp_path, capsys, flags, message):
    err = one_error(capsys, "run", "--grid", str(write_tiny_grid(tmp_path)), *flags,
                    "--dry-run")
    assert message in err


def test_run_and_report_rewrite_a_stale_results_csv(tmp_path, capsys):
    grid = str(write_tiny_grid(tmp_path, methods=("student",), epochs=1))
    out = tmp_path / "out"
    argv = ["run", "--grid", grid, "--out", str(out), "--no-report"]
    assert run_cli(capsys, *argv)[0] == 0
    (out / "results.csv").write_text("stale\n")
    code, _, err = run_cli(capsys, *argv)  # nothing new runs
    assert code == 0, err
    rows = pd.read_csv(out / "results.csv")
    assert rows["method"].tolist() == ["student"] and rows["status"].tolist() == ["ok"]
    (out / "results.csv").write_text("stale\n")
    code, _, err = run_cli(capsys, "report", str(out))
    assert code == 0, err
    assert pd.read_csv(out / "results.csv")["status"].tolist() == ["ok"]


# 2. --dry-run builds every method and model on a probe batch

PLUGINS = '''
from kt_bench import Method, register_method


@register_method("bad_tap")
class BadTap(Method):
    """Asks for a tap no model has."""

    def __init__(self, weight: float | None = None) -> None:
        super().__init__(weight)
        self.taps = ("stage9",)


@register_method("bad_setup")
class BadSetup(Method):
    """Cannot build its parts from the taps' shapes."""

    def __init__(self, weight: float | None = None) -> None:
        super().__init__(weight)
        self.taps = ("feat",)

    def setup(self, student_shapes, teacher_shapes):
        raise RuntimeError("no regressor for these shapes\\nsecond line")


@register_method("bad_init")
class BadInit(Method):
    """Its constructor raises."""

    def __init__(self, weight: float | None = None) -> None:
        super().__init__(weight)
        raise RuntimeError("constructor failed")
'''


@pytest.fixture
def plugins(tmp_path: Path) -> str:
    """A plugin folder of methods that fail when they are built or set up."""
    folder = tmp_path / "plugins"
    folder.mkdir()
    (folder / "broken.py").write_text(PLUGINS)
    return str(folder)


PAIR = "(synthetic(image_size=8,n_test=48,n_train=96,noise=2.0): resnet8(width=0.5) -> " \
       "resnet8(width=0.25))"


@pytest.mark.parametrize("method,message", [
    ("bad_tap", f"method bad_tap {PAIR}: model CifarResNet has no tap 'stage9'; known: "),
    ("bad_setup", f"method bad_setup {PAIR}: RuntimeError: no regressor for these shapes"),
])
def test_dry_run_probes_every_method_on_a_probe_batch(tmp_path, capsys, plugins, method,
                                                      message):
    grid = str(write_tiny_grid(tmp_path, methods=("student", "kd", method)))
    code, out, err = run_cli(capsys, "run", "--grid", grid, "--plugins", plugins, "--dry-run")
    assert code == 2 and "Traceback" not in out + err
    assert "3 cells; results would go to" in out  # the table comes first
    assert err.startswith(f"kt-bench: error: {message}") and err.count("\n") == 1


def test_plugin_constructor_that_raises_is_one_line(tmp_path, capsys, plugins):
    grid = str(write_tiny_grid(tmp_path, methods=("student", "bad_init")))
    err = one_error(capsys, "run", "--grid", grid, "--plugins", plugins, "--dry-run")
    assert "bad_init" in err and "RuntimeError: constructor failed" in err


def test_dry_run_of_a_sound_grid_probes_and_succeeds(tmp_path, capsys):
    grid = str(write_tiny_grid(tmp_path, methods=("student", "kd", "fitnet", "at", "nst_poly")))
    code, out, err = run_cli(capsys, "run", "--grid", grid, "--dry-run")
    assert code == 0 and err == ""
    assert "5 cells; results would go to results/tiny" in out and "estimate: " in out
