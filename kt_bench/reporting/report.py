"""Result rows -> comparison tables (Markdown, LaTeX, CSV) with paired confidence intervals.

Tables are views of the tidy rows, never state of their own. The change against the
``student`` baseline is paired by seed (same seed: same student initialisation and data
order), with a 95% t-interval over the seeds both cells have.
"""

from __future__ import annotations

import json
import math
from importlib import resources

import pandas as pd
from tabulate import tabulate

from kt_bench.core.precision import PRECISION_NAMES

BASELINE = "student"
KEYS = ["dataset", "teacher", "student", "method"]
CONFIDENCE = 0.95


def load_reference() -> pd.DataFrame:
    """Every published reference row (``results/reference/*.csv``, shipped with the package)."""
    folder = resources.files("kt_bench.reference")
    frames = [pd.read_csv(f.open()) for f in sorted(folder.iterdir(), key=lambda f: f.name)
              if f.name.endswith(".csv")]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=KEYS)


def param_columns(rows: pd.DataFrame) -> list[str]:
    """The swept-parameter columns of ``rows`` (named ``member.option``)."""
    return [c for c in rows.columns if "." in c and c.split(".")[0]]


def method_order(methods) -> list[str]:
    """``student`` first, then single methods, then combinations, each by name."""
    return sorted(set(methods), key=lambda m: (m != BASELINE, m.count("+"), m))


def in_method_order(table: pd.DataFrame, then: list[str]) -> pd.DataFrame:
    """``table`` sorted by dataset, teacher and student, then methods in :func:`method_order`,
    then the columns ``then`` (a stable sort)."""
    rank = {m: i for i, m in enumerate(method_order(table["method"]))}
    return (table.assign(_r=table["method"].map(rank))
            .sort_values(["dataset", "teacher", "student", "_r", *then], kind="stable")
            .drop(columns="_r"))


def paired_delta(method_rows: pd.DataFrame, base_rows: pd.DataFrame) -> dict:
    """Mean top-1 difference method − baseline over shared seeds, with its 95% t-interval.

    ``significant`` is None with fewer than two shared seeds (no interval)."""
    a = method_rows.groupby("seed")["top1"].mean()
    b = base_rows.groupby("seed")["top1"].mean()
    d = (a - b).dropna()
    n = len(d)
    if n == 0:
        return {"delta": math.nan, "delta_lo": math.nan, "delta_hi": math.nan, "pairs": 0,
                "significant": None}
    mean = float(d.mean())
    if n < 2:
        return {"delta": mean, "delta_lo": math.nan, "delta_hi": math.nan, "pairs": 1,
                "significant": None}
    from scipy.special import stdtrit  # Student's t quantile; scipy.stats is 3x slower to import

    half = float(stdtrit(n - 1, 0.5 + CONFIDENCE / 2) * d.std(ddof=1) / math.sqrt(n))
    lo, hi = mean - half, mean + half
    return {"delta": mean, "delta_lo": lo, "delta_hi": hi, "pairs": n,
            "significant": not (lo <= 0 <= hi)}


def _published(reference: pd.DataFrame | None, key: tuple, column: str) -> float | None:
    """The published value, NaN where a published row exists without a readable figure,
    None where there is no published row."""
    if reference is None or reference.empty:
        return None
    match = reference
    for name, value in zip(KEYS, key, strict=True):
        match = match[match[name] == value]
    if match.empty:
        return None
    values = match[column].dropna() if column in match else match.iloc[0:0]
    return float(values.iloc[0]) if not values.empty else math.nan


def _flatten(value, prefix: str = "") -> dict[str, str]:
    """A nested config as ``{"recipe.epochs": "2", ...}``."""
    if isinstance(value, dict):
        out: dict[str, str] = {}
        for k, v in value.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: json.dumps(value, sort_keys=True)}


def config_labels(rows: pd.DataFrame, params: list[str]) -> dict:
    """``config_id`` -> what sets that configuration apart from the other configurations of
    the same (dataset, teacher, student, method) in ``rows`` (e.g. ``recipe.epochs=2``);
    an empty label where a method has one configuration only."""
    labels: dict = {}
    if "config" not in rows or rows["config_id"].isna().all():
        return labels
    for _, group in rows.groupby(KEYS, sort=False, dropna=False):
        configs = {cid: _flatten(json.loads(text)) for cid, text in
                   group[["config_id", "config"]].dropna().drop_duplicates("config_id")
                   .itertuples(index=False)}
        if len(configs) < 2:
            continue
        keys = sorted(set().union(*configs.values()))
        differ = [k for k in keys if len({c.get(k) for c in configs.values()}) > 1
                  and _short_key(k) not in params]
        for cid, flat in configs.items():
            labels[cid] = ", ".join(f"{_short_key(k)}={flat.get(k, '-')}" for k in differ)
    return labels


