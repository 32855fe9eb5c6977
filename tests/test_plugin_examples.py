"""The README's plugin examples (a method, a model, a dataset and the grid using them), run
verbatim from a plugin folder through the CLI."""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd
import pytest

from kt_bench.commands.main import main
from kt_bench.data import DATASETS
from kt_bench.models import MODELS

README = Path(__file__).resolve().parents[1] / "README.md"

#: marker in the README -> (file the example is saved as, the name it registers)
EXAMPLES = {
    "plugin-example": ("logit_mse.py", "logit_mse"),
    "model-example": ("tiny_cnn.py", "tiny_cnn"),
    "dataset-example": ("patterns.py", "patterns"),
}


def readme_block(marker: str, language: str) -> str:
    """The fenced ``language`` block between ``<!-- marker:start -->`` and ``:end -->``."""
    found = re.search(rf"<!-- {marker}:start -->\s*```{language}\n(.*?)```\s*"
                      rf"<!-- {marker}:end -->", README.read_text(), re.S)
    assert found, f"README lost its {marker} markers"
    return found.group(1)


@pytest.fixture
def plugin_dir(tmp_path):
    """A plugin folder holding the README's three examples; the model and the dataset are
    unregistered after the test (the conftest restores the methods)."""
    folder = tmp_path / "my_plugins"
    folder.mkdir()
    for marker, (filename, _) in EXAMPLES.items():
        (folder / filename).write_text(readme_block(marker, "python"))
    yield folder
    MODELS.unregister("tiny_cnn")
    DATASETS.unregister("patterns")


@pytest.mark.parametrize("kind,name", [("methods", "logit_mse"), ("models", "tiny_cnn"),
                                       ("datasets", "patterns")])
def test_readme_examples_are_listed(plugin_dir, capsys, monkeypatch, kind, name):
    # listing models builds each one twice: the zoo's alone take seconds, so only the plugin
    # folder's are listed here
    every_model = MODELS.items
    monkeypatch.setattr(MODELS, "items", lambda: (
        (n, b) for n, b in every_model() if MODELS.origin(n).startswith(str(plugin_dir))))
    assert main(["list", kind, "--plugins", str(plugin_dir)]) == 0
    line = next((ln for ln in capsys.readouterr().out.splitlines()
                 if ln.split(" ", 1)[0] == name), None)
    assert line, f"{name} is not in 'kt-bench list {kind}'"
    summary = {"logit_mse": "Regress the teacher's logits.",
               "tiny_cnn": "A three-stage CNN", "patterns": "Each class one fixed random"}
    assert summary[name] in line


def test_readme_grid_runs_the_plugin_model_dataset_and_method(plugin_dir, tmp_path, capsys):
    grid = tmp_path / "patterns.toml"
    # one epoch for the teacher too, to keep the test short
    grid.write_text(readme_block("plugin-grid-example", "toml") + "\n[teacher_recipe]\n"
                    "epochs = 1\n")
    out = tmp_path / "out"
    code = main(["run", "--grid", str(grid), "--out", str(out), "--epochs", "1",
                 "--methods", "logit_mse", "--device", "cpu", "--no-report",
                 "--plugins", str(plugin_dir)])
    assert code == 0, capsys.readouterr()
    rows = pd.read_csv(out / "results.csv")
    assert rows["method"].tolist() == ["logit_mse"] and rows["status"].tolist() == ["ok"]
    assert rows["dataset"].str.startswith("patterns").all()
    assert rows["student"].str.startswith("tiny_cnn").all()
