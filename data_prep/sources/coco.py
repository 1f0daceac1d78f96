"""COCO captions: the official ``captions_*.json`` or Karpathy's ``dataset_coco.json``, told apart by layout.

* official: ``{"images": [{"id", "file_name", ...}], "annotations": [{"id", "image_id", "caption"}]}``; captions are
  joined to images on ``image_id`` (about five per image); images are ``source.images/<file_name>``.
* Karpathy: ``{"images": [{"filepath", "filename", "split", "sentences": [{"raw"}], "cocoid" | "imgid"}]}``;
  ``source.split`` keeps only the named splits (comma separated; ``train`` includes ``restval``, the usual
  113k-image training set); images are ``source.images/<filepath>/<filename>``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

from launch.config import ConfigError

from .base import Problem, Record, clean_captions, load_json


def parse_splits(split: str | None) -> set[str] | None:
    """``"train,val"`` → ``{"train", "restval", "val"}``; None/empty → no filter."""
    if not split:
        return None
    names = {s.strip() for s in str(split).split(",") if s.strip()}
    if "train" in names:
        names.add("restval")
    return names


def iter_records(cfg: Any) -> Iterator[Record | Problem]:
    """Records of ``cfg.annotations`` (either layout), images under ``cfg.images``."""
    path = cfg.annotations
    data = load_json(path, "source.annotations")
    if isinstance(data, dict) and isinstance(data.get("annotations"), list) and isinstance(data.get("images"), list):
        yield from _captions_layout(data, path, cfg.images or "")
    elif isinstance(data, dict) and isinstance(data.get("images"), list):
        yield from _karpathy_layout(data, path, cfg.images or "", parse_splits(getattr(cfg, "split", None)))
    else:
        raise ConfigError(
            f"source.annotations: {path} is neither a COCO captions file (images + annotations) "
            "nor a Karpathy split file (images with sentences)"
        )


def _captions_layout(data: dict[str, Any], path: str, root: str) -> Iterator[Record | Problem]:
    captions: dict[Any, list[str]] = {}
    images: list[tuple[Any, str]] = []
    for i, img in enumerate(data["images"]):
        row = f"images[{i}]"
        if not isinstance(img, dict):
            yield Problem(path, row, "row is not an object")
            continue
        if "id" not in img or not isinstance(img["id"], (int, str)):
            yield Problem(path, row, "missing field 'id'")
            continue
        name = img.get("file_name")
        if not isinstance(name, str) or not name:
            yield Problem(path, row, "missing field 'file_name'")
            continue
        images.append((img["id"], name))
        captions[img["id"]] = []
    for j, ann in enumerate(data["annotations"]):
        row = f"annotations[{j}]"
        if not isinstance(ann, dict):
            yield Problem(path, row, "row is not an object")
            continue
        if "image_id" not in ann:
            yield Problem(path, row, "missing field 'image_id'")
            continue
        if ann["image_id"] not in captions:
            yield Problem(path, row, "unknown image_id")
            continue
        if "caption" not in ann:
            yield Problem(path, row, "missing field 'caption'")
            continue
        caps, why = clean_captions(ann["caption"])
        if why:
            yield Problem(path, row, why)
            continue
        captions[ann["image_id"]].extend(caps)
    for image_id, name in images:
        caps = captions[image_id]
        if not caps:
            yield Problem(path, f"image_id {image_id}", "no captions")
            continue
        yield Record(orig_id=str(image_id), captions=caps, path=os.path.join(root, name), extra={"file_name": name})


def _karpathy_layout(data: dict[str, Any], path: str, root: str, splits: set[str] | None) -> Iterator[Record | Problem]:
    for i, img in enumerate(data["images"]):
        row = f"images[{i}]"
        if not isinstance(img, dict):
            yield Problem(path, row, "row is not an object")
            continue
        split = img.get("split")
        if splits is not None:
            if not isinstance(split, str):
                yield Problem(path, row, "missing field 'split'")
                continue
            if split not in splits:
                continue  # filtered out, not a problem
        name = img.get("filename")
        if not isinstance(name, str) or not name:
            yield Problem(path, row, "missing field 'filename'")
            continue
        sentences = img.get("sentences")
        if not isinstance(sentences, list):
            yield Problem(path, row, "missing field 'sentences'")
            continue
        raws = [s.get("raw") if isinstance(s, dict) else s for s in sentences]
        caps, why = clean_captions(raws)
        if why:
            yield Problem(path, row, why)
            continue
        image_id = img.get("cocoid", img.get("imgid", i))
        rel = os.path.join(img["filepath"], name) if isinstance(img.get("filepath"), str) else name
        extra: dict[str, Any] = {"image": rel}
        if isinstance(split, str):
            extra["split"] = split
        yield Record(orig_id=str(image_id), captions=caps, path=os.path.join(root, rel), extra=extra)
