"""A student that cannot start (a bad tap, a plugin whose constructor or setup raises) fails
its own cell; the other students of its cohort train exactly as without it."""

from __future__ import annotations

import textwrap

import pandas as pd

from kt_bench.commands.main import main

from .conftest import write_tiny_grid

BAD_PLUGINS = '''
from kt_bench.api.method import Method, register_method


@register_method("badtap")
class BadTap(Method):
    """Asks for a tap no model has."""

    def __init__(self, weight=None):
        super().__init__(weight)
        self.taps = ("stage9",)


@register_method("badinit")
class BadInit(Method):
    """Its constructor raises."""

    def __init__(self, weight=None):
        super().__init__(weight)
        raise RuntimeError("boom in __init__")


@register_method("badsetup")
class BadSetup(Method):
    """Its setup raises."""

    def __init__(self, weight=None):
        super().__init__(weight)
        self.taps = ("feat",)

    def setup(self, student_shapes, teacher_shapes):
        raise RuntimeError("boom in setup")
'''


def _rows(out):
    return pd.read_csv(out / "results.csv").set_index("method")


def test_a_bad_student_fails_alone_and_the_others_are_unchanged(tmp_path, capsys):
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "bad.py").write_text(textwrap.dedent(BAD_PLUGINS))
    grid = write_tiny_grid(tmp_path, methods=("student", "kd", "badtap", "badinit",
                                              "badsetup"))
    out = tmp_path / "out"
    code = main(["run", "--grid", str(grid), "--out", str(out), "--no-report",
                 "--plugins", str(plugins)])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err
    rows = _rows(out)
    assert rows.loc["student", "status"] == "ok" and rows.loc["kd", "status"] == "ok"
    assert rows.loc["badtap", "status"] == "failed"
    assert "no tap 'stage9'" in rows.loc["badtap", "error"]
    assert rows.loc["badinit", "error"] == ("method 'badinit' failed to build: "
                                            "RuntimeError: boom in __init__")
    assert rows.loc["badsetup", "error"] == "RuntimeError: boom in setup"
    # the healthy students trained exactly as in a cohort without the broken ones
    clean = tmp_path / "clean"
    assert main(["run", "--grid", str(grid), "--out", str(clean), "--no-report",
                 "--methods", "student,kd"]) == 0
    for method in ("student", "kd"):
        assert rows.loc[method, "top1"] == _rows(clean).loc[method, "top1"]
