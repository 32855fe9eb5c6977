"""The report's figures: one fixed style per method in every figure, legends beside the
panels, the accuracy axis not stretched by the teacher, whole-number epochs, the unweighted
loss terms (never the weighted total), each student's own time for the cost figure, the
per-stage heat map from the cells' diagnostics, and the report's sections."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from kt_bench.reporting import style
from kt_bench.reporting.style import KNOWN_METHODS, method_style

PAIRS = [("cifar100", "resnet32x4", "resnet8x4"), ("cifar100", "wrn_40_2", "wrn_16_2")]
METHODS = ["student", "kd", "nst_poly"]


def fake_run(out: Path, cohort: bool = False, diagnostics: bool = True,
             step_s: bool = False) -> pd.DataFrame:
    """A run folder of two pairs x three methods x two seeds, three epochs each: every cell
    with its ``metrics.jsonl`` (``ce`` and the method's term, and a weighted ``loss`` far
    larger), its log and, with ``diagnostics``, its ``diagnostics.json``; return its rows."""
    rows = []
    for p, (dataset, teacher, student) in enumerate(PAIRS):
        for seed in range(2):
            for m, method in enumerate(METHODS):
                cid = f"c{p}{m}{seed}"
                cell = out / "cells" / cid
                cell.mkdir(parents=True)
                top1 = 70.0 + p + m + 0.1 * seed
                epochs = [{"epoch": e, "lr": 0.1, "top1": top1 - 3 + e, "top5": 90.0,
                           "loss": 1000.0, "ce": 2.0 / e,
                           **({method: 0.5 / e} if method != "student" else {})}
                          for e in (1, 2, 3)]
                (cell / "metrics.jsonl").write_text(
                    "".join(json.dumps(e) + "\n" for e in epochs))
                mark = " in a cohort of 3" if cohort else ""
                (cell / "log.txt").write_text(f"2026-01-01 00:00:00 start host=h pid=1{mark}\n"
                                              "2026-01-01 00:00:09 epoch 1: loss 1.0\n")
                if diagnostics and method != "student":
                    stages = [{"stage": f"stage{k}", "teacher_tap": f"stage{k}",
                               "student_tap": f"stage{k}", "cka": 0.1 * k + 0.2 * seed + m / 10,
                               "mmd2_poly": 1.0 / k + seed} for k in (1, 2, 3)]
                    (cell / "diagnostics.json").write_text(json.dumps(
                        {"agreement": 80.0, "kl_teacher": 0.5, "ece": 3.0, "seconds": 1.0,
                         "stages": stages}))
                rows.append({
                    "grid": "fake", "dataset": dataset, "teacher": teacher,
                    "student": student, "method": method, "seed": seed, "epochs": 3,
                    "top1": top1, "top5": 90.0, "top1_best": top1, "teacher_top1": 99.0,
                    "wall_s": 100.0 + seed if cohort else 10.0 * (m + 1) + seed,
                    "images_per_s": 10.0, "world_size": 1, "precision": "no", "status": "ok",
                    "error": "", "cell_id": cid, "config_id": f"k{p}{m}",
                    "setting_id": f"s{p}",
                    **({"step_s": float(m + 1)} if step_s else {})})
    return pd.DataFrame(rows)


@pytest.fixture
def figures(monkeypatch):
    """Every figure the report modules save, by name, kept open for inspection."""
    import kt_bench.reporting.cd_diagram as cd
    import kt_bench.reporting.curves as curves
    import kt_bench.reporting.plots as plots
    import kt_bench.reporting.stage_maps as stage_maps

    kept: dict = {}

    def keep(fig, folder, name):
        fig.canvas.draw()
        kept[name] = fig
        return [folder / f"{name}.png", folder / f"{name}.pdf"]

    for module in (plots, curves, cd, stage_maps):
        monkeypatch.setattr(module, "save_figure", keep)
    yield kept
    for fig in kept.values():
        style.plt.close(fig)


def test_every_built_in_method_has_its_own_fixed_style():
    styles = [method_style(m) for m in KNOWN_METHODS]
    assert len({(s.colour, s.marker) for s in styles}) == len(KNOWN_METHODS)
    assert method_style("student").colour == "#000000"
    assert method_style("kd") == method_style("kd")
    for other in ("kd+nst_poly", "my_plugin", "kd+at"):  # never a built-in's colour or marker
        style_of = method_style(other)
        assert style_of.colour not in {s.colour for s in styles} | {"#000000"}
        assert style_of.marker not in {s.marker for s in styles}
    # the demo's methods all differ in colour
    demo = ["student", "kd", "fitnet", "at", "nst_linear", "nst_poly", "nst_gauss"]
    assert len({method_style(m).colour for m in demo}) == len(demo)


def test_a_plugins_style_is_the_same_in_every_process():
    code = ("from kt_bench.reporting.style import method_style as s; "
            "print(s('my_plugin'), s('kd+at'))")
    seen = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           env={"PYTHONHASHSEED": seed}, check=True).stdout
            for seed in ("1", "2")}
    assert len(seen) == 1


def _colour_of(line) -> str:
    from matplotlib.colors import to_hex

    return to_hex(line.get_color()).upper()


def _overlaps(a, b) -> bool:
    return a.x0 < b.x1 and b.x0 < a.x1 and a.y0 < b.y1 and b.y0 < a.y1


def test_figures_keep_method_colours_and_legends_off_the_panels(tmp_path, figures):
    from kt_bench.reporting.writer import write_report

    out = tmp_path / "run"
    write_report(out, fake_run(out))
    assert {"accuracy", "curves", "losses-1", "losses-2", "cost", "ranking", "stages"} <= set(
        figures)
    kd = method_style("kd").colour.upper()
    for name in ("curves", "losses-1", "losses-2"):
        lines = [line for ax in figures[name].axes for line in ax.get_lines()]
        assert kd in {_colour_of(line) for line in lines}, name
    for name in ("accuracy", "curves", "losses-1", "cost"):
        fig = figures[name]
        renderer = fig.canvas.get_renderer()
        (legend,) = fig.legends
        box = legend.get_window_extent(renderer)
        assert not any(_overlaps(box, ax.get_window_extent(renderer)) for ax in fig.axes
                       if ax.get_visible()), name


def test_accuracy_axis_spans_the_methods_not_the_teacher(tmp_path, figures):
    from kt_bench.reporting.writer import write_report

    out = tmp_path / "run"
    write_report(out, fake_run(out))  # teacher 99%, methods 70-73%
    for ax in figures["accuracy"].axes:
        if ax.get_visible():
            low, high = ax.get_ylim()
            assert 65 < low < 71 and high < 80
            assert "teacher 99.00%, outside this axis" in ax.get_title()


def test_curves_have_whole_epochs_and_unweighted_terms_only(tmp_path, figures):
    from kt_bench.reporting.writer import write_report

    out = tmp_path / "run"
    write_report(out, fake_run(out))
    for name in ("curves", "losses-1"):
        for ax in figures[name].axes:
            low, high = ax.get_xlim()
            ticks = [t for t in ax.get_xticks() if low <= t <= high]
            assert ticks and all(float(t).is_integer() for t in ticks), name
    titles = [ax.get_title() for ax in figures["losses-1"].axes if ax.get_visible()]
    assert titles == ["ce", "kd", "nst_poly"]  # never the weighted total 'loss'
    (kd_panel,) = [ax for ax in figures["losses-1"].axes if ax.get_title() == "kd"]
    (line,) = kd_panel.get_lines()
    assert list(line.get_ydata()) == pytest.approx([0.5, 0.25, 0.5 / 3])  # mean over seeds


def test_cohort_cells_are_left_out_of_the_cost_figure_and_said_so(tmp_path):
    from kt_bench.reporting.own_time import own_seconds
    from kt_bench.reporting.writer import write_report

    out = tmp_path / "run"
    rows = fake_run(out, cohort=True)
    assert own_seconds(out, rows).isna().all()
    report = write_report(out, rows).read_text()
    assert "No cost figure: every cell trained in a cohort" in report
    assert not (out / "report" / "cost.png").exists()


def test_a_cohorts_time_is_shared_out_by_measured_step_time(tmp_path):
    from kt_bench.reporting.own_time import own_seconds

    out = tmp_path / "run"
    rows = fake_run(out, cohort=True, step_s=True)  # step_s 1, 2, 3 for the three methods
    own = own_seconds(out, rows)
    first = rows[(rows["teacher"] == "resnet32x4") & (rows["seed"] == 1)]
    assert own[first.index].tolist() == pytest.approx([101 / 6, 101 * 2 / 6, 101 * 3 / 6])
    solo = tmp_path / "solo"
    rows = fake_run(solo)
    assert own_seconds(solo, rows).tolist() == rows["wall_s"].tolist()


def test_stage_diagnostics_average_over_seeds_into_a_heat_map_and_table(tmp_path, figures):
    from kt_bench.reporting.stage_maps import read_stages, stage_means, stage_table

    out = tmp_path / "run"
    rows = fake_run(out)
    (out / "cells" / "c010" / "diagnostics.json").write_text("{not json")
    means = stage_means(read_stages(out, rows)).set_index(["problem", "label", "stage"])
    # kd (m = 1) on the first pair: seed 1's file is intact, seed 0's damaged and left out
    line = means.loc[("cifar100: resnet32x4 → resnet8x4", "kd", "stage2")]
    assert line["cka"] == pytest.approx(0.2 + 0.2 + 0.1)
    line = means.loc[("cifar100: wrn_40_2 → wrn_16_2", "nst_poly", "stage1")]
    assert line["cka"] == pytest.approx(0.1 + 0.1 + 0.2)  # seeds 0 and 1: +0 and +0.2
    assert line["mmd2_poly"] == pytest.approx(1.5)
    table = stage_table(stage_means(read_stages(out, rows)))
    assert "| method " in table and "stage1 CKA" in table and "stage3 MMD²" in table
    from kt_bench.reporting.writer import write_report

    report = write_report(out, rows).read_text()
    assert "## Teacher–student similarity per stage" in report
    assert (out / "report" / "stages.md").read_text().startswith("**cifar100")
    ax_titles = [ax.get_title() for ax in figures["stages"].axes]
    assert "cifar100: resnet32x4 → resnet8x4: CKA" in ax_titles


def test_a_report_without_diagnostics_has_no_heat_map(tmp_path):
    from kt_bench.reporting.writer import write_report

    out = tmp_path / "run"
    report = write_report(out, fake_run(out, diagnostics=False)).read_text()
    assert "similarity per stage" not in report
    assert not (out / "report" / "stages.png").exists()
    assert "## Ranking across pairs" in report and "Nemenyi critical difference" in report
    assert (out / "report" / "ranking.png").stat().st_size > 0
    for name in ("losses-1.png", "losses-2.png", "cost.png", "curves.pdf"):
        assert (out / "report" / name).stat().st_size > 0, name
    assert "## Plots" in report and "![losses-2](report/losses-2.png)" in report
    assert not math.isnan(pd.read_csv(out / "report" / "summary.csv")["own_s"].iloc[0])
    # the same cells as a cohort: the cost figure of the first report goes, not left stale
    for log in (out / "cells").glob("*/log.txt"):
        log.write_text(log.read_text().replace("pid=1", "pid=1 in a cohort of 3"))
    write_report(out, fake_run(tmp_path / "again", diagnostics=False))
    assert not (out / "report" / "cost.png").exists()
    assert (out / "report" / "losses-2.png").exists()


def test_a_real_cohort_gets_its_cost_figure_from_each_students_own_step_time(finished, capsys):
    """The engine times each cohort member's steps (``step_s``), so a cohort's rows get a cost
    figure: the cohort's wall time shared out by those times."""
    from kt_bench.reporting.own_time import own_seconds
    from kt_bench.sweep.rows import read_rows

    from .conftest import run_cli

    _, out = finished
    rows = read_rows(out)
    assert (rows["step_s"] > 0).all() and (rows["step_s"] < rows["wall_s"]).all()
    own = own_seconds(out, rows)
    assert own.sum() == pytest.approx(rows["wall_s"].iloc[0])  # one cohort's time, shared out
    code, _, _ = run_cli(capsys, "report", str(out))
    assert code == 0 and (out / "report" / "cost.png").exists()
    assert "No cost figure" not in (out / "report.md").read_text()


def test_a_failed_members_steps_keep_their_share_of_the_cohorts_time(tmp_path):
    """A member that failed after training a while took part of the cohort's wall time: the
    ok members' shares are their step times over every member's (``cohort_step_s``)."""
    from kt_bench.reporting.own_time import own_seconds

    out = tmp_path / "run"
    rows = fake_run(out, cohort=True, step_s=True)  # step_s 1, 2, 3 for the three methods
    rows["cohort_step_s"] = 10.0  # a fourth, failed member stepped for 4 s
    own = own_seconds(out, rows)
    first = rows[(rows["teacher"] == "resnet32x4") & (rows["seed"] == 1)]
    assert own[first.index].tolist() == pytest.approx([101 / 10, 101 * 2 / 10, 101 * 3 / 10])