def _short_key(key: str) -> str:
    # method options are stored per member: method_config.kd.T -> kd.T
    return key.removeprefix("method_config.")


def _baseline_rows(ok: pd.DataFrame, key: tuple, group: pd.DataFrame) -> pd.DataFrame:
    """The ``student`` rows a method's rows are paired with: same data and pair and, where
    the rows say so, the same setting (recipe, precision, teacher)."""
    base = ok[(ok["dataset"] == key[0]) & (ok["teacher"] == key[1])
              & (ok["student"] == key[2]) & (ok["method"] == BASELINE)]
    settings = group["setting_id"].dropna().unique()
    if len(settings) == 1:
        base = base[base["setting_id"] == settings[0]]
    return base


def summarise(rows: pd.DataFrame, reference: pd.DataFrame | None = None) -> pd.DataFrame:
    """One tidy line per configuration (dataset, teacher, student, method and everything
    else a cell runs with but its seed): distinct seeds, mean and std of top-1 (last epoch),
    mean top-1 (best epoch), mean top-5, the paired change against the ``student`` baseline
    of the same setting with its interval, teacher top-1, cost, and the published figures.
    Rows of different configurations are never pooled; ``config`` names what differs where a
    method has several."""
    needed = ["top1", "top1_best", "top5", "teacher_top1", "wall_s", "images_per_s", "status",
              "seed", "config_id", "setting_id"]
    rows = rows.reindex(columns=list(dict.fromkeys([*rows.columns, *needed])))
    params = param_columns(rows)
    keys = KEYS + params + ["config_id"]
    labels = config_labels(rows, params)
    ok = rows[rows["status"] == "ok"]
    out = []
    for key, group in rows.groupby(keys, sort=False, dropna=False):
        key = key if isinstance(key, tuple) else (key,)
        good = ok.loc[ok.index.intersection(group.index)]
        base = _baseline_rows(ok, key, group)
        line = dict(zip(keys, key, strict=True))
        line.update(
            config=labels.get(line["config_id"], ""),
            seeds=good["seed"].nunique(), top1=good["top1"].mean(),
            top1_std=good["top1"].std(ddof=1),
            top1_best=good["top1_best"].mean(), top5=good["top5"].mean(),
            teacher_top1=pd.to_numeric(group["teacher_top1"], errors="coerce").mean(),
            wall_s=good["wall_s"].mean(), images_per_s=good["images_per_s"].mean(),
            not_ok=", ".join(f"{s} ({n})" for s, n in
                             group.loc[group["status"] != "ok", "status"].value_counts().items()),
        )
        if key[3] != BASELINE and not base.empty and not good.empty:
            line.update(paired_delta(good, base))
        else:
            line.update(delta=math.nan, delta_lo=math.nan, delta_hi=math.nan, pairs=0,
                        significant=None)
        line["published_top1"] = _published(reference, key[:4], "top1")
        line["published_top1_best"] = _published(reference, key[:4], "top1_best")
        line["published_teacher_top1"] = _published(reference, key[:4], "teacher_top1")
        out.append(line)
    table = pd.DataFrame(out)
    if table.empty:
        return table
    return in_method_order(table, [*params, "config"]).reset_index(drop=True)


def _num(x: float, fmt: str = ".2f") -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)


def significance(line: pd.Series) -> bool | None:
    """Whether the line's interval excludes zero; None where there is no interval."""
    sig = line["significant"]
    return None if sig is None or (isinstance(sig, float) and math.isnan(sig)) else bool(sig)


def format_delta(line: pd.Series) -> str:
    """``+1.20 [0.40, 2.00]``; ``n.s.`` when the interval spans zero; ``(1 seed)`` without one."""
    if math.isnan(line["delta"]):
        return "-"
    text = f"{line['delta']:+.2f}"
    if significance(line) is None:
        return f"{text} (1 seed)"
    text += f" [{line['delta_lo']:+.2f}, {line['delta_hi']:+.2f}]"
    return text if significance(line) else text + " n.s."


