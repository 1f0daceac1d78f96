"""Existing webdataset shards as input (img2dataset output, or our own shards): re-decoded and re-sharded.

Tars are streamed member by member (never extracted to disk); members are grouped into samples by key (the name
up to the first dot of the base name). Captions come from the json's ``captions`` list, else the ``.txt``, else the
json's ``caption``. ``orig_id`` is the json's ``orig_id`` or ``key``, else the tar key. Other json fields (``url``,
region boxes, ...) are kept, minus img2dataset's bookkeeping (status, error_message, exif, hashes, sizes).
"""

from __future__ import annotations

import os
import tarfile
from collections.abc import Iterator
from typing import Any

from launch.config import ConfigError, expand_shards

from ..schema import IMAGE_EXTS, captions_of, meta_of
from .base import Problem, Record

DROP_KEYS = {
    "captions", "caption", "key", "status", "error_message", "exif", "sha256", "md5", "width", "height",
    "original_width", "original_height", "orig_width", "orig_height", "source", "orig_id",
}  # fmt: skip


def _split_name(name: str) -> tuple[str, str]:
    base = os.path.basename(name)
    stem, _, ext = base.partition(".")
    prefix = os.path.dirname(name)
    return (f"{prefix}/{stem}" if prefix else stem), ext.lower()


def iter_samples(tar_path: str) -> Iterator[tuple[str, dict[str, bytes]]]:
    """``(key, {ext: bytes})`` per sample of one tar, in file order; raises tarfile.ReadError on a corrupt tar."""
    current: str | None = None
    sample: dict[str, bytes] = {}
    with tarfile.open(tar_path, mode="r|*") as tar:
        for member in tar:
            if not member.isfile():
                continue
            key, ext = _split_name(member.name)
            if not ext:
                continue
            if key != current and current is not None:
                yield current, sample
                sample = {}
            current = key
            fh = tar.extractfile(member)
            sample[ext] = fh.read() if fh is not None else b""
    if current is not None:
        yield current, sample


def iter_records(cfg: Any) -> Iterator[Record | Problem]:
    paths = expand_shards(cfg.shards)
    if not paths:
        raise ConfigError(f"source.shards: no shard files match {cfg.shards!r}")
    for tar_path in paths:
        try:
            for key, sample in iter_samples(tar_path):
                img_ext = next((e for e in IMAGE_EXTS if e in sample), None)
                if img_ext is None:
                    yield Problem(tar_path, key, "missing image")
                    continue
                captions = captions_of(sample)
                if not captions:
                    yield Problem(tar_path, key, "empty caption")
                    continue
                meta = meta_of(sample)
                orig_id = meta.get("orig_id", meta.get("key", key))
                extra = {k: v for k, v in meta.items() if k not in DROP_KEYS}
                yield Record(orig_id=str(orig_id), captions=captions, data=sample[img_ext], extra=extra)
        except (tarfile.TarError, OSError, EOFError) as exc:
            yield Problem(tar_path, "tar", f"corrupt tar ({type(exc).__name__})")
