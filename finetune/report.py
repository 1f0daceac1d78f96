"""What every fine-tuning task reports besides ``results.json``: metric tables and PNG image grids.

A task describes its table as ``(metric key, header)`` columns (``table_columns()``) and its qualitative figures as
rows of tiles; the rendering here is shared, so a new task (VQA, NLVR2, grounding, ...) writes neither layout code
nor table formatting.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

Columns = Sequence[tuple[str, str]]  # (metric key, column header)


def _cell(value: Any) -> float | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return None


def text_table(rows: Mapping[str, Mapping[str, Any]], columns: Columns, label: str = "split", width: int = 8) -> str:
    """A fixed-width table, one line per row that has at least one of the columns (missing cells print ``nan``)."""
    lines = [label.ljust(12) + "".join(h.rjust(width) for _, h in columns)]
    for name, metrics in rows.items():
        if not isinstance(metrics, Mapping) or not any(k in metrics for k, _ in columns):
            continue
        values = [_cell(metrics.get(k)) for k, _ in columns]
        lines.append(name.ljust(12) + "".join(f"{math.nan if v is None else v:{width}.2f}" for v in values))
    return "\n".join(lines)


def markdown_table(rows: Mapping[str, Mapping[str, Any]], columns: Columns, label: str = "split") -> str:
    """A markdown table, one line per row (missing cells print ``-``)."""
    lines = [f"| {label} | " + " | ".join(h for _, h in columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for name, metrics in rows.items():
        values = [_cell(metrics.get(k)) for k, _ in columns]
        lines.append(f"| {name} | " + " | ".join("-" if v is None else f"{v:.2f}" for v in values) + " |")
    return "\n".join(lines)


@dataclasses.dataclass
class Tile:
    """One image of a grid row: ``image`` (a PIL image, or None for a grey placeholder), a frame and a caption."""

    image: Any
    caption: str = ""
    frame: str | None = None  # a PIL colour name; None: no frame


@dataclasses.dataclass
class GridRow:
    """A titled row of tiles; a ``None`` tile leaves its column empty (keeps columns aligned across rows)."""

    title: str
    tiles: Sequence[Tile | None]


def image_grid(path: str | Path, rows: Sequence[GridRow], thumb: int = 96) -> Path | None:
    """Render ``rows`` as one PNG (thumbnails ``thumb`` px square, title above each row); None when empty."""
    from PIL import Image, ImageDraw

    if not rows:
        return None
    columns = max(len(r.tiles) for r in rows)
    label_h, pad = 28, 6
    width = pad + max(columns, 1) * (thumb + pad)
    height = pad + len(rows) * (thumb + label_h + pad)
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    for r, row in enumerate(rows):
        y = pad + r * (thumb + label_h + pad) + label_h - 12
        draw.text((pad, y - label_h + 12), row.title, fill="black")
        for c, tile in enumerate(row.tiles):
            if tile is None:
                continue
            x = pad + c * (thumb + pad)
            image = tile.image if tile.image is not None else Image.new("RGB", (thumb, thumb), "lightgray")
            canvas.paste(image.convert("RGB").resize((thumb, thumb)), (x, y))
            if tile.frame:
                draw.rectangle([x - 3, y - 3, x + thumb + 2, y + thumb + 2], outline=tile.frame, width=3)
            draw.text((x, y + thumb + 2), tile.caption, fill="black")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path
