"""Means with Student-t 95 % intervals over seeds, and paired differences (no scipy: the quantiles are tabulated)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

# Two-sided 95 % quantiles t_{0.975, df} of Student's t, df = 1..30 (standard table values, 4 decimals).
_T975 = (
    12.7062, 4.3027, 3.1824, 2.7764, 2.5706, 2.4469, 2.3646, 2.3060, 2.2622, 2.2281,
    2.2010, 2.1788, 2.1604, 2.1448, 2.1314, 2.1199, 2.1098, 2.1009, 2.0930, 2.0860,
    2.0796, 2.0739, 2.0687, 2.0639, 2.0595, 2.0555, 2.0518, 2.0484, 2.0452, 2.0423,
)  # fmt: skip


def t_quantile_975(df: int) -> float:
    """t_{0.975, df}; above 30 degrees of freedom the Cornish-Fisher expansion around z (error < 1e-4)."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    if df <= len(_T975):
        return _T975[df - 1]
    z = 1.959964
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


@dataclasses.dataclass(frozen=True)
class Summary:
    """Mean of ``n`` values with the half-width of its 95 % t-interval (nan for n < 2: no spread to estimate)."""

    n: int
    mean: float
    sd: float
    half: float

    @property
    def low(self) -> float:
        return self.mean - self.half

    @property
    def high(self) -> float:
        return self.mean + self.half

    def excludes_zero(self) -> bool:
        return self.n >= 2 and (self.low > 0 or self.high < 0)

    def as_dict(self) -> dict[str, float | int]:
        return {"n": self.n, "mean": self.mean, "sd": self.sd, "ci95_half": self.half, "ci95": [self.low, self.high]}


def summarize(values: Sequence[float]) -> Summary:
    """Mean, sample standard deviation and 95 % t-interval half-width of ``values``."""
    n = len(values)
    if n == 0:
        return Summary(0, math.nan, math.nan, math.nan)
    mean = sum(values) / n
    if n == 1:
        return Summary(1, mean, math.nan, math.nan)
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return Summary(n, mean, sd, t_quantile_975(n - 1) * sd / math.sqrt(n))


def paired(treated: dict[int, float], control: dict[int, float]) -> tuple[dict[int, float], Summary]:
    """Per-seed differences treated − control over the seeds both have, and their summary."""
    seeds = sorted(set(treated) & set(control))
    diffs = {s: treated[s] - control[s] for s in seeds}
    return diffs, summarize([diffs[s] for s in seeds])
