"""Numbers that mean what they say: overrides reach every cell, method options are data,
reports never pool different configurations."""

from __future__ import annotations

import json
import textwrap

import pandas as pd
import pytest

from kt_bench.api.method import METHODS, build_method, method_config
from kt_bench.api.plugins import load_plugin_file
from kt_bench.commands.main import main
from kt_bench.core.errors import ConfigError
from kt_bench.reporting.report import summarise
from kt_bench.sweep.cells import expand
from kt_bench.sweep.config import grid_from_table, load_grid, read_toml
from kt_bench.sweep.rows import read_rows

from .conftest import write_tiny_grid


def test_overrides_reach_every_part_of_a_composite_grid(capsys):
    code = main(["run", "--grid", "paper", "--epochs", "1", "--methods", "kd,nst_poly",
                 "--seeds", "0,1", "--dry-run"])
    out = capsys.readouterr().out
    assert code == 0
    assert "12 cells" in out
    grid = load_grid("paper").overridden(["kd", "nst_poly"], 1, [0, 1])
    cells = expand(grid)
    assert len(cells) == 12
    assert {c.dataset.name for c in cells} == {"cifar10", "cifar100", "imagenet"}
    assert {c.method for c in cells} == {"kd", "nst_poly"}
    assert {c.seed for c in cells} == {0, 1}
    assert {c.recipe.epochs for c in cells} == {1}
    # a one-epoch run keeps no milestone at or after its end
    assert all(c.recipe.milestones == () for c in cells)
    cells_table = out.split("downstream units")[0].split("\n\n")[0]  # not the units' table
    for line in cells_table.splitlines():
        if any(m in line.split() for m in ("kd", "nst_poly")):
            assert line.split()[-2] == "1", line


def test_epochs_override_scales_multistep_milestones():
    grid = load_grid("crd-cifar100").overridden(epochs=24)
    (leaf,) = grid.leaves()
    assert leaf.recipe.epochs == 24
    assert leaf.recipe.milestones == (15, 18, 21)  # 150/180/210 of 240


PLUGIN = '''
from kt_bench.api.method import Method, register_method


@register_method("renamed")
class Renamed(Method):
    """Keeps its option under another attribute name."""

    def __init__(self, weight=None, temperature: float = 2.0, layers: tuple[str, ...] = ("feat",)):
        super().__init__(weight)
        self.t = float(temperature)
        self.taps = tuple(layers)
'''


def test_an_option_kept_under_another_name_reaches_its_cell(tmp_path):
    path = tmp_path / "renamed.py"
    path.write_text(PLUGIN)
    load_plugin_file(path)
    table = read_toml(write_tiny_grid(tmp_path, methods=("renamed",)))
    table["sweep"] = {"renamed.temperature": [1.0, 3.0]}
    cells = expand(grid_from_table(table, "tiny.toml"))
    assert len(cells) == 2 and cells[0].cell_id != cells[1].cell_id
    for cell, t in zip(cells, (1.0, 3.0), strict=True):
        assert cell.method_config == {"renamed": {"weight": 1.0, "ce_weight": None,
                                                  "temperature": t, "layers": ["feat"]}}
        method = build_method(cell.method, cell.method_config)  # as the runner builds it
        assert method.t == t and method.taps == ("feat",)
        assert method.describe() == cell.method_config["renamed"]


def test_every_option_of_a_builtin_method_changes_the_cell_id(tmp_path):
    table = read_toml(write_tiny_grid(tmp_path, methods=("nst_gauss",)))
    ids = set()
    for opts in ({}, {"weight": 10.0}, {"sigma2": 0.5}, {"align": "interpolate"},
                 {"layers": ["stage3"]}, {"ce_weight": 0.5}):
        table["method_options"] = {"nst_gauss": opts}
        (cell,) = expand(grid_from_table(table, "tiny.toml"))
        ids.add(cell.cell_id)
    assert len(ids) == 6


def test_defaults_are_recorded_complete_per_member():
    config = method_config("kd+nst_poly", {"kd": {"T": 2}})
    assert config["kd"] == {"weight": 1.0, "ce_weight": None, "T": 2.0, "standardize": False}
    assert config["nst_poly"]["weight"] == 50.0 and config["nst_poly"]["degree"] == 2
    assert set(config["nst_poly"]) >= {"layers", "align", "c"}


