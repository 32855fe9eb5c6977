"""Result rows -> comparison tables (Markdown, LaTeX, CSV) with paired confidence intervals.

Tables are views of the tidy rows, never state of their own. The change against the
``student`` baseline is paired by seed (same seed: same student initialisation and data
order), with a t-interval over the seeds both cells have and a paired t-test's p-value. The
comparisons of one table are one family: their marks and intervals are corrected together
(:mod:`kt_bench.reporting.corrections`; Holm by default).
"""

from __future__ import annotations

import json
import math
from importlib import resources

import pandas as pd
from tabulate import tabulate

from kt_bench.core.precision import PRECISION_NAMES
from kt_bench.reporting.corrections import (
    CORRECTIONS,
    adjusted_p,
    check_correction,
    interval_alphas,
)
from kt_bench.reporting.downstream import dataset_column, metric_columns, split_column

BASELINE = "student"
KEYS = ["dataset", "teacher", "student", "method"]
CONFIDENCE = 0.95
#: The correction a table applies unless told otherwise.
DEFAULT_CORRECTION = CORRECTIONS[0]
#: Diagnostics a row may carry (the mean over seeds is shown where present): agreement with
#: the teacher's top-1 (%), KL divergence from the teacher (nats), calibration error (%).
DIAGNOSTIC_COLUMNS = {"agreement": ("agreement %", ".1f"), "kl_teacher": ("KL teacher", ".3f"),
                      "ece": ("ECE %", ".2f")}


#: The files of ``results/reference`` holding published downstream figures, not result rows.
DOWNSTREAM_REFERENCE_PREFIX = "downstream_"
#: Their columns: the trained cell (``dataset`` the data it trained on), the downstream
#: dataset's label and metric, and the figure. The teacher's own figure has method
#: :data:`TEACHER_METHOD`.
DOWNSTREAM_REFERENCE_COLUMNS = ["grid", *KEYS, "unit_dataset", "metric", "value", "source",
                                "note"]
TEACHER_METHOD = "(teacher)"


def _reference_frames(downstream: bool) -> list[pd.DataFrame]:
    """The CSV files of ``results/reference`` (shipped with the package) by name: those of
    downstream figures or the others."""
    folder = resources.files("kt_bench.reference")
    return [pd.read_csv(f.open()) for f in sorted(folder.iterdir(), key=lambda f: f.name)
            if f.name.endswith(".csv")
            and f.name.startswith(DOWNSTREAM_REFERENCE_PREFIX) == downstream]


def load_reference() -> pd.DataFrame:
    """Every published reference row (``results/reference/*.csv`` but ``downstream_*.csv``,
    shipped with the package)."""
    frames = _reference_frames(downstream=False)
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=KEYS)


def load_downstream_reference() -> pd.DataFrame:
    """Every published downstream figure (``results/reference/downstream_*.csv``:
    :data:`DOWNSTREAM_REFERENCE_COLUMNS`)."""
    frames = _reference_frames(downstream=True)
    return (pd.concat(frames, ignore_index=True) if frames
            else pd.DataFrame(columns=DOWNSTREAM_REFERENCE_COLUMNS))


def param_columns(rows: pd.DataFrame) -> list[str]:
    """The swept-parameter columns of ``rows`` (named ``member.option``; never with a space,
    which downstream columns and their summary columns hold)."""
    return [c for c in rows.columns if "." in c and c.split(".")[0] and " " not in c]


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


#: What :func:`paired_delta` gives where nothing is paired.
NO_DELTA = {"delta": math.nan, "delta_lo": math.nan, "delta_hi": math.nan, "pairs": 0,
            "significant": None, "se": math.nan, "p": math.nan}


