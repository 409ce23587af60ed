"""Small statistics for the report: t quantiles, confidence intervals and loss smoothing."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

# Two-sided 95% quantiles t(0.975, df) of Student's t distribution for df = 1 ... 30, to five
# significant digits (values from scipy.stats.t.ppf, checked in tests/test_report.py).
_T_975 = (
    12.706,
    4.3027,
    3.1824,
    2.7764,
    2.5706,
    2.4469,
    2.3646,
    2.3060,
    2.2622,
    2.2281,
    2.2010,
    2.1788,
    2.1604,
    2.1448,
    2.1314,
    2.1199,
    2.1098,
    2.1009,
    2.0930,
    2.0860,
    2.0796,
    2.0739,
    2.0687,
    2.0639,
    2.0595,
    2.0555,
    2.0518,
    2.0484,
    2.0452,
    2.0423,
)
_Z_975 = 1.959963984540054


def t_quantile_975(df: int) -> float:
    """Return the 0.975 quantile of Student's t distribution with ``df`` degrees of freedom.

    df <= 30 reads a table. Larger df use the Cornish-Fisher expansion of t around the normal
    quantile to the 1/df^4 term, which is within 1e-7 of the exact value for df > 30.
    """
    if df < 1:
        raise ValueError(f"invalid degrees of freedom {df}: must be >= 1")
    if df <= len(_T_975):
        return _T_975[df - 1]
    z = _Z_975
    terms = (
        (z**3 + z) / 4,
        (5 * z**5 + 16 * z**3 + 3 * z) / 96,
        (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / 384,
        (79 * z**9 + 776 * z**7 + 1482 * z**5 - 1920 * z**3 - 945 * z) / 92160,
    )
    return z + sum(term / df ** (power + 1) for power, term in enumerate(terms))


@dataclass(frozen=True)
class MeanCI:
    """Mean of a sample with the half-width of its 95% t-interval (NaN with fewer than 2)."""

    mean: float
    half_width: float
    count: int

    @property
    def low(self) -> float:
        return self.mean - self.half_width

    @property
    def high(self) -> float:
        return self.mean + self.half_width


def mean_ci(values: np.ndarray | list[float]) -> MeanCI:
    """Return the mean and 95% t-interval half-width of the finite entries of ``values``."""
    array = np.asarray(values, dtype=float)
    finite = array[np.isfinite(array)]
    count = int(finite.size)
    if count == 0:
        return MeanCI(math.nan, math.nan, 0)
    mean = float(finite.mean())
    if count == 1:
        return MeanCI(mean, math.nan, 1)
    half_width = t_quantile_975(count - 1) * float(finite.std(ddof=1)) / math.sqrt(count)
    return MeanCI(mean, half_width, count)


def mean_ci_columns(matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return the mean, 95% t-interval half-width and count of finite entries per column.

    ``matrix`` has one row per seed. A column with one finite entry gets a NaN half-width, and a
    column with none gets a NaN mean.
    """
    finite = np.isfinite(matrix)
    count = finite.sum(axis=0)
    values = np.where(finite, matrix, 0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = values.sum(axis=0) / count
        squares = np.where(finite, (matrix - mean) ** 2, 0.0).sum(axis=0)
        std = np.sqrt(squares / (count - 1))
    quantiles = np.array([t_quantile_975(int(n) - 1) if n >= 2 else math.nan for n in count])
    half_width = quantiles * std / np.sqrt(np.maximum(count, 1))
    mean = np.where(count > 0, mean, math.nan)
    return mean, half_width, count


def moving_average(values: np.ndarray, window: int) -> np.ndarray:
    """Return the trailing moving average of ``values`` over ``window`` entries.

    The first ``window - 1`` entries average the entries so far. An output entry is NaN when
    any entry in its window is not finite (NaN or an infinity), so a smoothed curve never
    hides a non-finite loss.
    """
    if window < 1:
        raise ValueError(f"invalid smoothing window {window}: must be >= 1")
    array = np.asarray(values, dtype=float)
    if array.size == 0:
        return array.copy()
    bad = ~np.isfinite(array)
    clean = np.where(bad, 0.0, array)
    sums = np.concatenate(([0.0], np.cumsum(clean)))
    bad_counts = np.concatenate(([0], np.cumsum(bad)))
    end = np.arange(1, array.size + 1)
    start = np.maximum(end - window, 0)
    averages = (sums[end] - sums[start]) / (end - start)
    return np.where(bad_counts[end] - bad_counts[start] > 0, math.nan, averages)
