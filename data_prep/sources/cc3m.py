"""Conceptual Captions (CC3M): ``Train_GCC-training.tsv``, header-less ``caption<TAB>url`` lines.

``orig_id`` is the 0-based data row (line number minus one; a ``caption<TAB>url`` header line added for img2dataset
is recognised and skipped). Blank lines are ignored. Images are downloaded, or read from
``source.images/<sha1(url)>[.ext]`` when already there.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from .base import Problem, Record, clean_captions


def iter_records(cfg: Any) -> Iterator[Record | Problem]:
    path = cfg.tsv
    row = 0
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            where = f"line {lineno}"
            try:
                line = raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError:
                yield Problem(path, where, "not utf-8")
                row += 1
                continue
            if not line.strip():
                continue
            if lineno == 1 and line.strip().lower() == "caption\turl":
                continue
            parts = line.split("\t")
            this_row = row
            row += 1
            if len(parts) != 2:
                yield Problem(path, where, f"wrong column count ({len(parts)}, expected 2)")
                continue
            captions, why = clean_captions(parts[0])
            if why:
                yield Problem(path, where, why)
                continue
            url = parts[1].strip()
            if not url:
                yield Problem(path, where, "bad url")
                continue
            yield Record(orig_id=str(this_row), captions=captions, url=url, extra={"url": url})
