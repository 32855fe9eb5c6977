"""Downstream evaluations in the report: columns joined by cell, means and paired changes by
hand, failed lines left out, the published CRD transfer figures, and damaged files."""

from __future__ import annotations

import math

import pandas as pd
import pytest
from scipy import stats

from kt_bench.reporting.downstream import (
    DOWNSTREAM_COLUMNS,
    downstream_columns,
    read_downstream,
    split_column,
    with_downstream,
)
from kt_bench.reporting.report import (
    comparison_table,
    load_downstream_reference,
    load_reference,
    paired_delta,
    summarise,
)
from kt_bench.reporting.writer import write_report
from kt_bench.sweep.rows import forget_warnings

PAIR = {"grid": "crd-cifar100", "dataset": "cifar100", "teacher": "wrn_40_2",
        "student": "wrn_16_2"}
#: Training top-1 per method and seed: kd − student = 2, 3, 4.
TOP1 = {"student": [73.0, 74.0, 75.0], "kd": [75.0, 77.0, 79.0], "crd": [74.0, 75.0, 76.0]}
#: STL-10 probe top-1: kd − student = 1, 2, 3; crd's seed 2 failed (its value must not count).
PROBE = {"student": [69.0, 70.0, 71.0], "kd": [70.0, 72.0, 74.0], "crd": [71.5, 72.0, None]}
#: VOC 2007 mAP50: kd on seed 0 only, crd on none.
DETECTION = {"student": [40.0, 41.0, 42.0], "kd": [41.5, None, None], "crd": [None] * 3}
PROBE_COLUMN = "probe-stl10 top1"
#: The datasets' labels as the crd-cifar100 grid's units name them (and the figures match).
STL, TINY = "stl10(image_size=32)", "tiny_imagenet(image_size=32)"
DETECTION_COLUMN = "detection-voc2007 map50"


def _rows() -> pd.DataFrame:
    return pd.DataFrame([
        {**PAIR, "method": method, "seed": seed, "epochs": 2, "top1": acc, "top5": 99.0,
         "top1_best": acc, "teacher_top1": 75.6, "wall_s": 10.0, "images_per_s": 100.0,
         "world_size": 1, "precision": "no", "status": "ok", "error": "",
         "cell_id": f"{method}-{seed}", "config_id": f"c-{method}", "setting_id": "s"}
        for method, accs in TOP1.items() for seed, acc in enumerate(accs)])


def _line(method: str, seed: int, unit: str, kind: str, dataset: str, metric: str,
          value: float | None, status: str = "ok", error: str = "") -> dict:
    return {"cell_id": f"{method}-{seed}", "unit": unit, "kind": kind, "dataset": dataset,
            "metric": metric, "value": math.nan if value is None else value, "status": status,
            "error": error, "wall_s": 3.0, "grid": PAIR["grid"], "trained_on": PAIR["dataset"],
            "teacher": PAIR["teacher"], "student": PAIR["student"], "method": method,
            "seed": seed, "config_id": f"c-{method}", "setting_id": "s"}


def _downstream() -> pd.DataFrame:
    lines = []
    for method in TOP1:
        for seed in range(3):
            probe = PROBE[method][seed]
            lines.append(_line(method, seed, "probe-stl10", "linear_probe", STL, "top1",
                               probe) if probe is not None else
                         # a failed unit with a figure in it: it must count nowhere
                         _line(method, seed, "probe-stl10", "linear_probe", STL, "top1",
                               5.0, "failed", "CUDA out of memory"))
            if DETECTION[method][seed] is not None:
                lines.append(_line(method, seed, "detection-voc2007", "detection", "voc2007",
                                   "map50", DETECTION[method][seed]))
    return pd.DataFrame(lines, columns=DOWNSTREAM_COLUMNS)


@pytest.fixture
def folder(tmp_path):
    _downstream().to_csv(tmp_path / "downstream.csv", index=False)
    return tmp_path


def _interval(diffs: list[float]) -> tuple[float, float, float, float]:
    """mean, lo, hi, p of the paired t-test of ``diffs`` at 95%, by hand."""
    n = len(diffs)
    mean = sum(diffs) / n
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1))
    half = stats.t.ppf(0.975, n - 1) * sd / math.sqrt(n)
    p = 2 * stats.t.sf(abs(mean / (sd / math.sqrt(n))), n - 1)
    return mean, mean - half, mean + half, p