def paired_delta(method_rows: pd.DataFrame, base_rows: pd.DataFrame,
                 column: str = "top1") -> dict:
    """Mean difference method − baseline of ``column`` (top-1 by default) over the seeds both
    have a value for, with its 95% t-interval, its standard error ``se`` and the two-sided
    p-value ``p`` of the paired t-test.

    ``significant`` is None with fewer than two shared seeds (no interval, no p-value)."""
    a = pd.to_numeric(method_rows[column], errors="coerce").groupby(method_rows["seed"]).mean()
    b = pd.to_numeric(base_rows[column], errors="coerce").groupby(base_rows["seed"]).mean()
    d = (a - b).dropna()
    n = len(d)
    if n == 0:
        return dict(NO_DELTA)
    mean = float(d.mean())
    if n < 2:
        return {"delta": mean, "delta_lo": math.nan, "delta_hi": math.nan, "pairs": 1,
                "significant": None, "se": math.nan, "p": math.nan}
    se = float(d.std(ddof=1) / math.sqrt(n))
    lo, hi = t_interval(mean, se, n, CONFIDENCE)
    return {"delta": mean, "delta_lo": lo, "delta_hi": hi, "pairs": n,
            "significant": not (lo <= 0 <= hi), "se": se, "p": paired_p(mean, se, n)}


def t_interval(mean: float, se: float, n: int, level: float) -> tuple[float, float]:
    """The two-sided t-interval at ``level`` around ``mean`` with standard error ``se`` over
    ``n`` paired differences."""
    from scipy.special import stdtrit  # Student's t quantile; scipy.stats is 3x slower to import

    half = float(stdtrit(n - 1, 0.5 + level / 2) * se)
    return mean - half, mean + half


def paired_p(mean: float, se: float, n: int) -> float:
    """Two-sided p-value of the paired t-test of ``n`` differences with mean ``mean`` and
    standard error ``se`` (0 where they are all equal and not zero, 1 where all are zero)."""
    from scipy.special import stdtr  # Student's t distribution function

    if se == 0:
        return 1.0 if mean == 0 else 0.0
    return float(2 * stdtr(n - 1, -abs(mean / se)))


def correct_deltas(table: pd.DataFrame, correction: str) -> pd.DataFrame:
    """``table`` (with ``delta``, ``se``, ``pairs``, ``p``) with the changes against the
    baseline corrected as one family: ``p_adj`` the adjusted p-value, ``ci_level`` the level
    of the interval ``delta_lo``..``delta_hi`` (set by
    :func:`~kt_bench.reporting.corrections.interval_alphas`), ``significant`` whether it
    excludes zero, and ``correction`` naming the correction."""
    check_correction(correction)
    table = table.copy()
    p = [float(x) for x in table["p"]]
    alphas = interval_alphas(p, correction, 1 - CONFIDENCE)
    table["p_adj"] = adjusted_p(p, correction)
    table["ci_level"] = [CONFIDENCE if correction == "none" and not math.isnan(a) else 1 - a
                         for a in alphas]
    for i, level in zip(table.index, table["ci_level"], strict=True):
        if math.isnan(level):
            continue
        lo, hi = t_interval(table.at[i, "delta"], table.at[i, "se"], int(table.at[i, "pairs"]),
                            level)
        table.at[i, "delta_lo"], table.at[i, "delta_hi"] = lo, hi
        table.at[i, "significant"] = not (lo <= 0 <= hi)
    table["correction"] = correction
    return table


def family_size(summary: pd.DataFrame) -> int:
    """How many changes against the baseline ``summary`` corrects together (those with a
    p-value)."""
    return int(summary["p"].notna().sum()) if "p" in summary else 0


def correction_note(summary: pd.DataFrame) -> str:
    """One paragraph saying how the table's marks and intervals against ``student`` were
    corrected, for under the table."""
    m = family_size(summary)
    correction = summary["correction"].iloc[0] if "correction" in summary and m else "none"
    alpha = f"{1 - CONFIDENCE:.2f}"
    if m == 0:
        return (f"No change against `{BASELINE}` has two or more shared seeds: no intervals "
                "and no significance marks.")
    family = (f"The {m} changes against `{BASELINE}` in this table (every method and pair "
              "with two or more shared seeds; paired t-tests over seeds) are one family")
    if correction == "none":
        return (f"{family}, left uncorrected (`--correct none`): each interval is the "
                f"{CONFIDENCE:.0%} t-interval, and † marks one that spans zero (p > {alpha}).")
    if correction == "holm":
        return (f"{family}, corrected by Holm's step-down method for a family-wise error "
                f"rate of {alpha}: † marks a change whose Holm-adjusted p is above {alpha}. "
                "Each interval is the t-interval at the level Holm's procedure tested that "
                "change at (α/(m−i+1) for the i-th smallest p), so it excludes zero exactly "
                "when the change is significant; the intervals are not simultaneous.")
    return (f"{family}, corrected by the Benjamini–Hochberg method for a false discovery "
            f"rate of {alpha}: † marks a change whose BH-adjusted p is above {alpha}. The "
            "intervals are false-coverage-rate adjusted (Benjamini & Yekutieli 2005): each "
            "at level 1 − R·α/m, R of the m changes being significant.")


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


