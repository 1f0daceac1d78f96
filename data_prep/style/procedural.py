"""A deterministic procedural style set: thousands of textures, strokes, palettes and noise patterns.

The Ghiasi style network is trained on paintings and textures (Painter by Numbers + DTD), which cannot be had here.
This module draws style images instead: each image ``i`` depends only on ``(seed, i)`` (its own NumPy generator
seeded from a hash of both), so the set is the same on every machine and any index range can be rebuilt alone.
An image is one or two layers of pattern (fractal value noise, warped stripes, marble, Voronoi cells, brush
strokes, dots, plaid, blobs) mapped through a palette (analogous, complementary, triadic, monochrome or random
hues), composited with a random blend, then optionally blurred, posterized, grained or contrast-stretched.

    python -m data_prep style-set --config configs/style/style_set.yaml out_dir=runs/style_set

writes ``{index:05d}.jpg`` files and a ``manifest.json`` (count, size, seed, the kind of each image) into
``out_dir``; ``model.style_dir`` of the style-training recipe reads the folder.
"""

from __future__ import annotations

import argparse
import colorsys
import dataclasses
import hashlib
import io
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from launch.config import ConfigError, load_config, to_dict
from launch.logging import setup_logging

log = logging.getLogger("vlp.style_set")

Array = np.ndarray


@dataclasses.dataclass
class StyleSetConfig:
    out_dir: str = "runs/style_set"
    count: int = 4000
    size: int = 128
    seed: int = 0
    jpeg_quality: int = 92
    start: int = 0  # build indices [start, count): a resumed or split build

    def validate(self, recipe: object = None) -> None:
        if self.count < 1:
            raise ConfigError("count: must be >= 1")
        if self.size < 16:
            raise ConfigError("size: must be >= 16 px")
        if not 1 <= self.jpeg_quality <= 100:
            raise ConfigError("jpeg_quality: 1..100")
        if not 0 <= self.start <= self.count:
            raise ConfigError("start: must lie in [0, count]")


# ------------------------------------------------------------------------------------------------ palettes


def _hsv(h: float, s: float, v: float) -> tuple[float, float, float]:
    return colorsys.hsv_to_rgb(h % 1.0, min(max(s, 0.0), 1.0), min(max(v, 0.0), 1.0))


def palette(rng: np.random.Generator) -> tuple[str, Array]:
    """A scheme name and ``[n, 3]`` colours in [0, 1] (n from 2 to 6)."""
    scheme = rng.choice(["analogous", "complementary", "triadic", "monochrome", "random", "earth"])
    n = int(rng.integers(2, 7))
    h0 = rng.random()
    if scheme == "analogous":
        hues = h0 + rng.uniform(-0.12, 0.12, n)
    elif scheme == "complementary":
        hues = h0 + 0.5 * rng.integers(0, 2, n) + rng.uniform(-0.04, 0.04, n)
    elif scheme == "triadic":
        hues = h0 + rng.integers(0, 3, n) / 3.0 + rng.uniform(-0.03, 0.03, n)
    elif scheme == "monochrome":
        hues = np.full(n, h0)
    elif scheme == "earth":
        hues = rng.uniform(0.02, 0.15, n)
    else:
        hues = rng.random(n)
    sat = rng.uniform(0.0, 0.5, n) if scheme == "earth" else rng.uniform(0.15, 1.0, n)
    val = np.sort(rng.uniform(0.05, 1.0, n)) if rng.random() < 0.6 else rng.uniform(0.2, 1.0, n)
    return str(scheme), np.array([_hsv(h, s, v) for h, s, v in zip(hues, sat, val)], dtype=np.float32)


def apply_palette(t: Array, colours: Array, smooth: bool) -> Array:
    """Map a scalar field ``t`` (any range) through the palette: a gradient, or hard bands when not smooth."""
    t = (t - t.min()) / (np.ptp(t) + 1e-8)
    n = len(colours)
    if not smooth:
        idx = np.minimum((t * n).astype(np.int64), n - 1)
        return colours[idx]
    pos = t * (n - 1)
    lo = np.minimum(pos.astype(np.int64), n - 2)
    frac = (pos - lo)[..., None]
    return colours[lo] * (1 - frac) + colours[lo + 1] * frac


# ------------------------------------------------------------------------------------------------ fields


def value_noise(rng: np.random.Generator, size: int, octaves: int, base: int, persistence: float) -> Array:
    """Fractal value noise ``[size, size]``: bilinearly upsampled random grids, coarse to fine."""
    out = np.zeros((size, size), dtype=np.float32)
    amp, total = 1.0, 0.0
    for o in range(octaves):
        cells = min(base * 2**o, size)
        grid = rng.random((cells + 1, cells + 1)).astype(np.float32)
        img = Image.fromarray(grid, mode="F").resize((size, size), Image.BICUBIC)
        out += amp * np.asarray(img, dtype=np.float32)
        total += amp
        amp *= persistence
    return out / total


