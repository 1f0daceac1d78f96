"""Error-bar plots drawn with Pillow (the project has no plotting dependency): one line per series over a numeric
or categorical x axis, a marker at each mean and a bar for its 95 % interval."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

# Distinguishable on white, in print and for the common colour-vision deficiencies (Okabe-Ito).
PALETTE = ((0, 114, 178), (213, 94, 0), (0, 158, 115), (204, 121, 167), (230, 159, 0), (86, 180, 233), (0, 0, 0))
Point = tuple[float, float, float]  # x, mean, half-width (nan: no interval)


def _nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    if not math.isfinite(lo) or not math.isfinite(hi):
        return []
    if hi - lo < 1e-12:
        lo, hi = lo - 1, hi + 1
    raw = (hi - lo) / count
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    start = math.ceil(lo / step) * step
    return [start + i * step for i in range(int((hi - start) / step + 1e-9) + 1)]


def _fmt(v: float, step: float = 1.0) -> str:
    """``v`` with as many decimals as the tick step needs (ticks 261.5 and 262 must not both read 262)."""
    decimals = max(0, -math.floor(math.log10(step))) if step > 0 else 2
    return f"{v:.{decimals}f}"


def errorbar_plot(
    series: dict[str, Sequence[Point]],
    path: str | Path,
    title: str,
    ylabel: str,
    xlabel: str = "",
    xticklabels: dict[float, str] | None = None,
    zero_line: bool = False,
    size: tuple[int, int] = (760, 460),
) -> Path:
    """Draw ``series`` (label -> points) to ``path`` (PNG); the x positions are data units, labelled by
    ``xticklabels`` if given (categorical axes), else by round numbers. Series are shifted a little sideways so
    their intervals do not hide each other."""
    font = ImageFont.load_default()
    w, h = size
    left, right, top, bottom = 78, 170, 40, 58
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    xs = [p[0] for pts in series.values() for p in pts]
    ys = [v for pts in series.values() for p in pts for v in (p[1] - _h(p), p[1] + _h(p), p[1])]
    ys = [v for v in ys if math.isfinite(v)] + ([0.0] if zero_line else [])
    if not xs or not ys:
        d.text((left, top), f"{title}: no finished runs", fill="black", font=font)
        img.save(path)
        return Path(path)
    # a categorical axis shows every category, also those without a finished run
    x0, x1 = (min(xticklabels), max(xticklabels)) if xticklabels else (min(xs), max(xs))
    pad = (x1 - x0) * 0.08 or 0.5
    x0, x1 = x0 - pad, x1 + pad
    y0, y1 = min(ys), max(ys)
    ypad = (y1 - y0) * 0.08 or 1.0
    y0, y1 = y0 - ypad, y1 + ypad
    px = lambda x: left + (x - x0) / (x1 - x0) * (w - left - right)  # noqa: E731
    py = lambda y: h - bottom - (y - y0) / (y1 - y0) * (h - top - bottom)  # noqa: E731
    d.rectangle((left, top, w - right, h - bottom), outline="black")
    yt = _nice_ticks(y0, y1)
    for t in yt:
        d.line((left - 4, py(t), left, py(t)), fill="black")
        d.line((left, py(t), w - right, py(t)), fill=(232, 232, 232))
        d.text((left - 8, py(t)), _fmt(t, yt[1] - yt[0] if len(yt) > 1 else 1.0), fill="black", font=font, anchor="rm")
    xt = _nice_ticks(x0, x1)
    ticks = xticklabels or {t: _fmt(t, xt[1] - xt[0] if len(xt) > 1 else 1.0) for t in xt}
    for t, label in ticks.items():
        d.line((px(t), h - bottom, px(t), h - bottom + 4), fill="black")
        d.text((px(t), h - bottom + 8), label, fill="black", font=font, anchor="ma")
    if zero_line and y0 < 0 < y1:
        d.line((left, py(0), w - right, py(0)), fill=(120, 120, 120), width=1)
    d.text((w / 2 - right / 2 + left / 2, 14), title, fill="black", font=font, anchor="mm")
    d.text(((left + w - right) / 2, h - 18), xlabel, fill="black", font=font, anchor="mm")
    d.text((8, top - 22), ylabel, fill="black", font=font)
    k = len(series)
    shift = (x1 - x0) * 0.012
    for i, (label, pts) in enumerate(series.items()):
        colour = PALETTE[i % len(PALETTE)]
        off = (i - (k - 1) / 2) * shift
        pts = sorted(pts)
        coords = [(px(x + off), py(m)) for x, m, _ in pts if math.isfinite(m)]
        if len(coords) > 1:
            d.line(coords, fill=colour, width=2)
        for x, m, half in pts:
            if not math.isfinite(m):
                continue
            cx, cy = px(x + off), py(m)
            if math.isfinite(half):
                d.line((cx, py(m - half), cx, py(m + half)), fill=colour, width=2)
                for yy in (py(m - half), py(m + half)):
                    d.line((cx - 5, yy, cx + 5, yy), fill=colour, width=2)
            d.ellipse((cx - 4, cy - 4, cx + 4, cy + 4), fill=colour)
        ly = top + 8 + i * 18
        d.rectangle((w - right + 12, ly - 5, w - right + 24, ly + 5), fill=colour)
        d.text((w - right + 30, ly), label[:24], fill="black", font=font, anchor="lm")
    d.text((left, h - bottom + 24), "bars: 95 % t-interval over seeds", fill=(90, 90, 90), font=font)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return Path(path)


def _h(p: Point) -> float:
    return p[2] if math.isfinite(p[2]) else 0.0
