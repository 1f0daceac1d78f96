"""``python -m data_prep synthetic``: write the built-in synthetic set as train/val/test shard sets.

Layout under ``out.dir`` (see docs/synthetic.md)::

    train/00000.tar ... manifest.json     one shard set per split (data_prep.shards layout)
    val/...  test/...
    {split}_retrieval.json                Karpathy-style list: image, key, caption (5), image_id, ...
    {split}_scenes.jsonl                  one line per image: key, image_id, label, captions, scene

The scenes file is what downstream tasks (VQA, NLVR2, SNLI-VE, grounding, classification) derive their
annotations from, with the helpers in :mod:`data_prep.sources.synthetic`. Same config, same bytes: every image
is seeded from ``(seed, split, index)`` and the shard writer is deterministic.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from collections.abc import Iterator, Sequence
from typing import Any

from launch.config import ConfigError, load_config, to_dict
from launch.logging import announce_run_folder, get_logger, setup_logging

from .schema import MANIFEST_NAME, SHARD_NAME, sample_key
from .shards import write_shards
from .sources.base import Record
from .sources.synthetic import DOMAINS, WebCaptions, iter_records

SPLITS = ("train", "val", "test")
RETRIEVAL_NAME = "{split}_retrieval.json"
SCENES_NAME = "{split}_scenes.jsonl"
# Build-config keys that change what a split folder holds; a rerun into the same folder must keep them.
_CONTENT_KEYS = (
    "seed", "domain", "num_images", "num_captions", "image_size", "samples_per_shard", "jpeg_quality", "web",
)  # fmt: skip

log = get_logger("data_prep.synthetic")


@dataclasses.dataclass
class OutConfig:
    dir: str = "data/synthetic"
    image_size: int = 128
    samples_per_shard: int = 250
    jpeg_quality: int = 95


@dataclasses.dataclass
class SplitsConfig:
    """Number of images per split; 0 skips the split."""

    train: int = 2000
    val: int = 200
    test: int = 200


@dataclasses.dataclass
class WebConfig:
    """Web-like captions (partial, distractor words, mismatched pairs, length spread), rates in [0, 1]; applied to
    ``splits`` only, so evaluation keeps the exhaustive, correct captions. All zero: the captions are unchanged."""

    partial: float = 0.0
    distractor: float = 0.0
    mismatch: float = 0.0
    length_spread: float = 0.0
    splits: tuple[str, ...] = ("train",)

    def captions(self) -> WebCaptions:
        return WebCaptions(self.partial, self.distractor, self.mismatch, self.length_spread)


@dataclasses.dataclass
class SyntheticConfig:
    out: OutConfig = dataclasses.field(default_factory=OutConfig)
    splits: SplitsConfig = dataclasses.field(default_factory=SplitsConfig)
    seed: int = 0
    workers: int = 2
    # One of data_prep.sources.synthetic.DOMAINS, or null to draw the domain per image (a mixed set).
    domain: str | None = None
    captions_per_image: int = 5
    progress: bool = False
    web: WebConfig = dataclasses.field(default_factory=WebConfig)

    def validate(self) -> None:
        if self.out.image_size < 16:
            raise ConfigError(f"out.image_size: must be >= 16, got {self.out.image_size}")
        if self.out.samples_per_shard < 1:
            raise ConfigError(f"out.samples_per_shard: must be >= 1, got {self.out.samples_per_shard}")
        if not 1 <= self.out.jpeg_quality <= 100:
            raise ConfigError(f"out.jpeg_quality: must be in 1..100, got {self.out.jpeg_quality}")
        for split in SPLITS:
            if getattr(self.splits, split) < 0:
                raise ConfigError(f"splits.{split}: must be >= 0, got {getattr(self.splits, split)}")
        if self.workers < 0:
            raise ConfigError(f"workers: must be >= 0, got {self.workers}")
        if self.domain is not None and self.domain not in DOMAINS:
            raise ConfigError(f"domain: {self.domain!r} is not one of {sorted(DOMAINS)} (or null for a mix)")
        if not 1 <= self.captions_per_image <= 10:
            raise ConfigError(f"captions_per_image: must be in 1..10, got {self.captions_per_image}")
        try:
            self.web.captions().validate()
        except ValueError as exc:
            raise ConfigError(f"web.{exc}") from exc
        bad = [s for s in self.web.splits if s not in SPLITS]
        if bad:
            raise ConfigError(f"web.splits: {bad} are not among {list(SPLITS)}")


def _web_for(cfg: SyntheticConfig, split: str) -> WebCaptions | None:
    web = cfg.web.captions()
    return web if web.active and split in cfg.web.splits else None


def _write_atomic(path: str, data: bytes) -> None:
    """Write via a temp file and rename, so a reader never sees half a json file."""
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "wb") as fh:
        fh.write(data)
    os.replace(tmp, path)


def _split_config(cfg: SyntheticConfig, split: str) -> dict[str, Any]:
    return {
        "split": split,
        "seed": cfg.seed,
        "domain": cfg.domain,
        "num_images": getattr(cfg.splits, split),
        "num_captions": cfg.captions_per_image,
        "image_size": cfg.out.image_size,
        "samples_per_shard": cfg.out.samples_per_shard,
        "jpeg_quality": cfg.out.jpeg_quality,
        # Only a web-like split records its knobs, so folders built before the knobs existed still resume.
        **({"web": dataclasses.asdict(web)} if (web := _web_for(cfg, split)) else {}),
    }


def _check_existing(split_dir: str, build: dict[str, Any]) -> None:
    """Refuse to resume into a folder built from other content settings (its shards would be skipped, stale)."""
    path = os.path.join(split_dir, MANIFEST_NAME)
    if not os.path.exists(path):
        return
    try:
        with open(path, encoding="utf-8") as fh:
            old = json.load(fh).get("build_config", {})
    except (OSError, ValueError) as exc:
        raise ConfigError(f"out.dir: cannot read {path}: {exc}; delete the folder to rebuild") from exc
    diff = [k for k in _CONTENT_KEYS if old.get(k) != build.get(k)]
    if diff:
        raise ConfigError(
            f"out.dir: {split_dir} was built with different settings ("
            + ", ".join(f"{k}: {old.get(k)!r} vs {build.get(k)!r}" for k in diff)
            + "); use a new out.dir or delete it"
        )


def _collecting(records: Iterator[Record], sink: list[Record]) -> Iterator[Record]:
    """Pass records through, keeping a copy without the image for the json files."""
    for rec in records:
        sink.append(dataclasses.replace(rec, data=None))
        yield rec


def build_split(cfg: SyntheticConfig, split: str) -> dict[str, Any]:
    """Write one split's shards, retrieval json and scenes jsonl; returns a short summary."""
    num = getattr(cfg.splits, split)
    split_dir = os.path.join(cfg.out.dir, split)
    build = _split_config(cfg, split)
    _check_existing(split_dir, build)
    kept: list[Record] = []
    records = iter_records(
        num,
        cfg.seed,
        split=split,
        image_size=cfg.out.image_size,
        domain=cfg.domain,
        num_captions=cfg.captions_per_image,
        web=_web_for(cfg, split),
    )
    t0 = time.time()
    summary = write_shards(
        _collecting(records, kept),
        split_dir,
        image_size=cfg.out.image_size,
        resize_mode="keep_ratio",  # images are rendered square at the target size: no resampling happens
        samples_per_shard=cfg.out.samples_per_shard,
        workers=cfg.workers,
        source="synthetic",
        build_config=build,
        jpeg_quality=cfg.out.jpeg_quality,
        progress=cfg.progress,
    )
    if summary.errors or summary.total_samples != num:
        detail = "; ".join(summary.errors) or f"{summary.total_samples} of {num} samples written"
        raise RuntimeError(f"synthetic split {split!r} incomplete in {split_dir}: {detail}; rerun to finish it")
    sps = cfg.out.samples_per_shard
    retrieval, scenes = [], []
    for i, rec in enumerate(kept):
        shard, index = divmod(i, sps)
        key = sample_key(shard, index, sps)
        shard_name = SHARD_NAME.format(shard=shard)
        retrieval.append(
            {
                "image": f"{split}/{shard_name}/{key}.jpg",
                "key": key,
                "shard": f"{split}/{shard_name}",
                "caption": list(rec.captions),
                "image_id": i,
                "orig_id": rec.orig_id,
            }
        )
        scenes.append(
            {
                "key": key,
                "image_id": i,
                "orig_id": rec.orig_id,
                "shard": f"{split}/{shard_name}",
                "label": rec.extra["label"],
                "captions": list(rec.captions),
                "scene": rec.extra["scene"],
            }
        )
    _write_atomic(
        os.path.join(cfg.out.dir, RETRIEVAL_NAME.format(split=split)),
        (json.dumps(retrieval, indent=1) + "\n").encode("utf-8"),
    )
    _write_atomic(
        os.path.join(cfg.out.dir, SCENES_NAME.format(split=split)),
        "".join(json.dumps(s, sort_keys=True) + "\n" for s in scenes).encode("utf-8"),
    )
    return {
        "split": split,
        "images": num,
        "shards": summary.total_shards,
        "written": summary.shards_written,
        "skipped": summary.shards_skipped,
        "seconds": round(time.time() - t0, 2),
    }


