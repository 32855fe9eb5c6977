"""Methods ranked across problems (Demšar, 2006): on each problem (a dataset and pair) the
methods are ranked by mean top-1, best first, ties sharing the mean of their ranks; methods
are compared by their mean rank, with the Friedman test (Iman–Davenport's F form) and the
Nemenyi critical difference ``CD = q_α·sqrt(k(k+1)/(6N))`` for k methods on N problems:
two methods whose mean ranks differ by less than CD are not significantly different."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import pandas as pd

from kt_bench.core.errors import KtBenchError
from kt_bench.reporting.report import param_columns, problem_label, row_label

#: The significance level of the critical difference.
ALPHA = 0.05


def rank_matrix(scores: pd.DataFrame) -> pd.DataFrame:
    """``scores`` (problems × methods, higher is better) as ranks within each problem: 1 for
    the best, tied methods sharing the mean of the ranks they span."""
    return scores.rank(axis=1, ascending=False, method="average")


def mean_ranks(scores: pd.DataFrame) -> pd.Series:
    """Each method's rank averaged over the problems, best (lowest) first."""
    return rank_matrix(scores).mean(axis=0).sort_values(kind="stable")


def nemenyi_q(k: int, alpha: float = ALPHA) -> float:
    """The Nemenyi test's critical value q_α for ``k`` methods: the studentized range
    quantile (infinite degrees of freedom) divided by √2 (2.343 for k = 3 at α = 0.05)."""
    if k < 2:
        raise KtBenchError(f"a critical difference needs two or more methods, got {k}")
    from scipy.stats import studentized_range  # slow to import: only where ranks are drawn

    return float(studentized_range.ppf(1 - alpha, k, math.inf) / math.sqrt(2))


def critical_difference(k: int, n: int, alpha: float = ALPHA) -> float:
    """Nemenyi's critical difference of mean ranks for ``k`` methods on ``n`` problems."""
    if n < 1:
        raise KtBenchError(f"a critical difference needs one or more problems, got {n}")
    return nemenyi_q(k, alpha) * math.sqrt(k * (k + 1) / (6 * n))


def friedman(scores: pd.DataFrame) -> tuple[float, float, float]:
    """The Friedman statistic χ²_F, Iman–Davenport's F_F = (N−1)χ²_F / (N(k−1) − χ²_F) and
    F_F's p-value (F distribution with k−1 and (k−1)(N−1) degrees of freedom) for
    ``scores`` (N problems × k methods); the p-value is 0 where every problem ranks the
    methods alike."""
    from scipy.special import fdtrc  # the F distribution's upper tail

    n, k = scores.shape
    ranks = mean_ranks(scores)
    chi2 = 12 * n / (k * (k + 1)) * (float((ranks ** 2).sum()) - k * (k + 1) ** 2 / 4)
    denominator = n * (k - 1) - chi2
    if denominator <= 1e-12 * max(1.0, n * (k - 1)):
        return chi2, math.inf, 0.0
    f = (n - 1) * chi2 / denominator
    return chi2, f, float(fdtrc(k - 1, (k - 1) * (n - 1), f))


def cliques(ranks: pd.Series, cd: float) -> list[list[str]]:
    """The groups of methods whose mean ranks all lie within less than ``cd`` of each other,
    each group maximal (not inside another) and of two or more methods, best first; the bars
    of a critical-difference diagram."""
    names, values = list(ranks.index), list(ranks.values)
    groups: list[list[str]] = []
    last_end = -1
    for start in range(len(names)):
        end = start
        while end + 1 < len(names) and values[end + 1] - values[start] < cd:
            end += 1
        if end > start and end > last_end:
            groups.append(names[start:end + 1])
            last_end = end
    return groups


@dataclass
class Ranking:
    """Methods ranked across problems, with what a critical-difference diagram draws."""

    #: Problems × methods, the mean top-1 of each.
    scores: pd.DataFrame
    #: Each method's mean rank, best first.
    ranks: pd.Series
    cd: float
    q: float
    friedman_chi2: float
    friedman_f: float
    friedman_p: float
    groups: list[list[str]]
    #: Methods not run (or without a result) on every problem, left out of the ranking.
    left_out: list[str] = field(default_factory=list)

    @property
    def problems(self) -> int:
        """How many problems the methods were ranked on."""
        return len(self.scores)


def rank_methods(scores: pd.DataFrame, alpha: float = ALPHA) -> Ranking | None:
    """Rank the methods (columns) of ``scores`` (problems × methods, mean top-1; NaN where a
    method has no result on a problem) on the problems every ranked method has a result on;
    methods missing from a problem are left out. None with fewer than two problems or two
    methods left."""
    complete = scores.dropna(axis=1, how="any")
    left_out = [m for m in scores.columns if m not in complete.columns]
    n, k = complete.shape
    if n < 2 or k < 2:
        return None
    ranks = mean_ranks(complete)
    q = nemenyi_q(k, alpha)
    cd = q * math.sqrt(k * (k + 1) / (6 * n))
    chi2, f, p = friedman(complete)
    return Ranking(complete, ranks, cd, q, chi2, f, p, cliques(ranks, cd), left_out)


def problem_scores(summary: pd.DataFrame) -> pd.DataFrame:
    """The mean top-1 of each summary line as problems (dataset: pair) × methods (a method's
    name with its swept values and configuration, as the tables name it)."""
    params = param_columns(summary)
    labelled = pd.DataFrame({
        "problem": problem_label(summary),
        "method": summary.apply(lambda r: row_label(r, params), axis=1),
        "top1": summary["top1"].astype(float)})
    table = labelled.groupby(["problem", "method"], sort=False)["top1"].mean().unstack()
    return table.reindex(index=list(dict.fromkeys(labelled["problem"])),
                         columns=list(dict.fromkeys(labelled["method"])))


def p_text(p: float) -> str:
    """A p-value as a report prints it: ``p = 0.0123``, or ``p < 0.001`` below that (where an
    exact figure, down to 0 for a perfectly consistent ranking, would claim too much)."""
    return "p < 0.001" if p < 0.001 else f"p = {p:.3g}"
