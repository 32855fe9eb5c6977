"""Report: paired intervals by hand, table marks, and the files a report writes."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from kt_bench.commands.main import main
from kt_bench.reporting.report import (
    format_delta,
    latex_pivot,
    markdown_pivot,
    paired_delta,
    summarise,
)

from .conftest import run_cli, write_tiny_grid


def _rows(values: dict[str, list[float]], seeds=None) -> pd.DataFrame:
    out = []
    for method, accs in values.items():
        for seed, acc in zip(seeds or range(len(accs)), accs, strict=True):
            out.append({"dataset": "d", "teacher": "t", "student": "s", "method": method,
                        "seed": seed, "top1": acc, "top1_best": acc + 1, "top5": 99.0,
                        "teacher_top1": 80.0, "wall_s": 1.0, "images_per_s": 10.0,
                        "status": "ok"})
    return pd.DataFrame(out)


def test_paired_delta_is_a_t_interval_over_seed_differences():
    rows = _rows({"student": [69.0, 70.0, 71.0], "kd": [70.0, 72.0, 74.0]})
    d = paired_delta(rows[rows.method == "kd"], rows[rows.method == "student"])
    # differences 1, 2, 3: mean 2, sd 1; t(0.975, 2 dof) = 4.302653
    half = 4.302652729911275 * 1.0 / math.sqrt(3)
    assert d["delta"] == pytest.approx(2.0)
    assert (d["delta_lo"], d["delta_hi"]) == pytest.approx((2 - half, 2 + half))
    assert d["pairs"] == 3 and d["significant"] is False


def test_paired_delta_pairs_only_shared_seeds_and_marks_significance():
    base = _rows({"student": [70.0, 71.0, 72.0]}, seeds=[0, 1, 2])
    method = _rows({"kd": [72.0, 73.1, 99.0]}, seeds=[0, 1, 7])
    d = paired_delta(method, base)
    assert d["pairs"] == 2 and d["delta"] == pytest.approx(2.05)
    rows = _rows({"student": [70.0, 71.0, 72.0], "kd": [72.0, 73.1, 73.9]})
    d = paired_delta(rows[rows.method == "kd"], rows[rows.method == "student"])
    assert d["significant"] is True
    single = paired_delta(_rows({"kd": [75.0]}), _rows({"student": [70.0]}))
    assert single["significant"] is None and format_delta(pd.Series(single)) == "+5.00 (1 seed)"


def test_pivot_marks_the_best_and_the_not_significant():
    rows = _rows({"student": [69.0, 70.0, 71.0], "kd": [70.0, 72.0, 74.0],
                  "nst_poly": [72.0, 73.1, 73.9]})
    summary = summarise(rows)
    md = markdown_pivot(summary)
    assert "**73.00 ± 0.95** (+3.00)" in md  # nst_poly: best, significant
    assert "72.00 ± 2.00 (+2.00†)" in md  # kd: interval spans zero
    assert "(teacher)" in md and "80.00" in md
    tex = latex_pivot(summary)
    assert r"\textbf{73.00 $\pm$ 0.95}" in tex and r"nst\_poly" in tex and r"$^\dagger$" in tex


def test_latex_table_is_booktabs_with_escaped_names_and_the_correction_under_it():
    rows = _rows({"student": [69.0, 70.0, 71.0], "kd": [70.0, 72.0, 74.0],
                  "nst_poly": [72.0, 73.1, 73.9]})
    rows["dataset"] = "c&d 50% #1"
    tex = latex_pivot(summarise(rows))
    lines = tex.splitlines()
    assert lines[0] == r"\begin{tabular}{lr}" and lines[1] == r"\toprule"
    assert lines[2] == r"Method & c\&d 50\% \#1: t $\to$ s \\" and lines[3] == r"\midrule"
    assert lines[4].startswith("student & ") and lines[-4] == r"\bottomrule"
    assert lines.count(r"\midrule") == 2  # under the heading, and above the teacher's line
    assert lines[-5] == r"(teacher) & 80.00 \\"
    assert r"\hline" not in tex and r"\textbf{73.00 $\pm$ 0.95}" in tex
    assert "Holm" in lines[-1] and lines[-1].startswith(r"\par\smallskip{\footnotesize")
    from kt_bench.reporting.report import latex_escape

    assert latex_escape("a_b & {c} ~ ^ $ \\") == (r"a\_b \& \{c\} \textasciitilde{} \^{} \$ "
                                                  r"\textbackslash{}")


def test_report_command_writes_tables_plots_and_report_md(tmp_path, capsys):
    grid = write_tiny_grid(tmp_path, methods=("student", "kd"), seeds=(0, 1))
    out = tmp_path / "out"
    assert main(["run", "--grid", str(grid), "--out", str(out), "--no-report"]) == 0
    assert not (out / "report.md").exists()
    assert main(["report", str(out)]) == 0
    folder = out / "report"
    for name in ("table.md", "table.tex", "summary.csv", "accuracy.png", "accuracy.pdf",
                 "curves.png", "curves.pdf", "losses.png", "losses.pdf"):
        assert (folder / name).stat().st_size > 0, name
    # the cells trained as a cohort: the figure shares its time out by their own step times
    assert (folder / "cost.png").stat().st_size > 0
    from PIL import Image

    with Image.open(folder / "accuracy.png") as img:
        assert img.size[0] > 400 and img.size[1] > 300
    report = (out / "report.md").read_text()
    assert "![accuracy](report/accuracy.png)" in report
    assert "![losses](report/losses.png)" in report
    assert "No cost figure" not in report and "![cost](report/cost.png)" in report
    assert "[table.tex](report/table.tex)" in report
    assert "corrected by Holm's step-down method" in report
    assert r"\toprule" in (folder / "table.tex").read_text()
    summary = pd.read_csv(folder / "summary.csv")
    assert {"top1", "top1_std", "delta", "delta_lo", "delta_hi", "significant"} <= set(summary)
    assert summary.loc[summary.method == "kd", "seeds"].item() == 2
    assert set(summary["correction"]) == {"holm"}
    assert main(["report", str(out), "--correct", "none"]) == 0
    assert "left uncorrected (`--correct none`)" in capsys.readouterr().out
    assert set(pd.read_csv(folder / "summary.csv")["correction"]) == {"none"}
    with pytest.raises(SystemExit):
        main(["report", str(out), "--correct", "bonferroni"])
    assert "invalid choice: 'bonferroni'" in capsys.readouterr().err


def _precision_rows(values: dict[tuple[str, str], list[float]], epochs: int = 2) -> pd.DataFrame:
    """Rows of (method, precision) with one top-1 per seed and the config cells record."""
    import json

    out = []
    for (method, precision), accs in values.items():
        config = {"method": method, "precision": precision, "recipe": {"epochs": epochs},
                  "teacher": {"precision": precision, "seed": 0}}
        for seed, acc in enumerate(accs):
            out.append({"dataset": "d", "teacher": "t", "student": "s", "method": method,
                        "seed": seed, "top1": acc, "status": "ok", "precision": precision,
                        "config": json.dumps(config, sort_keys=True)})
    return pd.DataFrame(out)


def test_versus_pairs_each_configuration_across_the_factor_by_seed():
    from kt_bench.reporting.report import versus, versus_table

    rows = _precision_rows({("kd", "no"): [70.0, 71.0, 72.0], ("kd", "bf16"): [71.0, 73.0, 75.0],
                            ("student", "no"): [60.0, 61.0], ("student", "bf16"): [60.5, 60.5],
                            ("at", "no"): [50.0, 50.0, 50.0]})  # at: fp32 only, no line
    # another configuration (3 epochs) is never paired with the 2-epoch one
    rows = pd.concat([rows, _precision_rows({("kd", "bf16"): [10.0, 10.0, 10.0]}, epochs=3)])
    table = versus(rows, "precision", "no")
    assert list(table["method"]) == ["student", "kd"]
    kd = table[table["method"] == "kd"].iloc[0]
    # differences 1, 2, 3: mean 2, sd 1, t(0.975, 2 dof) = 4.302653
    half = 4.302652729911275 / math.sqrt(3)
    assert kd["precision"] == "bf16" and kd["pairs"] == 3
    assert kd["top1 (no)"] == pytest.approx(71.0) and kd["top1"] == pytest.approx(73.0)
    assert (kd["delta"], kd["delta_lo"], kd["delta_hi"]) == pytest.approx((2, 2 - half, 2 + half))
    student = table[table["method"] == "student"].iloc[0]
    assert student["pairs"] == 2 and student["delta"] == pytest.approx(0.0)
    text = versus_table(rows, "precision", "no")
    assert "+2.00 [" in text and "n.s." in text
    assert "no configuration" in versus_table(rows[rows["method"] == "at"], "precision", "no")


def test_report_versus_flag(tmp_path, capsys):
    grid = write_tiny_grid(tmp_path, methods=("student", "kd"), seeds=(0, 1), epochs=1)
    out = tmp_path / "run"
    for precision in ("no", "bf16"):
        assert main(["run", "--grid", str(grid), "--out", str(out), "--precision", precision,
                     "--device", "cpu", "--no-report"]) == 0
    capsys.readouterr()
    assert main(["report", str(out), "--versus", "precision=no"]) == 0
    printed = capsys.readouterr().out
    assert "paired change of each method's top-1 with precision against precision=no" in printed
    text = (out / "report" / "versus-precision.md").read_text()
    assert text.count("| bf16 ") == 2 and "student" in text and "kd" in text
    assert "bf16 autocast (4 cells), fp32 (4 cells)" in (out / "report.md").read_text()
    assert main(["report", str(out), "--versus", "precision=fp8"]) == 2
    assert "no row ran with precision=fp8; the rows have precision bf16, no" in \
        capsys.readouterr().err
    assert main(["report", str(out), "--versus", "seed"]) == 2
    assert "--versus takes FIELD=REFERENCE" in capsys.readouterr().err


def test_latex_escapes_the_comparison_signs_of_the_notes():
    from kt_bench.reporting.report import latex_escape

    # OT1, LaTeX's default font encoding, prints a bare > as an inverted question mark
    assert latex_escape("p > 0.05 & p < 1_0") == r"p $>$ 0.05 \& p $<$ 1\_0"


def test_versus_fused_compares_a_fused_run_with_an_unfused_one_given_by_with_run(
        tmp_path, capsys, monkeypatch):
    from kt_bench.sweep import fusion_choice
    from kt_bench.training.fusion_speed import FusionSpeed

    # the measurement says fusion pays, whatever this machine would measure
    monkeypatch.setattr(fusion_choice, "measure_fusion",
                        lambda spec, data, batch, members, acc: FusionSpeed(members, 0.5, 1.0))
    grid = write_tiny_grid(tmp_path, methods=("student", "kd"), seeds=(0, 1))
    fused, unfused = tmp_path / "fused", tmp_path / "unfused"
    assert main(["run", "--grid", str(grid), "--out", str(fused), "--no-report"]) == 0
    assert main(["run", "--grid", str(grid), "--out", str(unfused), "--no-report",
                 "--no-fuse"]) == 0
    assert pd.read_csv(fused / "results.csv")["fused"].all()
    assert not pd.read_csv(unfused / "results.csv")["fused"].any()
    capsys.readouterr()
    code, out, err = run_cli(capsys, "report", str(fused), "--versus", "fused=False",
                             "--with-run", str(unfused))
    assert code == 0, err
    lines = (fused / "report" / "versus-fused.md").read_text().splitlines()
    for method in ("student", "kd"):  # each paired over the two seeds
        (line,) = [x for x in lines if f"| {method} " in x]
        assert "| True " in line and "| 2 " in line
    assert not (unfused / "report").exists()  # the other folder is only read


def test_with_run_needs_versus_and_a_folder_of_rows(tmp_path, capsys, finished):
    out = finished[1]
    code, _, err = run_cli(capsys, "report", str(out), "--with-run", str(tmp_path))
    assert code == 2 and "give --versus FIELD=REFERENCE too" in err
    code, _, err = run_cli(capsys, "report", str(out), "--versus", "fused=False",
                           "--with-run", str(tmp_path))
    assert code == 2 and f"--with-run {tmp_path}: it holds no results" in err
