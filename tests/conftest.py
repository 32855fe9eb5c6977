"""Shared fixtures: an isolated method registry, and tiny grids that train in seconds."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from kt_bench import plugins
from kt_bench.method import METHODS

plugins.load_builtin_methods()


@pytest.fixture(autouse=True)
def isolated_registry():
    """Whatever a test registers or loads is forgotten after it."""
    entries, origins = dict(METHODS._entries), dict(METHODS._origins)
    loaded = set(plugins._loaded)
    yield METHODS
    METHODS._entries.clear()
    METHODS._entries.update(entries)
    METHODS._origins.clear()
    METHODS._origins.update(origins)
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


@pytest.fixture
def tiny_grid(tmp_path: Path) -> Path:
    """A tiny grid file (student and kd, one seed, two epochs)."""
    return write_tiny_grid(tmp_path)
