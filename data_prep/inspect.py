"""``python -m data_prep inspect <dir | shard pattern>``: what a set of shards holds.

Prints shard and sample counts, captions per sample, a caption-length histogram (words), image sizes, failures
by reason (from the ``_stats.json`` files) and unfinished shards; ``--out sheet.png`` saves a contact sheet of the
first samples with their captions. Tars are streamed, never extracted.
"""

from __future__ import annotations

import argparse
import glob
import io
import json
import os
import sys
import textwrap
from collections import Counter
from collections.abc import Sequence
from typing import Any

from launch.config import expand_shards

from .schema import IMAGE_EXTS, captions_of, meta_of
from .sources.img2dataset import iter_samples

LENGTH_BINS = (0, 5, 10, 15, 20, 30, 50)  # lower edges of the word-count bins


def resolve_shards(target: str) -> list[str]:
    """A folder → its ``*.tar`` files; otherwise a shard pattern (path, glob, brace range, ``::``-joined)."""
    if os.path.isdir(target):
        return sorted(glob.glob(os.path.join(target, "*.tar")))
    return expand_shards(target)


def length_bin(words: int) -> str:
    """The histogram bin label of a caption of ``words`` words (``0-4``, ..., ``50+``)."""
    for lo, hi in zip(LENGTH_BINS, LENGTH_BINS[1:]):
        if lo <= words < hi:
            return f"{lo}-{hi - 1}"
    return f"{LENGTH_BINS[-1]}+"


def _stats_path(tar_path: str) -> str:
    return tar_path[: -len(".tar")] + "_stats.json" if tar_path.endswith(".tar") else tar_path + "_stats.json"


def inspect_shards(paths: Sequence[str], sheet_samples: int = 16, limit: int | None = None) -> dict[str, Any]:
    """Scan ``paths``; returns counts, histograms, failures by reason and the first ``sheet_samples`` samples."""
    report: dict[str, Any] = {
        "shards": len(paths),
        "samples": 0,
        "captions": 0,
        "samples_without_image": 0,
        "samples_without_caption": 0,
        "caption_words": Counter(),
        "captions_per_sample": Counter(),
        "image_sizes": Counter(),
        "sources": Counter(),
        "failures": Counter(),
        "failed": 0,
        "shards_without_stats": [],
        "unreadable_shards": [],
        "unfinished_temp_files": [],
    }
    sheet: list[tuple[bytes, str, str]] = []
    folders = sorted({os.path.dirname(p) or "." for p in paths})
    for folder in folders:
        report["unfinished_temp_files"] += sorted(glob.glob(os.path.join(folder, "*.tar.tmp")))
    scanned = 0
    for path in paths:
        stats_file = _stats_path(path)
        if os.path.exists(stats_file):
            try:
                with open(stats_file, encoding="utf-8") as fh:
                    st = json.load(fh)
                report["failures"].update(st.get("failures", {}))
                report["failed"] += int(st.get("failed", 0))
            except (OSError, ValueError):
                report["shards_without_stats"].append(path)
        else:
            report["shards_without_stats"].append(path)
        if limit is not None and scanned >= limit:
            continue
        try:
            for key, sample in iter_samples(path):
                scanned += 1
                report["samples"] += 1
                caps = captions_of(sample)
                meta = meta_of(sample)
                img = next((sample[e] for e in IMAGE_EXTS if e in sample), None)
                if img is None:
                    report["samples_without_image"] += 1
                if not caps:
                    report["samples_without_caption"] += 1
                report["captions"] += len(caps)
                report["captions_per_sample"][len(caps)] += 1
                for c in caps:
                    report["caption_words"][length_bin(len(c.split()))] += 1
                if "width" in meta and "height" in meta:
                    report["image_sizes"][f"{meta['width']}x{meta['height']}"] += 1
                report["sources"][str(meta.get("source", "?"))] += 1
                if img is not None and len(sheet) < sheet_samples:
                    sheet.append((img, key, caps[0] if caps else ""))
                if limit is not None and scanned >= limit:
                    break
        except Exception as exc:  # noqa: BLE001 - a broken tar is reported, the others still scanned
            report["unreadable_shards"].append(f"{path}: {type(exc).__name__}: {exc}")
    report["sheet"] = sheet
    return report