def _delta(good: pd.DataFrame, base: pd.DataFrame, method: str, column: str = "top1") -> dict:
    """:func:`paired_delta` of ``column`` for a method's ok rows ``good`` against the
    baseline rows ``base``; :data:`NO_DELTA` for the baseline itself or without rows."""
    if method == BASELINE or base.empty or good.empty:
        return dict(NO_DELTA)
    return paired_delta(good, base, column)


def _unit_dataset(rows: pd.DataFrame, group: pd.DataFrame, unit: str) -> str | None:
    """The label of the dataset downstream unit ``unit`` evaluated ``group``'s cells on (or,
    where they have none, every cell of ``rows``), if it is one; else None."""
    column = dataset_column(unit)
    if column not in rows:
        return None
    for frame in (group, rows):
        labels = frame[column].dropna().unique()
        if len(labels):
            return str(labels[0]) if len(labels) == 1 else None
    return None


def _downstream_summary(column: str, rows: pd.DataFrame, group: pd.DataFrame,
                        good: pd.DataFrame, base: pd.DataFrame, key: tuple,
                        reference: pd.DataFrame | None) -> dict:
    """The summary fields of downstream column ``column`` (``<unit> <metric>``) for one
    configuration: the mean over its ok cells, how many have a value, the paired change
    against the baseline (unadjusted; fields ``<column> delta``, ``<column> delta_lo``, ...)
    and the published figures of the method and of the teacher."""
    unit, metric = split_column(column)
    values = pd.to_numeric(good[column], errors="coerce")
    fields = {column: values.mean(), f"{column} seeds": good.loc[values.notna(), "seed"].nunique()}
    fields.update({f"{column} {k}": v for k, v in _delta(good, base, key[3], column).items()})
    published = None
    if reference is not None and not reference.empty:
        published = reference[(reference["unit_dataset"] == _unit_dataset(rows, group, unit))
                              & (reference["metric"] == metric)]
    fields[f"{column} published"] = _published(published, key, "value")
    fields[f"{column} published teacher"] = _published(published, (*key[:3], TEACHER_METHOD),
                                                       "value")
    return fields


def summarise(rows: pd.DataFrame, reference: pd.DataFrame | None = None,
              correct: str = DEFAULT_CORRECTION,
              downstream_reference: pd.DataFrame | None = None) -> pd.DataFrame:
    """One tidy line per configuration (dataset, teacher, student, method and everything
    else a cell runs with but its seed): distinct seeds, mean and std of top-1 (last epoch),
    mean top-1 (best epoch), mean top-5, the paired change against the ``student`` baseline
    of the same setting with its interval and p-value (corrected by ``correct`` over every
    change of the table: :func:`correct_deltas`), teacher top-1, cost, the diagnostics the
    rows carry (:data:`DIAGNOSTIC_COLUMNS`, mean over seeds), and the published figures.
    Rows of different configurations are never pooled; ``config`` names what differs where a
    method has several.

    Each downstream column of ``rows`` (``<unit> <metric>``,
    :func:`~kt_bench.reporting.downstream.downstream_columns`) adds its mean over seeds and
    its paired change against ``student``, computed as top-1's but not corrected (the
    correction's family is top-1's changes), and the figures ``downstream_reference``
    (:func:`load_downstream_reference`) publishes for the method and the teacher."""
    check_correction(correct)
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
        if "own_s" in rows:  # each student's own training time, where known for every seed
            line["own_s"] = pd.to_numeric(good["own_s"], errors="coerce").mean(skipna=False)
        for column in DIAGNOSTIC_COLUMNS:
            if column in rows:
                line[column] = pd.to_numeric(good[column], errors="coerce").mean()
        line.update(_delta(good, base, key[3]))
        line["published_top1"] = _published(reference, key[:4], "top1")
        line["published_top1_best"] = _published(reference, key[:4], "top1_best")
        line["published_teacher_top1"] = _published(reference, key[:4], "teacher_top1")
        for column in metric_columns(rows.columns):
            line.update(_downstream_summary(column, rows, group, good, base, key[:4],
                                            downstream_reference))
        out.append(line)
    table = pd.DataFrame(out)
    if table.empty:
        return table
    table = correct_deltas(table, correct)
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


