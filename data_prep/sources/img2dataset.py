"""Existing webdataset shards as input (img2dataset output, or our own shards): re-decoded and re-sharded.

Tars are read by :mod:`data_prep.tar_reader` (streamed, never extracted; members grouped into samples by key, the
name up to the first dot of the base name; a damaged tar keeps the samples before the damage). Captions come from
the json's ``captions`` list, else the ``.txt``, else the
json's ``caption``. ``orig_id`` is the json's ``orig_id`` or ``key``, else the tar key. Other json fields (``url``,
region boxes, ...) are kept, minus img2dataset's bookkeeping (status, error_message, exif, hashes, sizes).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from launch.config import ConfigError, expand_shards

from ..schema import IMAGE_EXTS, captions_of, meta_of
from ..tar_reader import TarDamaged, iter_tar_samples
from .base import Problem, Record

DROP_KEYS = {
    "captions", "caption", "key", "status", "error_message", "exif", "sha256", "md5", "width", "height",
    "original_width", "original_height", "orig_width", "orig_height", "source", "orig_id",
}  # fmt: skip


def iter_records(cfg: Any) -> Iterator[Record | Problem]:
    paths = expand_shards(cfg.shards)
    if not paths:
        raise ConfigError(f"source.shards: no shard files match {cfg.shards!r}")
    for tar_path in paths:
        try:
            for key, sample in iter_tar_samples(tar_path):
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
        except TarDamaged as exc:
            yield Problem(tar_path, "tar", f"corrupt tar ({type(exc.cause).__name__})")
