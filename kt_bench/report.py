"""Result rows -> comparison tables (tabulate)."""

from __future__ import annotations

from importlib import resources

import pandas as pd
from tabulate import tabulate

BASELINE = "student"
KEYS = ["dataset", "teacher", "student", "method"]


def load_reference() -> pd.DataFrame:
    """Every published reference row (``results/reference/*.csv``, shipped with the package)."""
    folder = resources.files("kt_bench.reference")
    frames = [pd.read_csv(f.open()) for f in sorted(folder.iterdir(), key=lambda f: f.name)
              if f.name.endswith(".csv")]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=KEYS)


def _mean_std(values: pd.Series) -> str:
    values = values.dropna()
    if values.empty:
        return "-"
    if len(values) == 1:
        return f"{values.iloc[0]:.2f}"
    return f"{values.mean():.2f} ± {values.std(ddof=1):.2f}"


def _published(reference: pd.DataFrame | None, key: tuple, column: str) -> str:
    if reference is None or reference.empty:
        return ""
    match = reference
    for name, value in zip(KEYS, key, strict=True):
        match = match[match[name] == value]
    values = match[column].dropna() if column in match else match.iloc[0:0]
    if not match.empty and values.empty:
        return "n/a"  # a published row exists, its figure could not be read
    return f"{values.iloc[0]:.2f}" if not values.empty else ""


def summarise(rows: pd.DataFrame, method_order: list[str] | None = None,
              reference: pd.DataFrame | None = None) -> pd.DataFrame:
    """One line per (dataset, teacher, student, method): mean ± std over seeds of top-1 (last
    epoch), top-1 (best epoch), top-5, the change of mean top-1 against the ``student`` baseline,
    and mean wall time; failed and diverged cells are counted, not averaged. With
    ``reference`` rows, the published top-1 of the same cell (and of its teacher) beside."""
    keys = KEYS
    needed = ["top1", "top1_best", "top5", "teacher_top1", "wall_s", "status"]
    rows = rows.reindex(columns=list(dict.fromkeys([*rows.columns, *needed])))
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
            "published top1": _published(reference, key, "top1"),
            "published teacher top1": _published(reference, key, "teacher_top1"),
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
                     fmt: str = "github", reference: pd.DataFrame | None = None) -> str:
    """The comparison table of ``rows`` as text (a tabulate format, Markdown by default);
    columns that are empty everywhere (no published numbers, no failures) are left out."""
    table = summarise(rows, method_order, load_reference() if reference is None else reference)
    if table.empty:
        return "(no results)"
    for col in ("published top1", "published teacher top1", "not ok"):
        if not (table[col] != "").any():
            table = table.drop(columns=col)
    return tabulate(table, headers="keys", tablefmt=fmt, showindex=False, disable_numparse=True)