def format_downstream(line: pd.Series, column: str) -> str:
    """Downstream column ``column`` of a summary line: ``71.60 (Δ +1.20 [+0.40, +2.00])``,
    the mean over seeds and the change against ``student`` with its unadjusted interval
    (``71.60 (Δ +1.20)`` with one shared seed, ``71.60`` for the baseline, ``-`` without a
    value), then ``; paper 71.60`` where a figure was published."""
    mean, delta = line[column], line[f"{column} delta"]
    text = _num(mean)
    if text != "-" and not math.isnan(delta):
        lo, hi = line[f"{column} delta_lo"], line[f"{column} delta_hi"]
        interval = "" if math.isnan(lo) else f" [{lo:+.2f}, {hi:+.2f}]"
        text += f" (Δ {delta:+.2f}{interval})"
    published = _published_text(line[f"{column} published"])
    return f"{text}; paper {published}" if published else text


def downstream_heading(column: str) -> str:
    """The display heading of downstream column ``column``: its intervals are unadjusted."""
    return f"{column} (Δ vs student, {CONFIDENCE:.0%} CI unadjusted)"


def _downstream_display(summary: pd.DataFrame) -> dict[str, pd.Series]:
    """The display columns of ``summary``'s downstream columns, each followed by its
    teacher's published figure where one was published."""
    out: dict[str, pd.Series] = {}
    for column in metric_columns(summary.columns):
        out[downstream_heading(column)] = summary.apply(
            lambda line, c=column: format_downstream(line, c), axis=1)
        out[f"published teacher {column}"] = summary[f"{column} published teacher"].map(
            _published_text)
    return out


def _p_text(p: float) -> str:
    if p is None or math.isnan(p):
        return "-"
    return "<0.001" if p < 0.001 else f"{p:.3f}"


def interval_name(summary: pd.DataFrame) -> str:
    """What the intervals of ``summary`` are, for a column heading (``95% CI``,
    ``Holm CI``, ``BH-FCR CI``)."""
    correction = summary["correction"].iloc[0] if "correction" in summary else "none"
    return {"none": f"{CONFIDENCE:.0%} CI", "holm": "Holm CI", "bh": "BH-FCR CI"}[correction]


def _p_heading(summary: pd.DataFrame) -> str:
    correction = summary["correction"].iloc[0] if "correction" in summary else "none"
    return {"none": "p", "holm": "p (Holm)", "bh": "p (BH)"}[correction]


def display_table(summary: pd.DataFrame) -> pd.DataFrame:
    """The console/Markdown long table: one line per summary line, formatted, with one column
    per downstream metric (:func:`format_downstream`); empty columns (no published numbers,
    no failures, no sweeps, no diagnostics) left out."""
    params = param_columns(summary)
    downstream = _downstream_display(summary)
    diagnostics = {heading: summary[column].map(lambda v, f=fmt: _num(v, f))
                   for column, (heading, fmt) in DIAGNOSTIC_COLUMNS.items()
                   if column in summary and summary[column].notna().any()}
    p_adj = summary["p_adj"] if "p_adj" in summary else pd.Series(math.nan, summary.index)
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
        f"Δ top1 vs student ({interval_name(summary)})": summary.apply(format_delta, axis=1),
        _p_heading(summary): p_adj.map(_p_text),
        **diagnostics,
        "teacher top1": summary["teacher_top1"].map(_num),
        "published top1": _published_column(summary),
        "published teacher top1": summary["published_teacher_top1"].map(_published_text),
        **downstream,
        "wall s": summary["wall_s"].map(lambda v: _num(v, ".1f")),
        "not ok": summary["not_ok"],
    })
    optional = ["config", "published top1", "published teacher top1", "not ok",
                *(c for c in downstream if c.startswith("published teacher "))]
    for col in optional:
        if not (out[col] != "").any():
            out = out.drop(columns=col)
    return out


