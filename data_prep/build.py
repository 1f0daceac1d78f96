"""``python -m data_prep build``: the build recipe schema, source dispatch and the command.

A recipe (``configs/data_prep/<format>.yaml``) names a ``source.format`` and its files; every path is checked
before any worker starts (a missing file is a :class:`~launch.config.ConfigError` naming the key).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import os
import sys
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Literal

from launch.config import ConfigError, exists_field, load_config, shards_field, to_dict
from launch.logging import announce_run_folder

from .download import DownloadOptions
from .images import DEFAULT_MAX_PIXELS, RESIZE_MODES
from .sources.base import Problem, Record

if TYPE_CHECKING:
    from .shards import BuildSummary

FORMATS = ("coco", "vg", "sbu", "cc3m", "jsonlist", "img2dataset", "synthetic")
# Which source keys each format needs (all others are ignored for that format).
REQUIRED: dict[str, tuple[str, ...]] = {
    "coco": ("annotations", "images"),
    "vg": ("regions", "images"),
    "sbu": ("annotations",),
    "cc3m": ("tsv",),
    "jsonlist": ("annotations",),
    "img2dataset": ("shards",),
    "synthetic": (),
}
URL_FORMATS = ("sbu", "cc3m", "jsonlist")  # formats whose records may carry URLs; source.images is their cache
PATH_KEYS = ("annotations", "images", "regions", "image_data", "tsv", "shards")  # recorded in each done-marker


@dataclasses.dataclass
class SourceConfig:
    """Where the raw dataset is; which keys apply depends on ``format`` (see ``REQUIRED``)."""

    format: Literal["coco", "vg", "sbu", "cc3m", "jsonlist", "img2dataset", "synthetic"] = "coco"
    annotations: str | None = exists_field(None)  # coco captions/Karpathy json, sbu json, jsonlist json(l)
    images: str | None = None  # image root (coco, vg, jsonlist); cache of downloaded originals (sbu, cc3m)
    regions: str | None = exists_field(None)  # vg region_descriptions.json
    image_data: str | None = exists_field(None)  # vg image_data.json (optional)
    tsv: str | None = exists_field(None)  # cc3m caption<TAB>url file
    shards: str | None = shards_field(None)  # img2dataset: existing shards to re-shard
    num_images: int = 1000  # synthetic
    seed: int = 0  # synthetic
    split: str | None = None  # coco Karpathy split filter ("train" includes restval); synthetic split name

    def validate(self) -> None:
        for key in REQUIRED[self.format]:
            if getattr(self, key) in (None, ""):
                raise ConfigError(f"source.{key}: required for source.format={self.format}")
        if self.format in ("coco", "vg") and not os.path.isdir(self.images or ""):
            raise ConfigError(f"source.images: image folder does not exist: {self.images}")
        if self.format == "jsonlist" and self.images and not os.path.isdir(self.images):
            raise ConfigError(f"source.images: image folder does not exist: {self.images}")
        if self.format == "synthetic" and self.num_images < 1:
            raise ConfigError("source.num_images: must be >= 1")


@dataclasses.dataclass
class OutConfig:
    """Where and how shards are written."""

    dir: str = "data/shards"
    image_size: int = 256
    resize_mode: Literal["keep_ratio", "center_crop", "pad"] = "keep_ratio"
    samples_per_shard: int = 10000
    jpeg_quality: int = 95
    max_pixels: int = DEFAULT_MAX_PIXELS  # decompression-bomb guard: larger images are refused

    def validate(self) -> None:
        if self.image_size < 8:
            raise ConfigError("out.image_size: must be >= 8")
        if self.resize_mode not in RESIZE_MODES:
            raise ConfigError(f"out.resize_mode: must be one of {RESIZE_MODES}")
        if self.samples_per_shard < 1:
            raise ConfigError("out.samples_per_shard: must be >= 1")
        if not 1 <= self.jpeg_quality <= 100:
            raise ConfigError("out.jpeg_quality: must be in [1, 100]")


@dataclasses.dataclass
class DownloadConfig:
    """Downloader settings for URL sources (sbu, cc3m, jsonlist items with URLs)."""

    timeout: float = 10.0  # seconds per attempt (socket and total transfer)
    retries: int = 2  # extra attempts for timeouts, connection errors, HTTP 408/429/5xx
    backoff: float = 1.0  # seconds before the first retry, doubled each time
    threads: int = 32  # concurrent downloads per worker process
    per_host: int = 4  # at most this many requests in flight to one host, per worker process
    max_bytes: int = 20_000_000  # size cap per file
    keep: bool = False  # save fetched originals into source.images (as sha1(url)) for later rebuilds

    def validate(self) -> None:
        if self.timeout <= 0 or self.threads < 1 or self.per_host < 1 or self.max_bytes < 1 or self.retries < 0:
            raise ConfigError("download: timeout, threads, per_host, max_bytes must be > 0 and retries >= 0")


@dataclasses.dataclass
class BuildConfig:
    """The ``data_prep build`` recipe."""

    source: SourceConfig = dataclasses.field(default_factory=SourceConfig)
    out: OutConfig = dataclasses.field(default_factory=OutConfig)
    download: DownloadConfig = dataclasses.field(default_factory=DownloadConfig)
    workers: int = 2  # worker processes, each building whole shards; 0 = in this process
    progress: bool = True

    def validate(self) -> None:
        self.source.validate()
        self.out.validate()
        self.download.validate()
        if self.workers < 0:
            raise ConfigError("workers: must be >= 0")


def iter_source(cfg: BuildConfig) -> Iterator[Record | Problem]:
    """The reader of ``cfg.source.format``."""
    src = cfg.source
    if src.format == "synthetic":
        synthetic = importlib.import_module("data_prep.sources.synthetic")
        kwargs = {"num_images": src.num_images, "seed": src.seed, "image_size": cfg.out.image_size}
        if src.split:
            kwargs["split"] = src.split
        return synthetic.iter_records(**kwargs)
    module = importlib.import_module(f"data_prep.sources.{src.format}")
    return module.iter_records(src)


def download_options(cfg: BuildConfig) -> DownloadOptions:
    """The downloader settings of a recipe; for URL sources, source.images is the cache of downloaded originals."""
    d = cfg.download
    cache = cfg.source.images if cfg.source.format in URL_FORMATS else None
    return DownloadOptions(
        timeout=d.timeout,
        retries=d.retries,
        backoff=d.backoff,
        threads=d.threads,
        per_host=d.per_host,
        max_bytes=d.max_bytes,
        cache_dir=cache,
        keep=d.keep and bool(cache),
    )


def run_build(cfg: BuildConfig) -> BuildSummary:
    """Build the shards described by ``cfg``; returns the :class:`~data_prep.shards.BuildSummary`."""
    from launch.dist import detect_env

    from .shards import write_shards  # lazy: keeps --help and config errors fast

    env = detect_env()  # a slurm array / multi-task job: each task builds its own shards

    out = cfg.out
    return write_shards(
        iter_source(cfg),
        out.dir,
        image_size=out.image_size,
        resize_mode=out.resize_mode,
        samples_per_shard=out.samples_per_shard,
        workers=cfg.workers,
        source=cfg.source.format,
        build_config=to_dict(cfg),
        jpeg_quality=out.jpeg_quality,
        download_opts=download_options(cfg),
        progress=cfg.progress,
        max_pixels=out.max_pixels,
        rank=env.rank,
        world_size=env.world_size,
        source_paths=source_paths(cfg),
    )


def source_paths(cfg: BuildConfig) -> dict[str, str]:
    """The recipe's source files and folders of its format (``source.<key>``), as each shard's marker records them."""
    src = cfg.source
    keys = REQUIRED[src.format] + tuple(k for k in PATH_KEYS if k not in REQUIRED[src.format])
    return {f"source.{k}": str(getattr(src, k)) for k in keys if getattr(src, k, None)}


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m data_prep build --config recipe.yaml [key=value ...]``."""
    parser = argparse.ArgumentParser(
        prog="python -m data_prep build",
        description="Build webdataset shards (img2dataset layout) from a dataset recipe.",
        epilog=f"source.format: {' | '.join(FORMATS)}; keys and layout: docs/data_prep.md",
    )
    parser.add_argument("--config", help="YAML recipe, e.g. configs/data_prep/coco.yaml")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. out.dir=data/coco workers=8")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(BuildConfig, args.config, args.overrides)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    announce_run_folder(cfg.out.dir, "output folder")
    try:
        summary = run_build(cfg)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    print(summary)
    print(f"shards in {cfg.out.dir} (manifest: {os.path.join(cfg.out.dir, 'manifest.json')})")
    return 0 if summary.ok else 1
