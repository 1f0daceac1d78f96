"""ALBEF/TCL-style annotation lists: ``[{"image": path, "caption": str | [str, ...]}, ...]``.

Also reads the same items as JSON Lines (one object per line; a file that does not start with ``[``). ``image`` is
relative to ``source.images`` and must stay inside it (absolute paths and ``../`` escapes are reported as
``outside the image root``; ``http(s)://`` values are downloaded). ``orig_id`` is the
item's ``image_id`` when present, else its ``image`` value; ``image_id`` and ``image`` are kept in the json.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

from launch.config import ConfigError

from ..paths import PathError, resolve_in_root
from .base import Problem, Record, clean_captions, load_json


def _items(path: str) -> Iterator[tuple[str, Any]]:
    with open(path, "rb") as fh:
        head = fh.read(4096).lstrip()
    if head.startswith(b"["):
        data = load_json(path, "source.annotations")
        if not isinstance(data, list):
            raise ConfigError(f"source.annotations: {path} must hold a JSON list")
        for i, item in enumerate(data):
            yield f"[{i}]", item
        return
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            if not raw.strip():
                continue
            try:
                yield f"line {lineno}", json.loads(raw)
            except (ValueError, UnicodeDecodeError):
                yield f"line {lineno}", _BAD_LINE


_BAD_LINE = object()


def iter_records(cfg: Any) -> Iterator[Record | Problem]:
    path = cfg.annotations
    root = cfg.images or ""
    for row, item in _items(path):
        if item is _BAD_LINE:
            yield Problem(path, row, "bad JSON line")
            continue
        if not isinstance(item, dict):
            yield Problem(path, row, "row is not an object")
            continue
        image = item.get("image")
        if not isinstance(image, str) or not image.strip():
            yield Problem(path, row, "missing field 'image'")
            continue
        if "caption" not in item:
            yield Problem(path, row, "missing field 'caption'")
            continue
        captions, why = clean_captions(item["caption"])
        if why:
            yield Problem(path, row, why)
            continue
        extra: dict[str, Any] = {"image": image}
        image_id = item.get("image_id")
        if image_id is not None:
            extra["image_id"] = image_id
        orig_id = str(image_id) if image_id is not None else image
        if image.lower().startswith(("http://", "https://")):
            yield Record(orig_id=orig_id, captions=captions, url=image, extra=extra)
        else:
            try:
                file = resolve_in_root(root, image)
            except PathError as exc:
                yield Problem(path, row, exc.reason)
                continue
            yield Record(orig_id=orig_id, captions=captions, path=file, extra=extra)
