"""SBU Captions: ``sbu-captions-all.json``, a dict of parallel lists ``image_urls`` / ``captions`` / ``user_ids``.

Row ``i`` (0-based) is image ``image_urls[i]`` with caption ``captions[i]``; ``orig_id`` is that row number.
Images are downloaded, or read from ``source.images/<sha1(url)>[.ext]`` when already there.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from launch.config import ConfigError

from .base import Problem, Record, clean_captions, load_json


def iter_records(cfg: Any) -> Iterator[Record | Problem]:
    path = cfg.annotations
    data = load_json(path, "source.annotations")
    if not isinstance(data, dict) or not isinstance(data.get("image_urls"), list):
        raise ConfigError(f"source.annotations: {path} is not an SBU file (a dict with an 'image_urls' list)")
    urls = data["image_urls"]
    caps = data.get("captions")
    if not isinstance(caps, list):
        raise ConfigError(f"source.annotations: {path} has no 'captions' list")
    users = data.get("user_ids") if isinstance(data.get("user_ids"), list) else []
    for i in range(max(len(urls), len(caps))):
        row = f"row {i}"
        if i >= len(urls):
            yield Problem(path, row, "missing field 'image_urls'")
            continue
        if i >= len(caps):
            yield Problem(path, row, "missing field 'captions'")
            continue
        url = urls[i]
        if not isinstance(url, str) or not url.strip():
            yield Problem(path, row, "bad url")
            continue
        captions, why = clean_captions(caps[i])
        if why:
            yield Problem(path, row, why)
            continue
        extra: dict[str, Any] = {"url": url.strip()}
        if i < len(users) and users[i] is not None:
            extra["user_id"] = users[i]
        yield Record(orig_id=str(i), captions=captions, url=url.strip(), extra=extra)