def _coords(size: int) -> tuple[Array, Array]:
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    return x, y


def field_noise(rng: np.random.Generator, size: int) -> Array:
    return value_noise(rng, size, int(rng.integers(2, 6)), int(rng.integers(2, 6)), float(rng.uniform(0.35, 0.7)))


def field_stripes(rng: np.random.Generator, size: int) -> Array:
    x, y = _coords(size)
    angle = rng.uniform(0, np.pi)
    freq = rng.uniform(2, 24)
    warp = rng.uniform(0, 2.5) * field_noise(rng, size)
    u = x * np.cos(angle) + y * np.sin(angle)
    wave = np.sin(2 * np.pi * freq * u + warp * np.pi)
    return np.sign(wave) * np.abs(wave) ** rng.uniform(0.1, 1.0)


def field_marble(rng: np.random.Generator, size: int) -> Array:
    x, y = _coords(size)
    turb = value_noise(rng, size, 5, 2, 0.6)
    return np.sin((x * rng.uniform(1, 8) + y * rng.uniform(1, 8)) * np.pi + rng.uniform(2, 10) * turb)


def field_cells(rng: np.random.Generator, size: int) -> Array:
    n = int(rng.integers(6, 80))
    pts = rng.random((n, 2)).astype(np.float32)
    x, y = _coords(size)
    d = (x[..., None] - pts[:, 0]) ** 2 + (y[..., None] - pts[:, 1]) ** 2
    part = np.partition(d, 1, axis=-1)
    if rng.random() < 0.5:
        return np.argmin(d, axis=-1).astype(np.float32) * 0.618 % 1.0  # flat cells, shuffled colours
    return np.sqrt(part[..., 1]) - np.sqrt(part[..., 0])  # cell edges


def field_plaid(rng: np.random.Generator, size: int) -> Array:
    x, y = _coords(size)
    fx, fy = rng.uniform(2, 16, 2)
    return np.sin(2 * np.pi * fx * x) * rng.uniform(0.3, 1) + np.sin(2 * np.pi * fy * y) * rng.uniform(0.3, 1)


def field_blobs(rng: np.random.Generator, size: int) -> Array:
    x, y = _coords(size)
    out = np.zeros((size, size), dtype=np.float32)
    for _ in range(int(rng.integers(3, 30))):
        cx, cy, r = rng.random(), rng.random(), rng.uniform(0.02, 0.25)
        out += rng.uniform(-1, 1) * np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * r * r))
    return out


FIELDS: dict[str, Callable[[np.random.Generator, int], Array]] = {
    "noise": field_noise,
    "stripes": field_stripes,
    "marble": field_marble,
    "cells": field_cells,
    "plaid": field_plaid,
    "blobs": field_blobs,
}