def _mean_std(line: pd.Series) -> str:
    if math.isnan(line["top1"]):
        return "-"
    if line["seeds"] < 2:
        return f"{line['top1']:.2f}"
    return f"{line['top1']:.2f} ± {line['top1_std']:.2f}"


def _published_text(value: float | None, best: float | None = None) -> str:
    """The published last-epoch figure; where only a best-epoch figure was published (as
    mdistiller reports), that one, marked; ``n/a`` for a published row without a figure."""
    if value is None:
        return ""
    if math.isnan(value) and best is not None and not math.isnan(best):
        return f"{best:.2f} (best epoch)"
    return "n/a" if math.isnan(value) else f"{value:.2f}"


def _published_column(summary: pd.DataFrame) -> pd.Series:
    best = summary.get("published_top1_best", pd.Series([None] * len(summary),
                                                         index=summary.index))
    return pd.Series([_published_text(v, b) for v, b in zip(summary["published_top1"], best,
                                                              strict=True)],
                     index=summary.index)


def display_table(summary: pd.DataFrame) -> pd.DataFrame:
    """The console/Markdown long table: one line per summary line, formatted; empty columns
    (no published numbers, no failures, no sweeps) left out."""
    params = param_columns(summary)
    out = pd.DataFrame({
        "dataset": summary["dataset"],
        "teacher → student": summary["teacher"] + " → " + summary["student"],
        "method": summary["method"],
        **{p: summary[p].map(lambda v: "" if pd.isna(v) else str(v)) for p in params},
        "config": summary["config"],
        "seeds": summary["seeds"].astype(str),
        "top1": summary.apply(_mean_std, axis=1),
        "top1 best-epoch": summary["top1_best"].map(_num),
        "top5": summary["top5"].map(_num),
        "Δ top1 vs student (95% CI)": summary.apply(format_delta, axis=1),
        "teacher top1": summary["teacher_top1"].map(_num),
        "published top1": _published_column(summary),
        "published teacher top1": summary["published_teacher_top1"].map(_published_text),
        "wall s": summary["wall_s"].map(lambda v: _num(v, ".1f")),
        "not ok": summary["not_ok"],
    })
    for col in ("config", "published top1", "published teacher top1", "not ok"):
        if not (out[col] != "").any():
            out = out.drop(columns=col)
    return out


def comparison_table(rows: pd.DataFrame, fmt: str = "github",
                     reference: pd.DataFrame | None = None) -> str:
    """The comparison table of ``rows`` as text (a tabulate format, Markdown by default)."""
    summary = summarise(rows, load_reference() if reference is None else reference)
    if summary.empty:
        return "(no results)"
    return tabulate(display_table(summary), headers="keys", tablefmt=fmt, showindex=False,
                    disable_numparse=True)


def _row_label(line: pd.Series, params: list[str]) -> str:
    swept = [f"{p}={line[p]}" for p in params if not pd.isna(line[p])]
    if line.get("config"):
        swept.append(line["config"])
    return line["method"] + (f" [{', '.join(swept)}]" if swept else "")


def pivot(summary: pd.DataFrame, bold=lambda s: f"**{s}**", mark_ns: str = "†") -> pd.DataFrame:
    """Methods x (dataset: teacher → student): ``mean ± std (Δ)``; the best mean of each column
    in ``bold``; a Δ whose interval spans zero marked with ``mark_ns``; ``paper X`` where a
    published figure exists."""
    params = param_columns(summary)
    summary = summary.assign(
        _col=summary["dataset"] + ": " + summary["teacher"] + " → " + summary["student"],
        _row=summary.apply(lambda r: _row_label(r, params), axis=1))
    best = summary.groupby("_col")["top1"].transform("max")
    cells = {}
    for _, line in summary.iterrows():
        text = _mean_std(line)
        if not math.isnan(line["top1"]) and line["top1"] == best[line.name]:
            text = bold(text)
        if not math.isnan(line["delta"]):
            delta = f"{line['delta']:+.2f}"
            if significance(line) is False:
                delta += mark_ns
            text += f" ({delta})"
        published = _published_text(line["published_top1"], line.get("published_top1_best"))
        if published:
            text += f"; paper {published}"
        cells[(line["_row"], line["_col"])] = text
    rows = list(dict.fromkeys(summary["_row"]))
    cols = list(dict.fromkeys(summary["_col"]))
    table = pd.DataFrame([[cells.get((r, c), "") for c in cols] for r in rows],
                         index=rows, columns=cols)
    teacher = summary.groupby("_col")["teacher_top1"].mean()
    table.loc["(teacher)"] = [_num(teacher[c]) for c in cols]
    return table


