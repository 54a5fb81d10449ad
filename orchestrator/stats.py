"""The statistics every held-out figure is reported with: a mean with its 95% interval, clustered by prompt,
and the change from the initial policy with a paired interval.

The n samples of one prompt are not independent (an easy prompt is right in all of them), so the unit is the
prompt: each prompt's mean over its samples, then a Student-t interval over prompts. The change pairs each
prompt's mean now with the same prompt's mean under the initial policy (the evaluation samples both with
the same seeds), which removes the prompts' own difficulty from its variance.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

Z95 = 1.959963984540054


T95_TABLE = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
             2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
             2.045, 2.042)
"""Student's t, 0.975 quantile, for 1..30 degrees of freedom (the standard table)."""


def t95(df: int) -> float:
    """The 0.975 quantile of Student's t with `df` degrees of freedom: the table up to 30, then the
    Cornish-Fisher expansion around the normal quantile (within 0.01% of the exact value there)."""
    if df < 1:
        return math.nan
    if df <= len(T95_TABLE):
        return T95_TABLE[df - 1]
    z = Z95
    return (z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)
            + (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / (384 * df**3))


def mean_ci(values: Sequence[float]) -> tuple[float, float]:
    """(mean, half-width of its 95% interval) of independent values; the half-width is NaN for fewer than 2."""
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        return math.nan, math.nan
    if x.size < 2:
        return float(x.mean()), math.nan
    return float(x.mean()), float(t95(x.size - 1) * x.std(ddof=1) / math.sqrt(x.size))


def by_prompt(values: Sequence[float], groups: Sequence[object]) -> list[float]:
    """The mean of `values` within each group (a prompt), in the order groups first appear."""
    sums: dict[object, list[float]] = {}
    for v, g in zip(values, groups, strict=True):
        sums.setdefault(g, []).append(float(v))
    return [float(np.mean(vs)) for vs in sums.values()]


def clustered(values: Sequence[float], groups: Sequence[object]) -> tuple[float, float]:
    """Mean and 95% half-width with the prompt as the unit (`groups`: each value's prompt)."""
    return mean_ci(by_prompt(values, groups))


def paired_change(now: Sequence[float], before: Sequence[float], groups: Sequence[object]) -> tuple[float, float]:
    """Mean change now - before and its 95% half-width, paired by prompt: `now[i]` and `before[i]` are the
    same prompt's sample i under two policies."""
    diff = np.asarray(now, dtype=np.float64) - np.asarray(before, dtype=np.float64)
    return clustered(diff.tolist(), groups)


def interval(mean: float, half: float, digits: int = 3) -> str:
    """`0.412 ± 0.061` (or the mean alone where no interval exists)."""
    if math.isnan(half):
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {half:.{digits}f}"


def signed_interval(mean: float, half: float, digits: int = 3) -> str:
    """`+0.221 [+0.160, +0.282]`: a change with its 95% interval."""
    if math.isnan(half):
        return f"{mean:+.{digits}f}"
    return f"{mean:+.{digits}f} [{mean - half:+.{digits}f}, {mean + half:+.{digits}f}]"
