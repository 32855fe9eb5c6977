"""Shared fixtures: an isolated method registry, tiny grids that train in seconds, and a
private compiler cache."""

from __future__ import annotations

import os
import shutil
import tempfile
import textwrap
from pathlib import Path

import pytest

from kt_bench.api import plugins
from kt_bench.api.method import METHODS

plugins.load_builtin_methods()

#: TorchInductor's cache for this test session alone (subprocesses inherit it): PyTorch's
#: default one is shared by every run of the user's and outlives them, so a run killed while
#: compiling could leave a kernel there that breaks later test runs (seen: a segmentation
#: fault in every later run), and a warm cache would hide compile paths from the tests.
INDUCTOR_CACHE = tempfile.mkdtemp(prefix="kt-bench-tests-inductor-")
os.environ["TORCHINDUCTOR_CACHE_DIR"] = INDUCTOR_CACHE


def pytest_unconfigure(config):
    """Remove the session's private compiler cache."""
    shutil.rmtree(INDUCTOR_CACHE, ignore_errors=True)


@pytest.fixture(autouse=True)
def isolated_registry():
    """Whatever a test registers or loads is forgotten after it."""
    before = {name: (METHODS.get(name), METHODS.origin(name)) for name in METHODS.names()}
    loaded = set(plugins._loaded)
    yield METHODS
    for name in METHODS.names():
        if name not in before:
            METHODS.unregister(name)
    for name, (cls, origin) in before.items():
        if name in METHODS and METHODS.get(name) is cls:
            continue
        # a test replaced or removed a built-in: put the original back
        METHODS.unregister(name)
        METHODS.register(name, cls, origin)
    plugins._loaded.clear()
    plugins._loaded.update(loaded)


TINY_GRID = """
name = "tiny"
description = "a grid that trains in seconds"
datasets = [{{ name = "synthetic", n_train = 96, n_test = 48, image_size = 8, noise = 2.0 }}]
methods = {methods}
seeds = {seeds}

[[pairs]]
teacher = {{ name = "resnet8", width = 0.5 }}
student = {{ name = "resnet8", width = 0.25 }}

[recipe]
epochs = {epochs}
batch_size = 32
lr = 0.05
schedule = "cosine"

[teacher_recipe]
epochs = 2
"""


def write_tiny_grid(folder: Path, methods=("student", "kd"), seeds=(0,), epochs=2) -> Path:
    """Write a tiny grid file into ``folder`` and return its path."""
    path = folder / "tiny.toml"
    methods_toml = "[" + ", ".join(f'"{m}"' for m in methods) + "]"
    path.write_text(textwrap.dedent(TINY_GRID.format(methods=methods_toml, seeds=list(seeds),
                                                     epochs=epochs)))
    return path


def share_fusion_choice(src: Path, dst: Path) -> None:
    """Give run folder ``dst`` the fusion choices run folder ``src`` measured, so that two
    runs compared row for row train their cohorts the same way (fused and unfused rows agree
    to float rounding only, and each folder measures for itself)."""
    if (src / "fusion.json").exists():
        dst.mkdir(parents=True, exist_ok=True)
        shutil.copy(src / "fusion.json", dst / "fusion.json")


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    """``kt-bench argv`` in this process: the exit code, stdout and stderr (never a
    traceback)."""
    from kt_bench.commands.main import main

    code = main(list(argv))
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return code, out, err


def sorted_rows(out: Path):
    """The rows of ``out/results.csv``, sorted by method."""
    import pandas as pd

    return pd.read_csv(out / "results.csv").sort_values("method").reset_index(drop=True)


def rows_by_method(out: Path):
    """The rows of ``out/results.csv``, indexed by method."""
    import pandas as pd

    return pd.read_csv(out / "results.csv").set_index("method")


def set_aside(path: Path) -> list[Path]:
    """The damaged copies of ``path`` that kt-bench set aside beside it."""
    return sorted(path.parent.glob(f"{path.name}.damaged-*"))


@pytest.fixture
def tiny_grid(tmp_path: Path) -> Path:
    """A tiny grid file (student and kd, one seed, two epochs)."""
    return write_tiny_grid(tmp_path)


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished tiny run (student and kd), one per test module: its grid file and output
    folder."""
    from kt_bench.commands.main import main

    folder = tmp_path_factory.mktemp("finished")
    grid = write_tiny_grid(folder)
    assert main(["run", "--grid", str(grid), "--out", str(folder / "out"), "--no-report"]) == 0
    return grid, folder / "out"


#: A plugin file whose KD takes a while per epoch, so that a test can stop a run mid-cell.
SLOW_PLUGIN = '''
import time
from kt_bench import register_method
from kt_bench.methods.kd import KD


@register_method("slow_kd")
class SlowKD(KD):
    """KD that takes a while per epoch, so a test can stop a run mid-cell."""

    def term_weights(self, epoch, epochs):
        time.sleep(0.4)
        return super().term_weights(epoch, epochs)
'''