def test_an_option_that_cannot_be_stored_is_refused_at_plan_time(tmp_path):
    path = tmp_path / "unstorable.py"
    path.write_text(textwrap.dedent('''
        from kt_bench.api.method import Method, register_method

        @register_method("unstorable")
        class Unstorable(Method):
            """A default no cell config can hold."""

            def __init__(self, weight=None, pool=frozenset({1, 2})):
                super().__init__(weight)
    '''))
    load_plugin_file(path)
    with pytest.raises(ConfigError, match="method 'unstorable': option.s. pool cannot be "
                                          "stored"):
        method_config("unstorable")


def test_a_plugin_whose_describe_loses_an_option_is_refused(tmp_path):
    path = tmp_path / "lossy.py"
    path.write_text(textwrap.dedent('''
        from kt_bench.api.method import Method, register_method

        @register_method("lossy")
        class Lossy(Method):
            """Reports fewer options than it was built with."""

            def __init__(self, weight=None, T: float = 4.0):
                super().__init__(weight)

            def describe(self):
                return {"weight": self.weight}
    '''))
    load_plugin_file(path)
    with pytest.raises(ConfigError, match="method 'lossy': built from its stored options"):
        method_config("lossy")
    assert "lossy" in METHODS


def test_a_wrong_option_type_is_one_line():
    with pytest.raises(ConfigError, match=r"method 'kd': option T = 'four' is invalid; "
                                          r"accepted: a number"):
        method_config("kd", {"kd": {"T": "four"}})


def test_report_never_pools_two_configurations(tmp_path, capsys):
    grid = write_tiny_grid(tmp_path, methods=("student", "kd"), seeds=(0, 1))
    out = tmp_path / "out"
    for epochs in ("1", "2"):
        assert main(["run", "--grid", str(grid), "--out", str(out), "--epochs", epochs,
                     "--no-report"]) == 0
    capsys.readouterr()
    rows = read_rows(out)
    assert len(rows) == 8
    summary = summarise(rows)
    assert len(summary) == 4  # student and kd, each at 1 and 2 epochs
    for (method, label), line in summary.set_index(["method", "config"]).iterrows():
        epochs = int(label.rsplit("=", 1)[1])
        mine = rows[(rows["method"] == method) & (rows["epochs"] == epochs)]
        assert label == f"recipe.epochs={epochs}"
        assert line["seeds"] == 2
        assert line["top1"] == pytest.approx(mine["top1"].mean())
        if method == "kd":  # paired with the student baseline of the same epochs
            base = rows[(rows["method"] == "student") & (rows["epochs"] == epochs)]
            delta = (mine.set_index("seed")["top1"] - base.set_index("seed")["top1"]).mean()
            assert line["delta"] == pytest.approx(delta)
    assert main(["report", str(out)]) == 0
    table = capsys.readouterr().out
    assert table.count("recipe.epochs=1") == 2 and table.count("recipe.epochs=2") == 2


def test_seeds_count_distinct_seeds():
    row = {"dataset": "d", "teacher": "t", "student": "s", "method": "kd", "status": "ok",
           "top1": 50.0, "top1_best": 50.0, "top5": 90.0, "teacher_top1": 60.0, "wall_s": 1.0,
           "images_per_s": 1.0, "config_id": "c", "setting_id": "x",
           "config": json.dumps({"method": "kd"})}
    rows = pd.DataFrame([{**row, "seed": 0}, {**row, "seed": 0, "top1": 52.0},
                         {**row, "seed": 1}])
    (line,) = summarise(rows).to_dict("records")
    assert line["seeds"] == 2


def test_a_pair_may_have_its_own_recipe(tmp_path):
    text = (write_tiny_grid(tmp_path)).read_text().replace(
        "[[pairs]]\n", "[[pairs]]\nrecipe = { lr = 0.01 }\n", 1)
    path = tmp_path / "own.toml"
    path.write_text(text)
    (cell, _) = expand(load_grid(str(path)))
    assert cell.recipe.lr == 0.01 and cell.recipe.batch_size == 32  # the rest is the grid's
    (short, _) = expand(load_grid(str(path)).overridden(epochs=1))
    assert short.recipe.lr == 0.01 and short.recipe.epochs == 1
    with pytest.raises(ConfigError, match=r"pairs\[0\]\.recipe\.lr = -1\.0 is invalid"):
        path.write_text(text.replace("lr = 0.01", "lr = -1.0"))
        load_grid(str(path))