def run(cfg: SyntheticConfig) -> list[dict[str, Any]]:
    """Build every split with a positive size; returns one summary per split."""
    os.makedirs(cfg.out.dir, exist_ok=True)
    out = []
    for split in SPLITS:
        if getattr(cfg.splits, split) > 0:
            res = build_split(cfg, split)
            log.info(
                "%s: %d images in %d shards (%d written, %d already done) in %.1f s",
                split,
                res["images"],
                res["shards"],
                res["written"],
                res["skipped"],
                res["seconds"],
            )
            out.append(res)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: ``python -m data_prep synthetic --config configs/data_prep/synthetic.yaml [key=value ...]``."""
    parser = argparse.ArgumentParser(
        prog="python -m data_prep synthetic",
        description=__doc__.split("\n")[0],
        epilog="recipe keys and files: docs/synthetic.md",
    )
    parser.add_argument("--config", help="YAML recipe (configs/data_prep/synthetic.yaml)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. out.dir=data/syn splits.train=500")
    args = parser.parse_args(argv)
    setup_logging()
    try:
        cfg = load_config(SyntheticConfig, args.config, args.overrides)
        announce_run_folder(cfg.out.dir, "output folder")
        log.info("config: %s", json.dumps(to_dict(cfg)))
        run(cfg)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    except RuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
