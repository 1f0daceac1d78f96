"""Image-classification readers: STL-10 (official binary files), Office-31, any ImageFolder tree, the synthetic set.

Every reader returns a :class:`ClassificationSet`: class names, one image reference, label and domain per item, and
a ``store`` whose ``open(ref)`` gives the RGB image or raises :class:`finetune.data.ImageError` naming the file (the
loaders report such an image and skip it). Layouts:

* **STL-10** (``stl10_binary/``): ``{split}_X.bin`` uint8, N x 3 x 96 x 96, each image stored *column-major* per
  channel (so a plain reshape to [3, 96, 96] gives [C, x, y]: it must be transposed to H x W x C);
  ``{split}_y.bin`` uint8 labels 1..10; ``class_names.txt``. Splits ``train`` and ``test``.
* **Office-31**: ``<root>/<domain>/images/<class>/*.jpg`` (``images/`` optional) for the domains ``amazon``,
  ``dslr``, ``webcam``; train on some domains, test on another. Classes: the union of the class folders.
* **ImageFolder**: ``<root>/<class>/*`` or ``<root>/{train,val,test}/<class>/*``.
* **Synthetic** (``python -m data_prep synthetic``): ``<root>/{split}_scenes.jsonl`` rows (``label`` = shape of the
  largest object, ``scene.domain`` = palette/texture domain, ``shard`` + ``key`` = the image inside the shard);
  train and val keep the training domains, test keeps the test domains: the domain-shift setup.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from finetune.data import ImageError, ImageStore

log = logging.getLogger("vlp.finetune.classification")

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm")
STL10_SIZE = 96
STL10_CLASSES = ("airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck")
OFFICE31_DOMAINS = ("amazon", "dslr", "webcam")


class ArrayStore:
    """``open(i)`` -> the i-th image of a uint8 ``[N, H, W, 3]`` array (the STL-10 reader's store)."""

    def __init__(self, images: np.ndarray, source: str = "") -> None:
        self.images = images
        self.source = source

    def open(self, ref: int) -> Image.Image:
        try:
            return Image.fromarray(self.images[int(ref)], mode="RGB")
        except (IndexError, ValueError) as exc:
            raise ImageError(f"{self.source}[{ref}]: {exc}") from exc


@dataclasses.dataclass
class ClassificationSet:
    """Items of one split: ``refs[i]`` opened by ``store``, label ``labels[i]`` (index into ``classes``)."""

    classes: list[str]
    refs: list[Any]
    labels: list[int]
    domains: list[str]
    store: Any
    problems: list[str] = dataclasses.field(default_factory=list)

    def __len__(self) -> int:
        return len(self.refs)

    def subset(self, keep: Sequence[int]) -> ClassificationSet:
        return ClassificationSet(
            self.classes,
            [self.refs[i] for i in keep],
            [self.labels[i] for i in keep],
            [self.domains[i] for i in keep],
            self.store,
            list(self.problems),
        )

    def extend(self, other: ClassificationSet) -> ClassificationSet:
        """This set followed by ``other`` (same classes and image store: splits of one dataset)."""
        if other.classes != self.classes:
            raise ValueError(f"cannot join sets with different classes: {self.classes} vs {other.classes}")
        return ClassificationSet(
            self.classes,
            self.refs + other.refs,
            self.labels + other.labels,
            self.domains + other.domains,
            self.store,
            self.problems + other.problems,
        )


# ============================================================================ STL-10
def decode_stl10_images(raw: bytes, path: str = "") -> np.ndarray:
    """The official column-major bytes -> uint8 ``[N, 96, 96, 3]`` (H, W, C) images."""
    per = 3 * STL10_SIZE * STL10_SIZE
    if len(raw) % per:
        raise ValueError(f"{path}: {len(raw)} bytes is not a whole number of 3x96x96 images (truncated file?)")
    arr = np.frombuffer(raw, dtype=np.uint8).reshape(-1, 3, STL10_SIZE, STL10_SIZE)  # [N, C, x, y]
    return np.ascontiguousarray(arr.transpose(0, 3, 2, 1))  # [N, y, x, C]


def encode_stl10_images(images: np.ndarray) -> bytes:
    """uint8 ``[N, 96, 96, 3]`` -> the official layout (the inverse of :func:`decode_stl10_images`; for tests)."""
    return np.ascontiguousarray(np.asarray(images, dtype=np.uint8).transpose(0, 3, 2, 1)).tobytes()


def read_stl10(root: str | os.PathLike, split: str) -> ClassificationSet:
    """``{split}_X.bin`` / ``{split}_y.bin`` under ``root`` (the unlabelled split has no labels: not readable)."""
    root = Path(root)
    xp, yp = root / f"{split}_X.bin", root / f"{split}_y.bin"
    for p in (xp, yp):
        if not p.is_file():
            raise FileNotFoundError(f"STL-10 {split}: missing {p}")
    images = decode_stl10_images(xp.read_bytes(), str(xp))
    labels = np.frombuffer(yp.read_bytes(), dtype=np.uint8).astype(np.int64)
    if len(labels) != len(images):
        raise ValueError(f"STL-10 {split}: {xp} holds {len(images)} images but {yp} {len(labels)} labels")
    names_file = root / "class_names.txt"
    classes = [c.strip() for c in names_file.read_text().splitlines() if c.strip()] if names_file.is_file() else []
    classes = classes or list(STL10_CLASSES)
    bad = np.flatnonzero((labels < 1) | (labels > len(classes)))
    if len(bad):
        raise ValueError(f"{yp}: label {labels[bad[0]]} at row {bad[0]} outside 1..{len(classes)}")
    n = len(images)
    return ClassificationSet(classes, list(range(n)), (labels - 1).tolist(), ["stl10"] * n, ArrayStore(images, str(xp)))


# ============================================================================ folders
def _class_folders(folder: Path) -> dict[str, list[Path]]:
    out = {}
    for d in sorted(p for p in folder.iterdir() if p.is_dir()):
        files = sorted(f for f in d.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS)
        if files:
            out[d.name] = files
    return out


def _from_folders(
    root: Path, parts: Sequence[tuple[str, Path]], classes: Sequence[str] | None = None
) -> ClassificationSet:
    """Items of the ``(domain, folder-of-class-folders)`` parts; class list = given or the sorted union."""
    found = [(dom, _class_folders(folder)) for dom, folder in parts]
    names = list(classes) if classes is not None else sorted({c for _, f in found for c in f})
    index = {c: i for i, c in enumerate(names)}
    refs, labels, domains, problems = [], [], [], []
    for dom, folders in found:
        for cls, files in folders.items():
            if cls not in index:
                problems.append(f"{root}: class folder {cls!r} of {dom} is not among the training classes: skipped")
                continue
            for f in files:
                refs.append(str(f.relative_to(root)))
                labels.append(index[cls])
                domains.append(dom)
    for p in problems:
        log.warning(p)
    return ClassificationSet(names, refs, labels, domains, ImageStore(root), problems)


def office31_domain_folder(root: Path, domain: str) -> Path:
    folder = root / domain
    if (folder / "images").is_dir():
        folder = folder / "images"
    if not folder.is_dir():
        raise FileNotFoundError(f"Office-31: no folder for domain {domain!r} under {root}")
    return folder


def read_office31(
    root: str | os.PathLike, domains: Sequence[str], all_domains: Sequence[str] = OFFICE31_DOMAINS
) -> ClassificationSet:
    """Images of ``domains``; classes are the union over ``all_domains`` present, so labels agree between splits."""
    root = Path(root)
    present = [d for d in all_domains if (root / d).is_dir()]
    classes = sorted({c for d in present for c in _class_folders(office31_domain_folder(root, d))})
    return _from_folders(root, [(d, office31_domain_folder(root, d)) for d in domains], classes)


def imagefolder_splits(root: str | os.PathLike) -> dict[str, Path]:
    """``{split: folder}``: ``root/{train,val,test}`` when present, else the whole ``root`` as ``train``."""
    root = Path(root)
    found = {s: root / s for s in ("train", "val", "test") if (root / s).is_dir()}
    return found or {"train": root}


def read_imagefolder(root: str | os.PathLike, split: str) -> ClassificationSet:
    root = Path(root)
    splits = imagefolder_splits(root)
    if split not in splits:
        raise FileNotFoundError(f"ImageFolder {root}: no {split!r} folder")
    classes = sorted(_class_folders(splits["train"])) if "train" in splits else None
    return _from_folders(root, [(split, splits[split])], classes)


# ============================================================================ the synthetic set
def read_synthetic(root: str | os.PathLike, split: str, domains: Sequence[str] | None = None) -> ClassificationSet:
    """``{split}_scenes.jsonl`` rows whose domain is in ``domains`` (all when None); images read from the shards."""
    from data_prep.sources.synthetic import SHAPES

    root = Path(root)
    path = root / f"{split}_scenes.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"synthetic set: missing {path} (python -m data_prep synthetic)")
    index = {c: i for i, c in enumerate(SHAPES)}
    refs, labels, doms, problems = [], [], [], []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            label, dom = row["label"], row.get("scene", {}).get("domain", "plain")
            ref = f"{row['shard']}/{row['key']}.jpg"
            if label not in index:
                raise ValueError(f"unknown label {label!r}")
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            problems.append(f"{path}:{n}: {type(exc).__name__}: {exc}")
            continue
        if domains is not None and dom not in domains:
            continue
        refs.append(ref)
        labels.append(index[label])
        doms.append(dom)
    for p in problems:
        log.warning("skipped row: %s", p)
    return ClassificationSet(list(SHAPES), refs, labels, doms, ImageStore(root), problems)
