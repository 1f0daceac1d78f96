"""COCO captions: the official ``captions_*.json`` or Karpathy's ``dataset_coco.json``, told apart by layout.

* official: ``{"images": [{"id", "file_name", ...}], "annotations": [{"id", "image_id", "caption"}]}``; captions are
  joined to images on ``image_id`` (about five per image); images are ``source.images/<file_name>``.
* Karpathy: ``{"images": [{"filepath", "filename", "split", "sentences": [{"raw"}], "cocoid" | "imgid"}]}``;
  ``source.split`` keeps only the named splits (comma separated; ``train`` includes ``restval``, the usual
  113k-image training set); images are ``source.images/<filepath>/<filename>``.

The layout is told by the file's keys (:func:`detect_layout`); a file that is neither (e.g. a captions file
without ``annotations``) is a config error saying what was found. An image path that leaves ``source.images``
(``../``, absolute) is reported as ``outside the image root`` and skipped.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

from launch.config import ConfigError

from ..paths import PathError, resolve_in_root
from .base import Problem, Record, clean_captions, load_json

log = logging.getLogger("vlp.data_prep")


def parse_splits(split: str | None) -> set[str] | None:
    """``"train,val"`` → ``{"train", "restval", "val"}``; None/empty → no filter."""
    if not split:
        return None
    names = {s.strip() for s in str(split).split(",") if s.strip()}
    if "train" in names:
        names.add("restval")
    return names


EXPECTED = (
    "expected a COCO captions file ({'images': [{'id', 'file_name'}], 'annotations': [{'image_id', 'caption'}]}) "
    "or a Karpathy split file ({'images': [{'filename', 'sentences', 'split'}]})"
)


def _describe(value: Any) -> str:
    if isinstance(value, dict):
        return "an object with keys " + (", ".join(repr(k) for k in sorted(value)[:8]) or "(none)")
    return f"a JSON {type(value).__name__}"


def detect_layout(data: Any, path: str) -> str:
    """``"captions"`` or ``"karpathy"`` from the file's keys; anything else is a ConfigError saying what was found.

    A file with an ``images`` list but no ``annotations`` is only Karpathy's when its image rows look like it
    (``sentences``/``filename``): a captions file that lost its annotations must not pass as an empty Karpathy set.
    """
    where = f"source.annotations: {path}"
    if not isinstance(data, dict):
        raise ConfigError(f"{where} holds {_describe(data)}; {EXPECTED}")
    images = data.get("images")
    if not isinstance(images, list):
        raise ConfigError(f"{where} has no 'images' list (found {_describe(data)}); {EXPECTED}")
    if "annotations" in data:
        if not isinstance(data["annotations"], list):
            raise ConfigError(f"{where}: 'annotations' is {_describe(data['annotations'])}, not a list; {EXPECTED}")
        return "captions"
    rows = [r for r in images[:100] if isinstance(r, dict)]
    if any("sentences" in r or "filename" in r for r in rows):
        return "karpathy"
    if any("file_name" in r for r in rows):
        raise ConfigError(
            f"{where} looks like a COCO captions file (image rows with 'file_name') but has no 'annotations' "
            f"list (found {_describe(data)}); {EXPECTED}"
        )
    found = _describe(rows[0]) if rows else "no image rows"
    raise ConfigError(f"{where}: image rows are {found}, neither layout; {EXPECTED}")


def iter_records(cfg: Any) -> Iterator[Record | Problem]:
    """Records of ``cfg.annotations`` (either layout), images under ``cfg.images``."""
    path = cfg.annotations
    data = load_json(path, "source.annotations")
    layout = detect_layout(data, path)
    name = "COCO captions" if layout == "captions" else "Karpathy"
    log.info("source.annotations: %s read as the %s layout", path, name)
    if layout == "captions":
        yield from _captions_layout(data, path, cfg.images or "")
    else:
        yield from _karpathy_layout(data, path, cfg.images or "", parse_splits(getattr(cfg, "split", None)))


def _captions_layout(data: dict[str, Any], path: str, root: str) -> Iterator[Record | Problem]:
    captions: dict[Any, list[str]] = {}
    images: list[tuple[Any, str, str]] = []
    refused: set[Any] = set()  # images already reported (outside the root): their captions are not a 2nd problem
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
        try:
            file = resolve_in_root(root, name)
        except PathError as exc:
            yield Problem(path, row, exc.reason)
            refused.add(img["id"])
            continue
        images.append((img["id"], name, file))
        captions[img["id"]] = []
    for j, ann in enumerate(data["annotations"]):
        row = f"annotations[{j}]"
        if not isinstance(ann, dict):
            yield Problem(path, row, "row is not an object")
            continue
        if "image_id" not in ann:
            yield Problem(path, row, "missing field 'image_id'")
            continue
        if ann["image_id"] in refused:
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
    for image_id, name, file in images:
        caps = captions[image_id]
        if not caps:
            yield Problem(path, f"image_id {image_id}", "no captions")
            continue
        yield Record(orig_id=str(image_id), captions=caps, path=file, extra={"file_name": name})


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
        rel = f"{img['filepath']}/{name}" if isinstance(img.get("filepath"), str) and img["filepath"] else name
        try:
            file = resolve_in_root(root, rel)
        except PathError as exc:
            yield Problem(path, row, exc.reason)
            continue
        extra: dict[str, Any] = {"image": rel}
        if isinstance(split, str):
            extra["split"] = split
        yield Record(orig_id=str(image_id), captions=caps, path=file, extra=extra)