def test_ok_lines_become_columns_by_cell_and_failed_lines_are_left_out(folder):
    rows = with_downstream(_rows(), folder)
    by_cell = rows.set_index("cell_id")
    assert list(rows.columns[-4:]) == [PROBE_COLUMN, "probe-stl10 dataset", DETECTION_COLUMN,
                                       "detection-voc2007 dataset"]
    assert by_cell.loc["kd-1", PROBE_COLUMN] == 72.0
    assert math.isnan(by_cell.loc["crd-2", PROBE_COLUMN])  # failed: no value
    assert by_cell.loc["kd-0", DETECTION_COLUMN] == 41.5
    assert math.isnan(by_cell.loc["kd-1", DETECTION_COLUMN])
    assert by_cell.loc["crd-0", "probe-stl10 dataset"] == STL
    again = downstream_columns(rows, read_downstream(folder))  # joining twice: once
    pd.testing.assert_frame_equal(again, rows)
    assert split_column(PROBE_COLUMN) == ("probe-stl10", "top1")
    assert split_column("probe-stl10 dataset") is None and split_column("kd.T") is None


def test_summary_means_and_paired_changes_match_a_hand_computation(folder):
    rows = with_downstream(_rows(), folder)
    summary = summarise(rows, load_reference(), downstream_reference=load_downstream_reference())
    line = summary.set_index("method")
    assert line.loc["kd", PROBE_COLUMN] == pytest.approx(72.0)
    assert line.loc["crd", PROBE_COLUMN] == pytest.approx(71.75)  # seed 2 failed: not 49.5
    assert line.loc["crd", f"{PROBE_COLUMN} seeds"] == 2
    for method, diffs in (("kd", [1.0, 2.0, 3.0]), ("crd", [2.5, 2.0])):
        mean, lo, hi, p = _interval(diffs)
        got = line.loc[method]
        assert got[f"{PROBE_COLUMN} delta"] == pytest.approx(mean)
        # the default (Holm) correction is top-1's: downstream intervals stay at 95%
        assert got[f"{PROBE_COLUMN} delta_lo"] == pytest.approx(lo)
        assert got[f"{PROBE_COLUMN} delta_hi"] == pytest.approx(hi)
        assert got[f"{PROBE_COLUMN} p"] == pytest.approx(p)
        assert got[f"{PROBE_COLUMN} pairs"] == len(diffs)
    assert line.loc["kd", f"{DETECTION_COLUMN} delta"] == pytest.approx(1.5)
    assert line.loc["kd", f"{DETECTION_COLUMN} pairs"] == 1
    assert math.isnan(line.loc["kd", f"{DETECTION_COLUMN} delta_lo"])
    assert math.isnan(line.loc["student", f"{PROBE_COLUMN} delta"])
    # top-1's change is as before: 2, 3, 4
    mean, lo, hi, _ = _interval([2.0, 3.0, 4.0])
    assert line.loc["kd", "delta"] == pytest.approx(mean)
    assert summary["correction"].iloc[0] == "holm"


def test_published_crd_transfer_figures_show_beside_their_cells(folder):
    rows = with_downstream(_rows(), folder)
    summary = summarise(rows, load_reference(), downstream_reference=load_downstream_reference())
    line = summary.set_index("method")
    assert line.loc["student", f"{PROBE_COLUMN} published"] == 69.7
    assert line.loc["kd", f"{PROBE_COLUMN} published"] == 70.9
    assert line.loc["crd", f"{PROBE_COLUMN} published"] == 71.6
    assert line.loc["kd", f"{PROBE_COLUMN} published teacher"] == 68.6
    assert line.loc["kd", f"{DETECTION_COLUMN} published"] is None  # nothing published


def test_printed_table_carries_each_downstream_column(folder):
    text = comparison_table(with_downstream(_rows(), folder))
    header = text.splitlines()[0]
    assert f"{PROBE_COLUMN} (Δ vs student, 95% CI unadjusted)" in header
    assert f"{DETECTION_COLUMN} (Δ vs student, 95% CI unadjusted)" in header
    assert f"published teacher {PROBE_COLUMN}" in header
    _, lo, hi, _ = _interval([1.0, 2.0, 3.0])
    assert f"72.00 (Δ +2.00 [{lo:+.2f}, {hi:+.2f}]); paper 70.90" in text
    assert "70.00; paper 69.70" in text  # the baseline: its mean, no change
    assert "68.60" in text
    detection = _cells(text, f"{DETECTION_COLUMN} (Δ vs student, 95% CI unadjusted)")
    # one shared seed: no interval; nothing published; no result at all
    assert detection == {"student": "41.00", "kd": "41.50 (Δ +1.50)", "crd": "-"}


def _cells(table: str, heading: str) -> dict[str, str]:
    """The column ``heading`` of a Markdown ``table`` by method."""
    lines = [[c.strip() for c in t.split("|")[1:-1]] for t in table.splitlines()
             if t.startswith("| ")]
    head = lines[0]
    return {line[head.index("method")]: line[head.index(heading)] for line in lines[1:]}


