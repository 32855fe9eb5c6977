"""An initialisation stage as configured: a combination takes the stage of its one
initialising member, and the result rows record the stage's epochs."""

from __future__ import annotations

import pandas as pd

from kt_bench.api.method import build_method
from kt_bench.commands.main import main

from .conftest import write_tiny_grid


def test_a_combination_takes_the_initialisation_stage_of_its_member():
    method = build_method("kd+ft", {"ft": {"init_epochs": 4, "init_lr": 0.01}})
    init = method.needs.init
    assert (method.needs.init_epochs, init.lr, init.trains_student) == (4, 0.01, False)
    assert method.init_term_weights(0, 4) == {"ft.rec": 1.0}
    assert method.term_weights(0, 10) == {"kd": 1.0, "ft": 200.0}


def test_rows_record_the_initialisation_epochs(tmp_path):
    grid = write_tiny_grid(tmp_path, methods=("ab",), epochs=1)
    text = grid.read_text() + "\n[method_options.ab]\ninit_epochs = 2\n"
    grid.write_text(text)
    out = tmp_path / "out"
    assert main(["run", "--grid", str(grid), "--out", str(out), "--no-report"]) == 0
    rows = pd.read_csv(out / "results.csv", keep_default_na=False).set_index("method")
    assert rows.loc["ab", "status"] == "ok"
    assert int(rows.loc["ab", "init_epochs"]) == 2