def draw_strokes(rng: np.random.Generator, size: int, colours: Array, background: Array) -> Array:
    """Brush strokes: short curved polylines along a noise-driven flow field, or straight hatching."""
    img = Image.fromarray((background * 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    flow = field_noise(rng, size) * rng.uniform(2, 8) * np.pi
    hatch = rng.random() < 0.3
    base_angle = rng.uniform(0, np.pi)
    width_hi = max(2, int(size * rng.uniform(0.01, 0.08)))
    for _ in range(int(rng.integers(40, 400))):
        px, py = rng.random(2) * size
        colour = tuple(int(c * 255) for c in colours[rng.integers(len(colours))])
        pts = [(px, py)]
        length = rng.uniform(0.03, 0.3) * size
        for _ in range(int(rng.integers(2, 8))):
            a = base_angle if hatch else flow[int(py) % size, int(px) % size]
            px, py = px + np.cos(a) * length / 4, py + np.sin(a) * length / 4
            pts.append((px, py))
        draw.line(pts, fill=colour, width=int(rng.integers(1, width_hi + 1)), joint="curve")
    return np.asarray(img, dtype=np.float32) / 255.0


def draw_dots(rng: np.random.Generator, size: int, colours: Array, background: Array) -> Array:
    img = Image.fromarray((background * 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    grid = rng.random() < 0.5
    step = rng.uniform(0.04, 0.2) * size
    r_hi = rng.uniform(0.2, 0.6) * step
    n = int((size / step) ** 2) if grid else int(rng.integers(20, 300))
    cols = max(1, int(size / step))
    for k in range(n):
        if grid:
            cx, cy = (k % cols + 0.5) * step, (k // cols + 0.5) * step
        else:
            cx, cy = rng.random(2) * size
        r = rng.uniform(0.3, 1.0) * r_hi
        colour = tuple(int(c * 255) for c in colours[rng.integers(len(colours))])
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=colour)
    return np.asarray(img, dtype=np.float32) / 255.0


LAYERS = (*FIELDS, "strokes", "dots")


def _layer(rng: np.random.Generator, size: int, kind: str, colours: Array) -> Array:
    if kind in FIELDS:
        return apply_palette(FIELDS[kind](rng, size), colours, smooth=bool(rng.random() < 0.6))
    background = apply_palette(field_noise(rng, size), colours, smooth=True) * rng.uniform(0.5, 1.0)
    if rng.random() < 0.5:
        background = np.broadcast_to(colours[rng.integers(len(colours))], (size, size, 3)).copy()
    painter = draw_strokes if kind == "strokes" else draw_dots
    return painter(rng, size, colours, background)


def image_seed(seed: int, index: int) -> int:
    """The generator seed of image ``index`` (a hash: neighbouring indices are unrelated)."""
    return int.from_bytes(hashlib.sha256(f"style-set:{seed}:{index}".encode()).digest()[:8], "little")


def render(seed: int, index: int, size: int) -> tuple[Image.Image, dict[str, str]]:
    """Style image ``index`` of the set ``seed``: an RGB image and a record of how it was drawn."""
    rng = np.random.default_rng(image_seed(seed, index))
    scheme, colours = palette(rng)
    kind = str(rng.choice(LAYERS))
    img = _layer(rng, size, kind, colours)
    record = {"palette": scheme, "layer": kind}
    if rng.random() < 0.4:  # a second layer, blended
        scheme2, colours2 = palette(rng) if rng.random() < 0.4 else (scheme, colours)
        kind2 = str(rng.choice(LAYERS))
        top = _layer(rng, size, kind2, colours2)
        mode = str(rng.choice(["mix", "multiply", "screen", "mask"]))
        if mode == "mix":
            img = img * 0.5 + top * 0.5
        elif mode == "multiply":
            img = img * top
        elif mode == "screen":
            img = 1 - (1 - img) * (1 - top)
        else:
            mask = (field_noise(rng, size) > rng.uniform(0.35, 0.65))[..., None]
            img = np.where(mask, top, img)
        record.update(layer2=kind2, blend=mode)
    img = np.clip(img, 0.0, 1.0)
    if rng.random() < 0.3:  # contrast / gamma
        img = img ** rng.uniform(0.5, 2.0)
    if rng.random() < 0.25:  # film grain
        img = np.clip(img + rng.normal(0, rng.uniform(0.01, 0.08), img.shape), 0, 1)
    out = Image.fromarray((img * 255 + 0.5).astype(np.uint8), mode="RGB")
    post = rng.random()
    if post < 0.15:
        out = out.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(0.5, 2.5))))
    elif post < 0.3:
        out = out.quantize(colors=int(rng.integers(3, 12)), dither=Image.Dither.NONE).convert("RGB")
    elif post < 0.4:
        out = out.filter(ImageFilter.EDGE_ENHANCE_MORE)
    return out, record


def encode(image: Image.Image, quality: int) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=quality, optimize=False)
    return buf.getvalue()


def build(cfg: StyleSetConfig) -> dict[str, object]:
    """Write images ``[start, count)`` of the set into ``out_dir`` (each file atomically) and the manifest."""
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    kinds: dict[str, int] = {}
    records = {}
    for i in range(cfg.start, cfg.count):
        path = out / f"{i:05d}.jpg"
        image, record = render(cfg.seed, i, cfg.size)
        records[i] = record
        kinds[record["layer"]] = kinds.get(record["layer"], 0) + 1
        if not path.is_file():  # a resumed build keeps finished files (same bytes: same seed)
            tmp = path.with_suffix(".jpg.tmp")
            tmp.write_bytes(encode(image, cfg.jpeg_quality))
            os.replace(tmp, path)
    manifest = {"config": to_dict(cfg), "count": cfg.count - cfg.start, "kinds": kinds,
                "images": {f"{i:05d}.jpg": r for i, r in records.items()}}  # fmt: skip
    tmp = out / "manifest.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True))
    os.replace(tmp, out / "manifest.json")
    log.info("style set: %d images of %d px in %s (layers %s)", cfg.count - cfg.start, cfg.size, out, kinds)
    return manifest


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m data_prep style-set --config configs/style/style_set.yaml [key=value ...]``."""
    parser = argparse.ArgumentParser(prog="python -m data_prep style-set", description=__doc__.split("\n")[0])
    parser.add_argument("--config", help="YAML recipe (configs/style/style_set.yaml)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. out_dir=runs/style_set count=500")
    args = parser.parse_args(argv)
    setup_logging()
    try:
        cfg = load_config(StyleSetConfig, args.config, args.overrides)
        build(cfg)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
