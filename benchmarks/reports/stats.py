"""Paired statistics: every method is scored on the same images, so compare them image by
image. One implementation for the leaderboard (each method against ``random`` and against
the best method) and the regression gate.

The test of one pair of methods on the images both scored (``paired_test``):

- the paired difference d_i = a_i - b_i, signed so that d > 0 means ``a`` is better;
  differences within float tolerance of 0 (``TOLERANCE`` x the values' scale) count as 0,
  so maps that are equal up to rounding (Grad-CAM, HiResCAM and XGrad-CAM on a GAP head)
  are ties, not a ranking by float noise;
- Wilcoxon signed-rank (``scipy.stats.wilcoxon``: exact below 50 pairs, else the normal
  approximation) when the nonzero |d| hold no ties and no d is 0: its assumptions hold
  and it is the test Demsar (2006) prescribes for two methods;
- a sign-flip permutation test of the mean difference (as ``scipy.stats.permutation_test``
  with paired samples computes it, vectorized: exact up to 2^16 sign patterns, else
  20 000 seeded draws) when d has zeros or tied
  magnitudes (a 0/1 hit metric such as the pointing game, a shared saturated score),
  where Wilcoxon's ranks and its zero handling would decide the answer;
- no test below ``MIN_PAIRS`` = 6 pairs: no two-sided test can reach p < 0.05 with 5 (the
  smallest exact p is 2/32); the result says "too few images" instead.

The effect is the median paired difference with its 95% percentile-bootstrap CI (seeded, so
deterministic). P-values of one table (a (dataset, model, metric family)) are adjusted
together by Holm's step-down method (``statsmodels.stats.multitest.multipletests``).

>>> a = np.array([0.9, 0.8, 0.85, 0.7, 0.95, 0.9, 0.88, 0.91])
>>> r = paired_test(a, a - np.linspace(0.05, 0.12, 8), seed=0)
>>> r.test, round(r.p, 4), round(r.median, 3)
('wilcoxon', 0.0078, 0.085)
>>> paired_test(a, a - 0.1, seed=0).test  # one shift for all: tied magnitudes
'sign-flip permutation'
>>> paired_test(a, a, seed=0).test
'identical'
>>> paired_test(a[:5], a[:5] - 0.1, seed=0).decided
False
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
from scipy import stats

MIN_PAIRS = 6  # the fewest pairs a two-sided test at 0.05 can decide
ALPHA = 0.05
POWER = 0.8
TOLERANCE = 1e-9  # relative: differences below this x the values' scale are ties
BOOTSTRAP = 2000
EXACT_PATTERNS = 2**16  # sign-flip test enumerates every pattern up to 16 pairs


@dataclass(frozen=True)
class Paired:
    """One paired comparison: n pairs, the test used, its two-sided p (None when no test
    could decide: too few pairs), and the median paired difference with its 95% CI."""

    n: int
    test: str  # wilcoxon, sign-flip permutation, identical, too few images
    p: float | None
    mean: float  # the mean paired difference: its sign is the direction of a decided test
    median: float
    ci_low: float
    ci_high: float

    @property
    def decided(self) -> bool:
        return self.p is not None

    def record(self, prefix: str) -> dict[str, object]:
        return {f"{prefix}_{k}": v for k, v in asdict(self).items()}


def differences(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a - b, with differences within float tolerance of 0 set to 0."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    d = a - b
    scale = max(1.0, float(np.max(np.abs(np.concatenate([a, b])))) if len(a) else 1.0)
    d[np.abs(d) <= TOLERANCE * scale] = 0.0
    return d


def paired_test(a: np.ndarray, b: np.ndarray, *, seed: int, ci: bool = True) -> Paired:
    """Compare paired scores ``a`` and ``b`` (same images, same order; higher = better:
    negate both for a lower-is-better metric). See the module docstring for the rules.
    ``ci=False`` skips the bootstrap interval of the median (the interval is the median)."""
    d = differences(a, b)
    n = len(d)
    if ci:
        median, lo, hi = median_ci(d, seed=seed)
    else:
        median = lo = hi = float(np.median(d)) if n else 0.0
    mean = float(d.mean()) if n else 0.0
    if n < MIN_PAIRS:
        return Paired(n, "too few images", None, mean, median, lo, hi)
    if not d.any():
        return Paired(n, "identical", 1.0, 0.0, 0.0, 0.0, 0.0)
    nonzero = np.abs(d[d != 0])
    if (d == 0).any() or len(np.unique(nonzero)) < len(nonzero):
        return Paired(n, "sign-flip permutation", _sign_flip(d, seed), mean, median, lo, hi)
    p = float(stats.wilcoxon(d, alternative="two-sided").pvalue)
    return Paired(n, "wilcoxon", p, mean, median, lo, hi)


def _sign_flip(d: np.ndarray, seed: int) -> float:
    """Two-sided p of the sign-flip permutation test of mean(d) = 0: the share of sign
    patterns whose |mean| reaches the observed one, over all 2^n patterns up to 16 pairs,
    else over 20 000 seeded random patterns with the observed one counted in (Phipson and
    Smyth 2010). The same test as ``scipy.stats.permutation_test`` with
    ``permutation_type="samples"`` (the tests check it against scipy and against a
    brute-force count), vectorized: scipy builds the patterns one by one, 0.5 s a call at
    16 pairs, which made the leaderboard of one medical run take a minute."""
    n = len(d)
    observed = abs(d.mean()) * (1 - 1e-12)  # patterns equal to the observed one count
    if 2**n <= EXACT_PATTERNS:
        bits = (np.arange(2**n)[:, None] >> np.arange(n)[None, :]) & 1
        means = np.abs((1 - 2 * bits) @ d) / n
        return float(np.mean(means >= observed))
    signs = np.random.default_rng(seed).choice([-1.0, 1.0], size=(20_000, n))
    hits = int(np.sum(np.abs(signs @ d) / n >= observed))
    return float(min(1.0, (hits + 1) / (20_000 + 1)))


def median_ci(d: np.ndarray, *, seed: int, level: float = 0.95) -> tuple[float, float, float]:
    """The median of ``d`` and its percentile-bootstrap CI ((median, median) for n < 2)."""
    d = np.asarray(d, dtype=np.float64)
    if len(d) == 0:
        return 0.0, 0.0, 0.0
    median = float(np.median(d))
    if len(d) < 2 or not d.any():
        return median, median, median
    rng = np.random.default_rng(seed)
    draws = np.median(d[rng.integers(0, len(d), size=(BOOTSTRAP, len(d)))], axis=1)
    tail = (1 - level) / 2 * 100
    lo, hi = np.percentile(draws, [tail, 100 - tail])
    return median, float(lo), float(hi)


def holm(pvalues: list[float | None]) -> list[float | None]:
    """Holm-adjusted p-values of a family of tests (None stays None: no test)."""
    from statsmodels.stats.multitest import multipletests

    index = [i for i, p in enumerate(pvalues) if p is not None]
    out: list[float | None] = [None] * len(pvalues)
    if index:
        adjusted = multipletests([pvalues[i] for i in index], alpha=ALPHA, method="holm")[1]
        for i, p in zip(index, adjusted, strict=True):
            out[i] = float(p)
    return out


def detectable_effect(n: int, *, alpha: float = ALPHA, power: float = POWER) -> float | None:
    """The smallest standardized paired effect (Cohen's d_z: mean difference / SD of the
    differences) a two-sided paired test on ``n`` pairs detects with ``power`` at level
    ``alpha`` (the paired t-test's; Wilcoxon's efficiency is at least 0.864 of it, about
    0.955 for normal differences). None below ``MIN_PAIRS``."""
    if n < MIN_PAIRS:
        return None
    from statsmodels.stats.power import TTestPower

    effect = TTestPower().solve_power(nobs=n, alpha=alpha, power=power, alternative="two-sided")
    return float(effect) if effect is not None and math.isfinite(effect) else None


COMPARISON_COLUMNS = [
    "family",
    "vs_random",
    "n_random",
    "test_random",
    "p_random",
    "p_random_adj",
    "effect_random",
    "effect_random_low",
    "effect_random_high",
    "best",
    "n_best",
    "p_best_adj",
    "best_group",
    "rank",
]
KEYS = ["dataset", "model", "method", "metric"]


def compare_methods(
    rows,
    directions: dict[str, bool],
    families: dict[str, str],
    randoms: set[str],
    *,
    seed: int = 0,
):
    """Per (dataset, model, metric, method) of the primary values in ``rows``: the paired
    comparison against the reference ``random`` method (``vs_random``: better, not
    distinguishable, worse, too few images, reference), against the best method (whether
    it is in the best group: the best and every method not distinguishable from it), and
    its rank: 1 for the best group (Demsar's significance groups), else 1 + the number of
    methods with a better mean (means equal within float tolerance tie). P-values are
    Holm-adjusted within each (dataset, model, metric family). The best is chosen on the
    images every method scored (on each method's own images when fewer than ``MIN_PAIRS``
    are common).

    Columns (``COMPARISON_COLUMNS``): ``n_random``, ``test_random``, ``p_random`` and
    ``p_random_adj`` (Holm) of the test against random; ``effect_random`` with
    ``effect_random_low``/``_high``: the median paired advantage over random in the
    metric's good direction (> 0: better) and its 95% CI; ``best``, the best method's
    label; ``n_best`` and ``p_best_adj`` of the test against it; ``best_group``; ``rank``."""
    import pandas as pd

    primary = rows[rows["output"] == "value"]
    records = []
    for (dataset, model, metric), grp in primary.groupby(["dataset", "model", "metric"], sort=True):
        sign = 1.0 if directions.get(metric, True) else -1.0
        wide = grp.pivot_table(index="sample_id", columns="method", values="value", aggfunc="first")
        records += _compare_table(dataset, model, metric, sign * wide, randoms, seed)
    private = ["x_p_random", "x_p_best", "x_mean_random"]
    table = pd.DataFrame(records, columns=[*KEYS, *COMPARISON_COLUMNS, *private])
    if not len(table):
        return table.drop(columns=private)
    table["family"] = table["metric"].map(lambda m: families.get(m, "other"))
    for _, idx in table.groupby(["dataset", "model", "family"]).groups.items():
        p = [*table.loc[idx, "x_p_random"], *table.loc[idx, "x_p_best"]]
        adjusted = holm([None if _missing(v) else float(v) for v in p])
        k = len(idx)
        table.loc[idx, "p_random_adj"] = _column(adjusted[:k])
        table.loc[idx, "p_best_adj"] = _column(adjusted[k:])
    table["vs_random"] = [_mark(r) for r in table.itertuples()]
    table["best_group"] = [
        bool(r.best)
        and (r.method == r.best or (not _missing(r.p_best_adj) and r.p_best_adj >= ALPHA))
        for r in table.itertuples()
    ]
    table.loc[table["best_group"], "rank"] = 1  # not distinguishable from the best: its rank
    return table.drop(columns=private)


def _compare_table(dataset, model, metric, wide, randoms: set[str], seed: int) -> list[dict]:
    """The records of one (dataset, model, metric): ``wide`` is images x methods, signed so
    that higher is better. Only methods with at least ``MIN_PAIRS`` images are ranked and
    may be the best (a method scored on 2 images is not first on their mean); the others
    get rank 0 (unranked) and say "too few images"."""
    methods = list(wide.columns)
    ranked = [m for m in methods if wide[m].count() >= MIN_PAIRS]  # none: no best, no ranks
    common = wide[ranked].dropna()
    basis = common if len(common) >= MIN_PAIRS else wide
    means = {m: float((basis[m] if m in basis else wide[m]).dropna().mean()) for m in methods}
    scale = max([1.0, *(abs(v) for v in means.values())])
    best = max(ranked, key=lambda m: (means[m], -methods.index(m))) if ranked else ""
    # the reference: the method labelled "random" if it is one, else the first random one
    ref = "random" if "random" in methods and "random" in randoms else None
    ref = ref or next((m for m in methods if m in randoms), None)
    values = {m: wide[m].to_numpy(dtype=np.float64) for m in methods}  # pairs by numpy masks
    out = []
    for i, m in enumerate(methods):
        rank = 1 + sum(means[o] - means[m] > TOLERANCE * scale for o in ranked)
        rank = rank if m in ranked else 0
        vs_ref = _pair(values, m, ref, seed + i) if ref and m != ref else None
        # against the best only its adjusted p is reported: no interval to bootstrap
        vs_best = _pair(values, m, best, seed + 1000 + i, ci=False) if best and m != best else None
        out.append(
            dict(
                dataset=dataset,
                model=model,
                method=m,
                metric=metric,
                family="",
                vs_random="reference" if m == ref else "",
                n_random=vs_ref.n if vs_ref else 0,
                test_random=vs_ref.test if vs_ref else "",
                p_random=vs_ref.p if vs_ref else None,
                p_random_adj=None,
                effect_random=vs_ref.median if vs_ref else None,
                effect_random_low=vs_ref.ci_low if vs_ref else None,
                effect_random_high=vs_ref.ci_high if vs_ref else None,
                best=best,
                n_best=vs_best.n if vs_best else 0,
                p_best_adj=None,
                best_group=False,
                rank=rank,
                x_p_random=vs_ref.p if vs_ref else None,
                x_mean_random=vs_ref.mean if vs_ref else 0.0,
                x_p_best=vs_best.p if vs_best else None,
            )
        )
    return out


def _pair(values: dict[str, np.ndarray], a: str, b: str, seed: int, ci: bool = True) -> Paired:
    """The paired test of methods ``a`` and ``b`` on the images both scored."""
    both = ~np.isnan(values[a]) & ~np.isnan(values[b])
    return paired_test(values[a][both], values[b][both], seed=seed, ci=ci)


def _mark(r) -> str:
    if r.vs_random == "reference" or not r.test_random:
        return r.vs_random
    if _missing(r.p_random_adj):
        return "too few images"
    if r.p_random_adj >= ALPHA:
        return "not distinguishable"
    return "better" if r.x_mean_random > 0 else "worse"


def _missing(v) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def _column(values: list[float | None]) -> list[float]:
    return [float("nan") if v is None else v for v in values]