def contact_sheet(samples: Sequence[tuple[bytes, str, str]], out: str, thumb: int = 160, cols: int = 4) -> None:
    """Save a grid of thumbnails, each with its key and (wrapped) caption underneath, as a PNG."""
    from PIL import Image, ImageDraw, ImageFont, ImageOps

    font = ImageFont.load_default()
    chars = max(8, thumb // 6)
    text_h = 12 * 4
    cols = max(1, min(cols, len(samples) or 1))
    rows = max(1, -(-len(samples) // cols))
    pad = 6
    sheet = Image.new("RGB", (cols * (thumb + pad) + pad, rows * (thumb + text_h + pad) + pad), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for i, (data, key, caption) in enumerate(samples):
        x = pad + (i % cols) * (thumb + pad)
        y = pad + (i // cols) * (thumb + text_h + pad)
        try:
            img = ImageOps.contain(Image.open(io.BytesIO(data)).convert("RGB"), (thumb, thumb))
            sheet.paste(img, (x + (thumb - img.width) // 2, y + (thumb - img.height) // 2))
        except Exception:  # noqa: BLE001 - an undecodable image becomes a grey tile, the sheet still renders
            draw.rectangle((x, y, x + thumb, y + thumb), fill=(200, 200, 200))
        lines = [key] + textwrap.wrap(caption, chars)[:3]
        for j, line in enumerate(lines):
            draw.text((x, y + thumb + 2 + 12 * j), line, fill=(0, 0, 0), font=font)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    sheet.save(out, format="PNG")


def format_report(report: dict[str, Any]) -> str:
    """Human-readable summary with ASCII histograms."""
    n = report["samples"]
    lines = [
        f"shards: {report['shards']}   samples: {n}   captions: {report['captions']} "
        f"({report['captions'] / n if n else 0:.2f} per sample)   failed (from stats): {report['failed']}",
    ]
    if report["sources"]:
        lines.append("sources: " + ", ".join(f"{k}: {v}" for k, v in sorted(report["sources"].items())))

    def hist(title: str, counter: Counter, order: Sequence[Any]) -> None:
        total = sum(counter.values())
        if not total:
            return
        lines.append(title)
        for k in order:
            v = counter.get(k, 0)
            lines.append(f"  {str(k):>10} {v:>8} {'#' * round(40 * v / total)}")

    bins = [length_bin(lo) for lo in LENGTH_BINS]
    hist("caption length (words):", report["caption_words"], bins)
    hist("captions per sample:", report["captions_per_sample"], sorted(report["captions_per_sample"]))
    sizes = report["image_sizes"].most_common(5)
    if sizes:
        lines.append("image sizes (most common): " + ", ".join(f"{k} x{v}" for k, v in sizes))
    if report["failures"]:
        lines.append("failures by reason:")
        for reason, v in report["failures"].most_common():
            lines.append(f"  {v:>8}  {reason}")
    for k in ("samples_without_image", "samples_without_caption"):
        if report[k]:
            lines.append(f"{k.replace('_', ' ')}: {report[k]}")
    if report["shards_without_stats"]:
        lines.append(f"shards without a stats file (unfinished or not ours): {len(report['shards_without_stats'])}")
    for what in ("unreadable_shards", "unfinished_temp_files"):
        for item in report[what]:
            lines.append(f"{what.replace('_', ' ')[:-1]}: {item}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m data_prep inspect <dir | pattern> [--out sheet.png] [--num 16] [--limit N] [--json]``."""
    parser = argparse.ArgumentParser(
        prog="python -m data_prep inspect",
        description=__doc__.split("\n")[0],
        epilog="what it reports: docs/data_prep.md",
    )
    parser.add_argument("shards", help="shard folder, or pattern (path, glob, {00000..00009} range)")
    parser.add_argument("--out", help="write a contact sheet PNG of the first samples here")
    parser.add_argument("--num", type=int, default=16, help="samples on the contact sheet")
    parser.add_argument("--limit", type=int, default=None, help="scan at most this many samples")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)
    paths = resolve_shards(args.shards)
    if not paths:
        print(f"no shards match {args.shards!r}", file=sys.stderr)
        return 2
    report = inspect_shards(paths, sheet_samples=args.num if args.out else 0, limit=args.limit)
    if args.out:
        contact_sheet(report["sheet"], args.out)
    if args.json:
        printable = {k: (dict(v) if isinstance(v, Counter) else v) for k, v in report.items() if k != "sheet"}
        print(json.dumps(printable, indent=2, default=str))
    else:
        print(format_report(report))
        if args.out:
            print(f"contact sheet: {args.out} ({len(report['sheet'])} samples)")
    return 1 if report["unreadable_shards"] else 0
