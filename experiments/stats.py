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


def t_quantile_975(df: float) -> float:
    """t_{0.975, df}: the table for whole df up to 30, else the root of the t CDF (a fractional df from Welch,
    or df > 30)."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    if df == int(df) and df <= len(_T975):
        return _T975[int(df) - 1]
    lo, hi = 1.9, 13.0  # t_{0.975} lies in here for every df >= 1
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if t_cdf(mid, df) < 0.975 else (lo, mid)
    return (lo + hi) / 2


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with ``df`` degrees of freedom, through the regularized incomplete beta."""
    tail = 0.5 * _betainc(df / 2, 0.5, df / (df + t * t))
    return 1 - tail if t >= 0 else tail


def _betainc(a: float, b: float, x: float) -> float:
    """Regularized incomplete beta I_x(a, b) by its continued fraction (modified Lentz; Numerical Recipes 6.4)."""
    if x <= 0 or x >= 1:
        return 0.0 if x <= 0 else 1.0
    if x > (a + 1) / (a + b + 2):  # the fraction converges fast only below this point; use the symmetry
        return 1 - _betainc(b, a, 1 - x)
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)) / a
    tiny = 1e-300
    f, c, d = 1.0, 1.0, 0.0
    for i in range(400):
        m = i // 2
        if i == 0:
            num = 1.0
        elif i % 2 == 0:
            num = m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m))
        else:
            num = -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))
        d = 1 + num * d
        d = 1 / (d if abs(d) > tiny else tiny)
        c = 1 + num / c
        c = c if abs(c) > tiny else tiny
        f *= c * d
        if abs(1 - c * d) < 1e-14:
            break
    return front * (f - 1)


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


@dataclasses.dataclass(frozen=True)
class Contrast:
    """An estimate with the half-width of its 95 % t-interval and the degrees of freedom it was read at."""

    estimate: float
    half: float
    df: float

    def excludes_zero(self) -> bool:
        return math.isfinite(self.half) and abs(self.estimate) > self.half

    def as_dict(self) -> dict[str, float | list[float]]:
        ci = [self.estimate - self.half, self.estimate + self.half]
        return {"estimate": self.estimate, "ci95_half": self.half, "df": self.df, "ci95": ci}


_NO_INTERVAL = math.nan


def welch(a: Sequence[float], b: Sequence[float]) -> Contrast:
    """mean(a) − mean(b) for two independent samples, 95 % interval with the Welch-Satterthwaite df.

    For effects measured at two data sizes: seeds are not paired across sizes (each size is its own run), so the
    difference of the two effects is a two-sample comparison, not a paired one.
    """
    sa, sb = summarize(a), summarize(b)
    diff = sa.mean - sb.mean
    if sa.n < 2 or sb.n < 2:
        return Contrast(diff, _NO_INTERVAL, _NO_INTERVAL)
    va, vb = sa.sd**2 / sa.n, sb.sd**2 / sb.n
    if va + vb == 0:
        return Contrast(diff, 0.0, float(sa.n + sb.n - 2))
    df = (va + vb) ** 2 / (va**2 / (sa.n - 1) + vb**2 / (sb.n - 1))
    return Contrast(diff, t_quantile_975(df) * math.sqrt(va + vb), df)


def slope(xs: Sequence[float], ys: Sequence[float]) -> Contrast:
    """Least-squares slope of ``ys`` on ``xs`` with its 95 % t-interval (df = n − 2)."""
    n = len(xs)
    if n != len(ys):
        raise ValueError(f"{n} x values but {len(ys)} y values")
    if n < 2:
        return Contrast(_NO_INTERVAL, _NO_INTERVAL, _NO_INTERVAL)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    if sxx == 0:
        raise ValueError("slope: every x is the same")
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    if n < 3:
        return Contrast(b, _NO_INTERVAL, _NO_INTERVAL)
    resid = sum((y - my - b * (x - mx)) ** 2 for x, y in zip(xs, ys))
    return Contrast(b, t_quantile_975(n - 2) * math.sqrt(resid / (n - 2) / sxx), float(n - 2))