def _latex_escape(text: str) -> str:
    for a, b in (("\\", r"\textbackslash{}"), ("_", r"\_"), ("&", r"\&"), ("%", r"\%"),
                 ("#", r"\#"), ("±", r"$\pm$"), ("→", r"$\to$"), ("†", r"$^\dagger$")):
        text = text.replace(a, b)
    return text


def markdown_pivot(summary: pd.DataFrame) -> str:
    """The pivot as a Markdown table."""
    table = pivot(summary)
    return tabulate(table, headers="keys", tablefmt="github", disable_numparse=True)


def latex_pivot(summary: pd.DataFrame) -> str:
    """The pivot as a LaTeX (booktabs) table."""
    table = pivot(summary, bold=lambda s: f"\x00{s}\x01")  # marked, escaped, then bolded
    table = table.map(lambda s: _latex_escape(s).replace("\x00", "\\textbf{").replace("\x01", "}"))
    table.index = [_latex_escape(i) for i in table.index]
    table.columns = [_latex_escape(c) for c in table.columns]
    return tabulate(table, headers="keys", tablefmt="latex_raw", disable_numparse=True)


def _without(value, factor: str):
    """A nested config with every key named ``factor`` removed, at any depth."""
    if isinstance(value, dict):
        return {k: _without(v, factor) for k, v in value.items() if k != factor}
    return value


def versus(rows: pd.DataFrame, factor: str, reference: str) -> pd.DataFrame:
    """The paired top-1 change made by ``factor`` (a setting the cells record, e.g.
    ``precision``): for every configuration run both with ``factor`` = ``reference`` and with
    another value, one line per other value with the mean top-1 of each, and the difference
    value − reference paired by seed with its 95% t-interval. Configurations are matched on
    everything else they run with (the teacher's own ``factor`` included in what is varied)."""
    ok = rows[rows["status"] == "ok"].copy()
    if ok.empty or factor not in ok or "config" not in ok:
        return pd.DataFrame()
    ok["_rest"] = ok["config"].map(
        lambda text: json.dumps(_without(json.loads(text), factor), sort_keys=True))
    ok[factor] = ok[factor].astype(str)
    out = []
    for _, group in ok.groupby([*KEYS, "_rest"], sort=False):
        base = group[group[factor] == reference]
        if base.empty:
            continue
        for value, other in group[group[factor] != reference].groupby(factor, sort=True):
            line = dict(zip(KEYS, group.iloc[0][KEYS], strict=True))
            line.update({factor: value, f"top1 ({reference})": base["top1"].mean(),
                         "top1": other["top1"].mean(), **paired_delta(other, base)})
            out.append(line)
    table = pd.DataFrame(out)
    if table.empty:
        return table
    return in_method_order(table, [factor])


def versus_table(rows: pd.DataFrame, factor: str, reference: str, fmt: str = "github") -> str:
    """:func:`versus` as text: one line per method and value, the change with its interval
    (``n.s.`` where it spans zero)."""
    table = versus(rows, factor, reference)
    if table.empty:
        return f"(no configuration was run with both {factor}={reference} and another value)"
    # precisions by their usual names (Accelerate calls fp32 "no")
    name = (lambda v: PRECISION_NAMES.get(v, v)) if factor == "precision" else str
    shown = pd.DataFrame({
        "dataset": table["dataset"],
        "teacher → student": table["teacher"] + " → " + table["student"],
        "method": table["method"], factor: table[factor].map(name),
        "pairs": table["pairs"].astype(str),
        f"top1 ({name(reference)})": table[f"top1 ({reference})"].map(_num),
        "top1": table["top1"].map(_num),
        f"Δ top1 vs {name(reference)} (95% CI)": table.apply(format_delta, axis=1),
    })
    return tabulate(shown, headers="keys", tablefmt=fmt, showindex=False, disable_numparse=True)