def comparison_table(rows: pd.DataFrame, fmt: str = "github",
                     reference: pd.DataFrame | None = None,
                     correct: str = DEFAULT_CORRECTION,
                     downstream_reference: pd.DataFrame | None = None) -> str:
    """The comparison table of ``rows`` as text (a tabulate format, Markdown by default),
    its changes against ``student`` corrected by ``correct``, with the note saying how.
    ``reference`` and ``downstream_reference`` default to the published figures shipped with
    the package."""
    if downstream_reference is None and metric_columns(rows.columns):
        downstream_reference = load_downstream_reference()
    summary = summarise(rows, load_reference() if reference is None else reference, correct,
                        downstream_reference)
    if summary.empty:
        return "(no results)"
    table = tabulate(display_table(summary), headers="keys", tablefmt=fmt, showindex=False,
                     disable_numparse=True)
    return f"{table}\n\n{correction_note(summary)}"


def problem_label(summary: pd.DataFrame) -> pd.Series:
    """Each line's dataset and pair, as tables head their columns
    (``cifar100: resnet32x4 → resnet8x4``)."""
    return summary["dataset"] + ": " + summary["teacher"] + " → " + summary["student"]


def row_label(line: pd.Series, params: list[str]) -> str:
    """A summary line's name in tables and figures: its method, with its swept values and
    what sets its configuration apart in brackets (``kd [kd.T=4]``)."""
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
        _col=problem_label(summary),
        _row=summary.apply(lambda r: row_label(r, params), axis=1))
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


#: What each character a table may hold becomes in LaTeX.
_LATEX = str.maketrans({"\\": r"\textbackslash{}", "{": r"\{", "}": r"\}", "$": r"\$",
                        "&": r"\&", "%": r"\%", "#": r"\#", "_": r"\_", "^": r"\^{}",
                        "~": r"\textasciitilde{}", "±": r"$\pm$", "→": r"$\to$",
                        "†": r"$^\dagger$", "Δ": r"$\Delta$", "α": r"$\alpha$",
                        "−": "$-$", "–": "--", "·": r"$\cdot$", "`": "", ">": "$>$",
                        "<": "$<$"})


def latex_escape(text: str) -> str:
    """``text`` with every character LaTeX treats specially written as itself."""
    return str(text).translate(_LATEX)


def markdown_pivot(summary: pd.DataFrame) -> str:
    """The pivot as a Markdown table."""
    table = pivot(summary)
    return tabulate(table, headers="keys", tablefmt="github", disable_numparse=True)


#: What the pivot's cells hold, said under it.
PIVOT_CAPTION = ("Top-1 accuracy (%) at the last epoch, mean ± std over seeds; in brackets "
                 "the change against `student`, paired by seed; the best mean of each column "
                 "in bold.")


def latex_pivot(summary: pd.DataFrame) -> str:
    """The pivot as a LaTeX booktabs ``tabular`` (``\\toprule``, ``\\midrule``,
    ``\\bottomrule``; needs ``\\usepackage{booktabs}``), names escaped, the best mean of
    each column in bold, and under it what the cells hold and how the changes against
    ``student`` were corrected."""
    table = pivot(summary, bold=lambda s: f"\x00{s}\x01")  # marked, escaped, then bolded

    def cell(text: str) -> str:
        return latex_escape(text).replace("\x00", r"\textbf{").replace("\x01", "}")

    head = " & ".join(["Method", *map(latex_escape, table.columns)]) + r" \\"
    lines = [r"\begin{tabular}{l" + "r" * len(table.columns) + "}", r"\toprule", head,
             r"\midrule"]
    for label, values in table.iterrows():
        if label == "(teacher)":
            lines.append(r"\midrule")
        lines.append(" & ".join([latex_escape(label), *map(cell, values)]) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}", "",
              r"\par\smallskip{\footnotesize " + latex_escape(PIVOT_CAPTION) + " "
              + latex_escape(correction_note(summary)) + r"\par}"]
    return "\n".join(lines)


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