def test_report_shows_the_columns_and_a_downstream_section(folder):
    forget_warnings()
    path = write_report(folder, _rows())
    text = path.read_text()
    _, lo, hi, _ = _interval([1.0, 2.0, 3.0])
    cell = f"72.00 (Δ +2.00 [{lo:+.2f}, {hi:+.2f}]); paper 70.90"
    assert cell in text and cell in (folder / "report" / "table.md").read_text()
    summary = pd.read_csv(folder / "report" / "summary.csv")
    assert summary.set_index("method").loc["kd", f"{PROBE_COLUMN} delta"] == pytest.approx(2.0)
    section = text.split("## Downstream evaluations", 1)[1]
    units = [line.split("|")[1:-1] for line in section.splitlines() if line.startswith("| ")]
    assert [[c.strip() for c in u] for u in units[1:]] == [
        ["probe-stl10", "linear_probe", STL, "top1", "8", "1"],
        ["detection-voc2007", "detection", "voc2007", "map50", "4", "0"],
    ]
    assert "- `probe-stl10`, 1 cell: CUDA out of memory" in section
    assert "not adjusted for multiple comparisons" in section


def test_report_without_downstream_has_no_section(tmp_path):
    text = write_report(tmp_path, _rows()).read_text()
    assert "Downstream" not in text and PROBE_COLUMN not in text


def test_paired_delta_of_top1_is_the_default_and_other_columns_pair_the_same_way(folder):
    rows = with_downstream(_rows(), folder)
    kd, student = rows[rows.method == "kd"], rows[rows.method == "student"]
    default = paired_delta(kd, student)
    assert paired_delta(kd, student, column="top1") == default
    mean, lo, hi, p = _interval([2.0, 3.0, 4.0])
    assert default["delta"] == pytest.approx(mean) and default["pairs"] == 3
    assert (default["delta_lo"], default["delta_hi"]) == pytest.approx((lo, hi))
    assert default["p"] == pytest.approx(p) and default["significant"] is True
    probe = paired_delta(kd, student, column=PROBE_COLUMN)
    assert probe["delta"] == pytest.approx(2.0) and probe["significant"] is False


def test_unit_names_with_dots_are_no_swept_parameters(folder):
    data = _downstream()
    data["unit"] = data["unit"].str.replace("probe-stl10", "probe.v2")
    summary = summarise(downstream_columns(_rows(), data))
    assert len(summary) == 3 and "probe.v2 top1" in summary
    assert summary.set_index("method").loc["kd", "probe.v2 top1"] == pytest.approx(72.0)


@pytest.mark.parametrize("text,why", [
    (",".join(DOWNSTREAM_COLUMNS) + '\nkd-0,"probe-st\n', "ParserError"),  # cut short
    ("cell_id,unit\nkd-0,probe-stl10\n", "no column"),
    ("", "No columns to parse"),
    (None, "value is not a finite number"),
])
def test_a_damaged_downstream_file_warns_in_one_line_and_gives_no_lines(tmp_path, capsys,
                                                                        text, why):
    forget_warnings()
    path = tmp_path / "downstream.csv"
    if text is None:
        data = _downstream()
        data["value"] = data["value"].astype(object)
        data.loc[0, "value"] = "seventy"
        data.to_csv(path, index=False)
    else:
        path.write_text(text)
    frame = read_downstream(tmp_path)
    assert frame.empty and list(frame.columns) == DOWNSTREAM_COLUMNS
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{path} is damaged (" in err and why in err
    assert list(downstream_columns(_rows(), frame).columns) == list(_rows().columns)


def test_no_downstream_file_gives_no_lines_and_no_warning(tmp_path, capsys):
    forget_warnings()
    frame = read_downstream(tmp_path)
    assert frame.empty and list(frame.columns) == DOWNSTREAM_COLUMNS
    assert capsys.readouterr().err == ""


def test_downstream_reference_is_the_crd_transfer_table_and_apart_from_result_rows():
    assert "unit_dataset" not in load_reference().columns
    ref = load_downstream_reference()
    assert set(ref["grid"]) == {"crd-cifar100"} and set(ref["dataset"]) == {"cifar100"}
    assert set(ref["teacher"]) == {"wrn_40_2"} and set(ref["student"]) == {"wrn_16_2"}
    assert set(ref["metric"]) == {"top1"}
    figures = {(r.method, r.unit_dataset): r.value for r in ref.itertuples()}
    assert figures == {
        ("(teacher)", STL): 68.6, ("(teacher)", TINY): 31.5,
        ("student", STL): 69.7, ("student", TINY): 33.7,
        ("kd", STL): 70.9, ("kd", TINY): 33.9,
        ("at", STL): 70.7, ("at", TINY): 34.2,
        ("fitnet", STL): 70.3, ("fitnet", TINY): 33.5,
        ("crd", STL): 71.6, ("crd", TINY): 35.6,
        ("crd+kd", STL): 72.2, ("crd+kd", TINY): 35.5,
    }
    assert ref["source"].str.contains("giakoumoglou/distillers README; not checked").all()
