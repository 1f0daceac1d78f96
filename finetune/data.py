"""Annotation-driven fine-tuning data: retrieval json readers, an image store (folders or our shards), loaders.

Annotation formats read by :func:`read_annotations` (detected from the file's shape):

* ALBEF/BLIP/LAVIS retrieval lists: train rows ``{"image": rel_path, "caption": str, "image_id": any}`` (one row per
  caption; rows of one ``image_id`` form one image), eval rows ``{"image": rel_path, "caption": [str, ...]}``;
* the synthetic set's ``{split}_retrieval.json`` (the eval-row shape with an ``image_id``; docs/synthetic.md);
* Karpathy's ``dataset_coco.json`` / ``dataset_flickr30k.json``: ``{"images": [{"filepath"?, "filename",
  "split", "sentences": [{"raw"}]}]}``, filtered by split (``train`` also takes ``restval``, as ALBEF's files do).

An ``image`` value is a path relative to the image root, or ``<shard>.tar/<member>`` (e.g.
``val/00000.tar/000000001.jpg``): :class:`ImageStore` indexes each tar once (member name -> byte offset and size)
and reads a member's bytes by offset; nothing is extracted to disk. A reference that leaves the image root
(``../x.jpg``, ``/abs/x.jpg``) fails as ``outside the image root`` (``data_prep.paths``), like any unreadable
image. A malformed row or a missing/corrupt image is reported with its file and row (or path) and skipped; the
rest keeps flowing.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import math
import os
import tarfile
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from data_prep.paths import PathError, resolve_in_root
from data_prep.transforms import pre_caption
from pretrain.data import ignore_job_signals
from pretrain.resumable import ResumableLoader

log = logging.getLogger("vlp.finetune.data")

SPLIT_ALIASES = {"train": ("train", "restval"), "val": ("val",), "test": ("test",)}
TAR_MARK = ".tar/"


class ImageError(RuntimeError):
    """An image that cannot be read or decoded (the message names its path)."""


# ============================================================================ annotations
@dataclasses.dataclass
class Entry:
    """One image and its captions."""

    image: str
    captions: list[str]
    key: Any  # the annotation's image id (or the image path when there is none)


@dataclasses.dataclass
class RetrievalSplit:
    """Images, their captions flattened to ``texts``, and the ground truth both ways."""

    images: list[str]
    texts: list[str]
    img2txt: list[list[int]]
    txt2img: list[int]
    problems: list[str] = dataclasses.field(default_factory=list)

    @classmethod
    def from_entries(cls, entries: Sequence[Entry], problems: list[str] | None = None) -> RetrievalSplit:
        images, texts, img2txt, txt2img = [], [], [], []
        for i, e in enumerate(entries):
            images.append(e.image)
            img2txt.append(list(range(len(texts), len(texts) + len(e.captions))))
            texts.extend(e.captions)
            txt2img.extend([i] * len(e.captions))
        return cls(images, texts, img2txt, txt2img, list(problems or []))

    def drop_images(self, bad: Sequence[int]) -> RetrievalSplit:
        """A new split without images ``bad`` (and their captions)."""
        drop = set(bad)
        keep = [i for i in range(len(self.images)) if i not in drop]
        entries = [Entry(self.images[i], [self.texts[t] for t in self.img2txt[i]], i) for i in keep]
        return RetrievalSplit.from_entries(entries, self.problems)

    @property
    def captions_per_image(self) -> float:
        return len(self.texts) / max(1, len(self.images))


def _load_json(path: str | os.PathLike) -> Any:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"annotation file not found: {p}")
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{p}: not valid JSON ({exc})") from exc


def _clean(raw: Any, max_words: int) -> str | None:
    if not isinstance(raw, str):
        return None
    text = pre_caption(raw, max_words)
    return text or None


def _karpathy_entries(path: str, data: dict[str, Any], split: str, max_words: int, problems: list[str]) -> list[Entry]:
    images = data.get("images")
    if not isinstance(images, list):
        raise ValueError(f"{path}: a Karpathy file needs an 'images' list")
    wanted = SPLIT_ALIASES.get(split, (split,))
    out = []
    for row, item in enumerate(images):
        where = f"{path}: images[{row}]"
        if not isinstance(item, dict) or not isinstance(item.get("filename"), str) or "split" not in item:
            problems.append(f"{where}: malformed (needs filename, split, sentences); skipped")
            continue
        if item["split"] not in wanted:
            continue
        sentences = item.get("sentences")
        if not isinstance(sentences, list):
            problems.append(f"{where}: 'sentences' is not a list; skipped")
            continue
        caps = []
        for j, s in enumerate(sentences):
            text = _clean(s.get("raw") if isinstance(s, dict) else None, max_words)
            if text is None:
                problems.append(f"{where}.sentences[{j}]: no usable 'raw' caption; skipped")
            else:
                caps.append(text)
        if not caps:
            problems.append(f"{where}: no usable caption; image skipped")
            continue
        folder = item.get("filepath") or ""
        rel = f"{folder}/{item['filename']}" if folder else item["filename"]
        out.append(Entry(rel, caps, item.get("cocoid", item.get("imgid", rel))))
    return out


def _list_entries(path: str, rows: list[Any], max_words: int, problems: list[str]) -> list[Entry]:
    """ALBEF-style rows; rows with the same ``image_id`` (else the same ``image``) are one image."""
    by_key: dict[Any, Entry] = {}
    for row, item in enumerate(rows):
        where = f"{path}: row {row}"
        if not isinstance(item, dict):
            problems.append(f"{where}: not an object; skipped")
            continue
        image = item.get("image")
        if not isinstance(image, str) or not image:
            problems.append(f"{where}: missing or non-string 'image'; skipped")
            continue
        raw = item.get("caption")
        raws = raw if isinstance(raw, list) else [raw]
        if raw is None or not raws:
            problems.append(f"{where}: missing 'caption'; skipped")
            continue
        caps = []
        for j, r in enumerate(raws):
            text = _clean(r, max_words)
            if text is None:
                problems.append(f"{where}: caption[{j}] is not a usable string; skipped")
            else:
                caps.append(text)
        if not caps:
            continue
        key = item.get("image_id", image)
        if not isinstance(key, (str, int)):
            key = json.dumps(key, sort_keys=True)
        entry = by_key.get(key)
        if entry is None:
            by_key[key] = Entry(image, caps, key)
        elif entry.image != image:
            problems.append(f"{where}: image_id {key!r} already names image {entry.image!r}; row skipped")
        else:
            entry.captions.extend(caps)
    return list(by_key.values())



def scene_rows(path: Path, lines: list[str], problems: list[str]) -> Iterator[tuple[Any, str, int]]:
    """``(scene, image name, image id)`` of each row of a synthetic ``{split}_scenes.jsonl``; bad rows go to
    ``problems`` (file, line, reason) and are skipped."""
    from data_prep.sources.synthetic import scene_from_dict

    for row, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            scene = scene_from_dict(rec["scene"])
            image = f"{rec['shard']}/{rec['key']}.jpg"
            image_id = int(rec["image_id"])
        except (ValueError, KeyError, TypeError) as exc:
            problems.append(f"{path}: line {row + 1}: {exc}; skipped")
            continue
        yield scene, image, image_id

def usable_rows(path: Any, rows: list[Any], problems: list[str], what: str,
                logger: logging.Logger = log) -> tuple[list[Any], list[str]]:  # fmt: skip
    """The end of every annotation reader: log each skipped row's problem on ``logger``; no usable row (``what``,
    e.g. "question") is a :class:`ValueError` naming ``path`` and the first problem. Returns ``(rows, problems)``."""
    for msg in problems:
        logger.warning("%s", msg)
    if not rows:
        raise ValueError(f"{path}: no usable {what} ({len(problems)} problem(s); first: {problems[:1]})")
    return rows, problems


def read_annotations(path: str | os.PathLike, split: str, max_words: int = 30) -> tuple[list[Entry], list[str]]:
    """(entries, problems) of ``split`` in an annotation file of any supported format (see module docstring)."""
    data = _load_json(path)
    problems: list[str] = []
    if isinstance(data, dict):
        entries = _karpathy_entries(str(path), data, split, max_words, problems)
    elif isinstance(data, list):
        entries = _list_entries(str(path), data, max_words, problems)
    else:
        raise ValueError(f"{path}: expected a list of rows or a Karpathy {{'images': [...]}} object")
    return usable_rows(path, entries, problems, f"{split} item")


def load_split(path: str | os.PathLike, split: str, max_words: int = 30) -> RetrievalSplit:
    """An evaluation split (all captions of an image kept together)."""
    entries, problems = read_annotations(path, split, max_words)
    return RetrievalSplit.from_entries(entries, problems)


# ============================================================================ images
class ImageStore:
    """Opens annotation image references: ``root/rel_path`` files or ``root/<shard>.tar/<member>`` tar members.

    Each tar is indexed once per process (regular members only: name -> (data offset, size)); a read seeks to the
    offset and decodes the bytes in memory. Picklable (DataLoader workers rebuild their own index).
    """

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root) if root else Path(".")
        self._index: dict[str, dict[str, tuple[int, int]]] = {}
        self._lock = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:
        return {"root": self.root}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["root"])

    def _tar_index(self, tar_path: Path) -> dict[str, tuple[int, int]]:
        key = str(tar_path)
        with self._lock:
            index = self._index.get(key)
            if index is None:
                index = {}
                with tarfile.open(tar_path, mode="r:") as tf:
                    for m in tf:
                        if m.isreg():
                            index[m.name] = (m.offset_data, m.size)
                self._index[key] = index
        return index

    def _inside(self, ref: str, rel: str) -> Path:
        """``root/rel``, or ImageError ``outside the image root`` for ``../`` or absolute references."""
        try:
            return Path(resolve_in_root(self.root, rel))
        except PathError as exc:
            raise ImageError(f"{ref}: {exc.reason} ({exc.detail})") from exc

    def read_bytes(self, ref: str) -> bytes:
        """The encoded bytes of ``ref`` (raises :class:`ImageError` naming the path)."""
        if TAR_MARK in ref:
            shard, member = ref.split(TAR_MARK, 1)
            tar_path = self._inside(ref, shard + ".tar")
            try:
                index = self._tar_index(tar_path)
            except (OSError, tarfile.TarError) as exc:
                raise ImageError(f"{ref}: cannot index shard {tar_path}: {exc}") from exc
            if member not in index:
                raise ImageError(f"{ref}: no member {member!r} in {tar_path}")
            offset, size = index[member]
            with open(tar_path, "rb") as fh:
                fh.seek(offset)
                data = fh.read(size)
            if len(data) != size:
                raise ImageError(f"{ref}: truncated member in {tar_path}")
            return data
        path = self._inside(ref, ref)
        try:
            return path.read_bytes()
        except OSError as exc:
            raise ImageError(f"{ref}: cannot read {path}: {exc.strerror or exc}") from exc

    def open(self, ref: str) -> Image.Image:
        """The decoded RGB image of ``ref`` (raises :class:`ImageError` naming the path)."""
        data = self.read_bytes(ref)
        try:
            with Image.open(io.BytesIO(data)) as img:
                return img.convert("RGB")
        except (OSError, ValueError, Image.DecompressionBombError) as exc:
            raise ImageError(f"{ref}: cannot decode image: {exc}") from exc


# ============================================================================ evaluation images
class EvalImages(Dataset):
    """``(index, tensor or None)`` per image of a split; a failed image is reported and yields None."""

    def __init__(self, refs: Sequence[str], store: ImageStore, transform: Callable[[Image.Image], torch.Tensor]):
        self.refs = list(refs)
        self.store = store
        self.transform = transform

    def __len__(self) -> int:
        return len(self.refs)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor | None, str]:
        try:
            return i, self.transform(self.store.open(self.refs[i])), ""
        except ImageError as exc:
            return i, None, str(exc)


def _collate_eval(items: list[tuple[int, torch.Tensor | None, str]]) -> dict[str, Any]:
    ok = [(i, x) for i, x, _ in items if x is not None]
    return {
        "index": [i for i, _ in ok],
        "image": torch.stack([x for _, x in ok]) if ok else None,
        "failed": [(i, err) for i, x, err in items if x is None],
    }


def eval_image_batches(
    refs: Sequence[str],
    store: ImageStore,
    transform: Callable,
    batch_size: int,
    num_workers: int = 0,
    desc: str = "eval images",
) -> Iterator[dict[str, Any]]:
    """Batches ``{"index", "image", "failed"}`` over ``refs`` in order (failed images reported, not raised).

    Rank 0 shows a tqdm bar (images and img/s): evaluation of a large split takes minutes.
    """
    from tqdm import tqdm

    from launch.logging import is_rank0

    loader = DataLoader(
        EvalImages(refs, store, transform),
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=_collate_eval,
    )
    with tqdm(total=len(refs), desc=desc, unit="img", disable=not is_rank0(), dynamic_ncols=True) as bar:
        for batch in loader:
            yield batch
            bar.update(len(batch["index"]) + len(batch["failed"]))


# ============================================================================ training loader
class _CaptionDataset(Dataset):
    """Sample ``i`` of the caption rows; an unreadable image is reported and replaced by the next readable row."""

    def __init__(self, rows, images, store, transform, seed: int, max_tries: int = 16) -> None:
        self.rows = rows  # list of (image index, caption, image id)
        self.images = images
        self.store = store
        self.transform = transform
        self.seed = seed
        self.max_tries = max_tries
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, Any]:
        problems = []
        for t in range(self.max_tries):
            j = (i + t) % len(self.rows)
            img_idx, caption, image_id = self.rows[j]
            gen = torch.Generator().manual_seed((self.seed * 1_000_003 + self.epoch) * 10_000_019 + j)
            try:
                image = self.transform(self.store.open(self.images[img_idx]), gen)
            except ImageError as exc:
                problems.append(str(exc))
                continue
            return {"image": image, "text": caption, "image_id": image_id, "problems": problems}
        raise RuntimeError(f"{self.max_tries} consecutive unreadable images from row {i}: {problems[-3:]}")


def _collate_train(items: list[dict[str, Any]]) -> dict[str, Any]:
    problems = [p for it in items for p in it["problems"]]
    return {
        "image": torch.stack([it["image"] for it in items]),
        "text": [it["text"] for it in items],  # a list: MixGen writes into it
        "image_id": torch.tensor([it["image_id"] for it in items], dtype=torch.long),
        "skipped": len(problems),
        "problems": problems,
    }


class CaptionLoader(ResumableLoader):
    """Training batches of (image, caption, image id) rows for the shared engine.

    Each epoch is a permutation seeded by ``(seed, epoch)``, cut to whole global batches (``drop_last``) and dealt
    to ranks like a ``DistributedSampler``; batch ``b`` of rank ``r`` holds permutation positions
    ``[(b * world + r) * B, ... + B)``. ``iter()`` yields the rest of the current epoch, then advances it. The
    position (:class:`pretrain.resumable.ResumableLoader`: epoch and batches consumed) resumes exactly;
    ``steps_per_epoch`` is batches per rank. Augmentation draws come from a generator seeded by (seed, epoch, row),
    so they do not depend on workers.
    """

    def __init__(
        self,
        entries: Sequence[Entry],
        store: ImageStore,
        transform: Callable,
        *,
        batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        ids = {e.key: n for n, e in enumerate(entries)}  # image ids remapped to 0..N-1, as ALBEF does
        rows = [(n, cap, ids[e.key]) for n, e in enumerate(entries) for cap in e.captions]
        self.images = [e.image for e in entries]
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.rank, self.world_size = rank, world_size
        self.num_workers = num_workers
        self.num_rows = len(rows)
        self.steps_per_epoch = self.num_rows // (self.batch_size * world_size)
        if self.steps_per_epoch < 1:
            raise ValueError(
                f"training set has {self.num_rows} captions, fewer than one global batch "
                f"({self.batch_size} x {world_size} ranks)"
            )
        self.dataset = _CaptionDataset(rows, self.images, store, transform, self.seed)

    def fingerprint(self) -> dict[str, int]:
        return {"rows": self.num_rows, "batch_size": self.batch_size, "world_size": self.world_size, "seed": self.seed}

    def batch_indices(self, epoch: int) -> list[list[int]]:
        """This rank's row indices per batch of ``epoch``."""
        perm = torch.randperm(self.num_rows, generator=torch.Generator().manual_seed(self.seed * 7919 + epoch))
        b, w = self.batch_size, self.world_size
        r = self.rank
        return [perm[(s * w + r) * b : (s * w + r + 1) * b].tolist() for s in range(self.steps_per_epoch)]

    def __len__(self) -> int:
        return self.steps_per_epoch

    def batches(self, epoch: int, step: int) -> Iterator[dict[str, Any]]:
        self.dataset.epoch = epoch
        yield from DataLoader(
            self.dataset,
            batch_sampler=self.batch_indices(epoch)[step:],
            num_workers=self.num_workers,
            collate_fn=_collate_train,
            persistent_workers=False,
            worker_init_fn=ignore_job_signals if self.num_workers > 0 else None,
        )

    def on_batch(self, batch: dict[str, Any]) -> None:
        for p in batch.pop("problems"):
            log.warning("skipped training image: %s", p)
        super().on_batch(batch)


def rank_blocks(n: int, block: int, rank: int, world: int) -> list[range]:
    """The row blocks of ``n`` rows that ``rank`` handles: global blocks ``[b*block, (b+1)*block)`` dealt
    round-robin, so every block is computed the same way whatever the world size (bitwise-equal results)."""
    blocks = math.ceil(n / block)
    return [range(b * block, min(n, (b + 1) * block)) for b in range(rank, blocks, max(1, world))]
