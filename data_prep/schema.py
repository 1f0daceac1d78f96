"""The shard contract shared by data_prep (writer) and every reader (pretrain, finetune, style stage).

A shard is ``{shard:05d}.tar`` holding, per sample, ``{key}.jpg`` (RGB JPEG), ``{key}.txt`` (first caption) and
``{key}.json`` (``captions`` list, ``source``, ``orig_id``, ``width``, ``height`` and source extras). Beside it,
``{shard:05d}_stats.json`` is written last (the done-marker), and ``manifest.json`` describes the whole set.
Plain img2dataset output is also readable: its json may lack ``captions``, so readers fall back to ``.txt``.
"""

from __future__ import annotations

import json
from typing import Any

SCHEMA_VERSION = 1
SHARD_NAME = "{shard:05d}.tar"
STATS_NAME = "{shard:05d}_stats.json"
MANIFEST_NAME = "manifest.json"
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


def sample_key(shard: int, index: int, samples_per_shard: int) -> str:
    """img2dataset's key: shard id then index within the shard, zero padded (``000010002``)."""
    digits = max(4, len(str(max(samples_per_shard - 1, 1))))
    return f"{shard:05d}{index:0{digits}d}"


def captions_of(sample: dict[str, Any]) -> list[str]:
    """All captions of a raw webdataset sample (bytes values), falling back to ``.txt`` for img2dataset shards."""
    meta = meta_of(sample)
    caps = meta.get("captions")
    if isinstance(caps, list):
        caps = [c for c in caps if isinstance(c, str) and c.strip()]
        if caps:
            return caps
    txt = sample.get("txt")
    if isinstance(txt, bytes):
        txt = txt.decode("utf-8", errors="replace")
    if isinstance(txt, str) and txt.strip():
        return [txt.strip()]
    cap = meta.get("caption")
    if isinstance(cap, str) and cap.strip():
        return [cap.strip()]
    return []


def meta_of(sample: dict[str, Any]) -> dict[str, Any]:
    raw = sample.get("json")
    if raw is None:
        return {}
    if isinstance(raw, dict):
        return raw
    try:
        meta = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return {}
    return meta if isinstance(meta, dict) else {}


def image_bytes_of(sample: dict[str, Any]) -> bytes | None:
    for ext in IMAGE_EXTS:
        if ext in sample:
            return sample[ext]
    return None
