"""Result rows -> comparison tables (tabulate)."""

from __future__ import annotations

import pandas as pd
from tabulate import tabulate

BASELINE = "student"


def _mean_std(values: pd.Series) -> str:
    values = values.dropna()
    if values.empty:
        return "-"
    if len(values) == 1:
        return f"{values.iloc[0]:.2f}"
    return f"{values.mean():.2f} ± {values.std(ddof=1):.2f}"


def summarise(rows: pd.DataFrame, method_order: list[str] | None = None) -> pd.DataFrame:
    """One line per (dataset, teacher, student, method): mean ± std over seeds of top-1 (last
    epoch), top-1 (best epoch), top-5, the change of mean top-1 against the ``student`` baseline,
    and mean wall time; failed and diverged cells are counted, not averaged."""
    keys = ["dataset", "teacher", "student", "method"]
    ok = rows[rows["status"] == "ok"]
    out = []
    for key, group in rows.groupby(keys, sort=False):
        good = ok.loc[ok.index.intersection(group.index)]
        base = ok[(ok["dataset"] == key[0]) & (ok["teacher"] == key[1])
                  & (ok["student"] == key[2]) & (ok["method"] == BASELINE)]
        delta = "-"
        if not good.empty and not base.empty and key[3] != BASELINE:
            delta = f"{good['top1'].mean() - base['top1'].mean():+.2f}"
        bad = group[group["status"] != "ok"]
        out.append({
            "dataset": key[0], "teacher → student": f"{key[1]} → {key[2]}", "method": key[3],
            "seeds": len(good), "top1": _mean_std(good["top1"]),
            "top1 best-epoch": _mean_std(good["top1_best"]), "top5": _mean_std(good["top5"]),
            "Δ top1 vs student": delta,
            "teacher top1": _mean_std(group["teacher_top1"].astype(float)),
            "wall s": f"{good['wall_s'].mean():.1f}" if not good.empty else "-",
            "not ok": ", ".join(f"{s} ({n})" for s, n in bad["status"].value_counts().items()),
        })
    table = pd.DataFrame(out)
    if method_order and not table.empty:
        rank = {m: i for i, m in enumerate(method_order)}
        table["_r"] = table["method"].map(lambda m: rank.get(m, len(rank)))
        table = table.sort_values(["dataset", "teacher → student", "_r"], kind="stable")
        table = table.drop(columns="_r")
    return table.reset_index(drop=True)


def comparison_table(rows: pd.DataFrame, method_order: list[str] | None = None,
                     fmt: str = "github") -> str:
    """The comparison table of ``rows`` as text (a tabulate format, Markdown by default)."""
    table = summarise(rows, method_order)
    if table.empty:
        return "(no results)"
    if not (table["not ok"] != "").any():
        table = table.drop(columns="not ok")
    return tabulate(table, headers="keys", tablefmt=fmt, showindex=False, disable_numparse=True)
