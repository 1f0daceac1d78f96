"""Visual Genome: ``region_descriptions.json`` (+ optional ``image_data.json``), one sample per image.

``region_descriptions.json`` is a list of ``{"id": image_id, "regions": [{"region_id", "phrase", "x", "y", "width",
"height", ...}]}``. The sample's captions are the image's distinct region phrases (in file order); every usable
region is kept in the json as ``regions: [{"id", "phrase", "x", "y", "width", "height"}]`` in the ORIGINAL image's
pixel coordinates (``orig_width``/``orig_height`` in the same json give that frame). Regions without a usable phrase
are dropped. Images are looked up as ``<images>/VG_100K/<id>.jpg``, ``<images>/VG_100K_2/<id>.jpg`` then
``<images>/<id>.jpg`` (the two parts of the official download, or both merged into one folder).
``image_data.json`` (``[{"image_id" | "id", "url", "width", "height", "coco_id", "flickr_id"}]``) adds ``coco_id``,
``flickr_id`` and ``url`` to the json when given.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

from launch.config import ConfigError

from ..paths import PathError, resolve_in_root
from .base import Problem, Record, load_json

SUBDIRS = ("VG_100K", "VG_100K_2", "")


def find_image(root: str, image_id: Any) -> str:
    """The first existing candidate path, or the first candidate (it then fails as ``missing file``).

    Raises :class:`data_prep.paths.PathError` when the id would name a file outside ``root`` (``../x``).
    """
    candidates = [resolve_in_root(root, f"{sub}/{image_id}.jpg" if sub else f"{image_id}.jpg") for sub in SUBDIRS]
    for c in candidates:
        if os.path.isfile(c):
            return c
    return candidates[0]


def _image_data(path: str | None) -> dict[Any, dict[str, Any]]:
    if not path:
        return {}
    data = load_json(path, "source.image_data")
    if not isinstance(data, list):
        raise ConfigError(f"source.image_data: {path} must hold a list of image entries")
    out = {}
    for entry in data:
        if isinstance(entry, dict):
            key = entry.get("image_id", entry.get("id"))
            if key is not None:
                out[key] = entry
    return out


def _region(reg: Any) -> dict[str, Any] | None:
    if not isinstance(reg, dict):
        return None
    phrase = reg.get("phrase")
    if not isinstance(phrase, str) or not phrase.strip():
        return None
    box = {}
    for k in ("x", "y", "width", "height"):
        v = reg.get(k)
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            return None
        box[k] = v
    return {"id": reg.get("region_id", reg.get("id")), "phrase": " ".join(phrase.split()), **box}


def iter_records(cfg: Any) -> Iterator[Record | Problem]:
    """One record per image of ``cfg.regions`` with its region phrases as captions."""
    path = cfg.regions
    data = load_json(path, "source.regions")
    if not isinstance(data, list):
        raise ConfigError(f"source.regions: {path} must hold a list of {{'id', 'regions'}} entries")
    meta = _image_data(getattr(cfg, "image_data", None))
    root = cfg.images or ""
    for i, entry in enumerate(data):
        row = f"[{i}]"
        if not isinstance(entry, dict):
            yield Problem(path, row, "row is not an object")
            continue
        image_id = entry.get("id", entry.get("image_id"))
        if not isinstance(image_id, (int, str)) or isinstance(image_id, bool):
            yield Problem(path, row, "missing field 'id'")
            continue
        regions_raw = entry.get("regions")
        if not isinstance(regions_raw, list):
            yield Problem(path, f"image {image_id}", "missing field 'regions'")
            continue
        regions = [r for r in (_region(x) for x in regions_raw) if r is not None]
        captions = list(dict.fromkeys(r["phrase"] for r in regions))
        if not captions:
            yield Problem(path, f"image {image_id}", "no region phrases")
            continue
        extra: dict[str, Any] = {"regions": regions}
        info = meta.get(image_id, {})
        for k in ("coco_id", "flickr_id", "url"):
            if info.get(k) is not None:
                extra[k] = info[k]
        try:
            file = find_image(root, image_id)
        except PathError as exc:
            yield Problem(path, f"image {image_id}", exc.reason)
            continue
        yield Record(orig_id=str(image_id), captions=captions, path=file, extra=extra)
