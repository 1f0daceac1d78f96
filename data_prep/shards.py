"""Parallel decode → resize → encode → tar writer in img2dataset's webdataset layout; atomic and resumable.

Layout of ``out_dir``::

    00000.tar              {key}.jpg, {key}.json, {key}.txt per sample (members in that order, keys ascending)
    00000_failures.jsonl   one line per input item that produced no sample (index, key, id, file, row, reason)
    00000_stats.json       written LAST: the shard's done-marker (counts, failures by reason, settings)
    manifest.json          shard list with counts, source, build config, schema version

Input item ``i`` (a :class:`Record` or a reader's :class:`Problem`) belongs to shard ``i // samples_per_shard`` at
index ``i % samples_per_shard``; failed items leave a gap in the keys, as in img2dataset. Worker processes each build
whole shards; a rerun skips shards that have a stats file and rebuilds the rest from scratch, so an interrupted
build resumed equals an uninterrupted one byte for byte (tar members carry fixed mtime/uid/gid/mode).
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import glob
import io
import json
import multiprocessing as mp
import os
import tarfile
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from launch.config import ConfigError

from .download import Downloader, DownloadError, DownloadOptions
from .images import DEFAULT_MAX_PIXELS, ImageError, process_image
from .paths import check_member_key
from .schema import MANIFEST_NAME, SCHEMA_VERSION, SHARD_NAME, STATS_NAME, sample_key
from .sources.base import Problem, Record

FAILURES_NAME = "{shard:05d}_failures.jsonl"
TMP_SUFFIX = ".tmp"
# Settings that change shard contents: a rerun into the same folder must use the same ones.
SETTINGS_KEYS = ("image_size", "resize_mode", "samples_per_shard", "jpeg_quality", "source")


def _atomic_write(path: str, data: bytes) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _json_bytes(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, ensure_ascii=False).encode("utf-8")


class ShardWriter:
    """Write one shard to a temporary tar; :meth:`finish` renames it and writes failures, then stats (last).

    Use as a context manager: leaving the block without :meth:`finish` (an error, a kill) leaves no ``.tar`` and
    no stats file, so the shard counts as not done.
    """

    def __init__(self, out_dir: str | os.PathLike, shard_id: int) -> None:
        self.out_dir = os.fspath(out_dir)
        self.shard_id = shard_id
        os.makedirs(self.out_dir, exist_ok=True)
        self.path = os.path.join(self.out_dir, SHARD_NAME.format(shard=shard_id))
        self.tmp_path = self.path + TMP_SUFFIX
        self._fh = open(self.tmp_path, "wb")  # noqa: SIM115 - closed in finish()/__exit__
        self._tar = tarfile.open(fileobj=self._fh, mode="w", format=tarfile.USTAR_FORMAT)
        self.count = 0
        self.finished = False

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        if not self.finished:
            self._close()
            if os.path.exists(self.tmp_path):
                os.remove(self.tmp_path)

    def _add(self, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        info.mtime = 0
        info.mode = 0o444
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        self._tar.addfile(info, io.BytesIO(data))

    def write(self, key: str, jpg: bytes, caption: str, meta: dict[str, Any]) -> None:
        """Append one sample: ``{key}.jpg``, ``{key}.json`` (``meta``), ``{key}.txt`` (``caption``).

        ``key`` must pass :func:`data_prep.paths.check_member_key` (PathError otherwise): member names are built
        from validated keys only, whichever stage writes.
        """
        check_member_key(key)
        self._add(f"{key}.jpg", jpg)
        self._add(f"{key}.json", _json_bytes(meta))
        self._add(f"{key}.txt", caption.encode("utf-8"))
        self.count += 1

    def _close(self) -> None:
        if not self._fh.closed:
            self._tar.close()
            self._fh.flush()
            os.fsync(self._fh.fileno())
            self._fh.close()

    def finish(self, stats: dict[str, Any] | None = None, failures: Iterable[dict[str, Any]] = ()) -> dict[str, Any]:
        """Publish the tar, then ``_failures.jsonl``, then ``_stats.json`` (the done-marker); returns the stats."""
        self._close()
        os.replace(self.tmp_path, self.path)
        lines = b"".join(_json_bytes(f) + b"\n" for f in failures)
        _atomic_write(os.path.join(self.out_dir, FAILURES_NAME.format(shard=self.shard_id)), lines)
        out = dict(stats or {})
        out.setdefault("successes", self.count)
        out["shard"] = self.shard_id
        out["bytes"] = os.path.getsize(self.path)
        _atomic_write(os.path.join(self.out_dir, STATS_NAME.format(shard=self.shard_id)), _json_bytes(out))
        self.finished = True
        return out


def read_stats(out_dir: str | os.PathLike) -> dict[int, dict[str, Any]]:
    """Stats of every finished shard in ``out_dir`` (a stats file with its tar beside it)."""
    out: dict[int, dict[str, Any]] = {}
    for path in sorted(glob.glob(os.path.join(os.fspath(out_dir), "*_stats.json"))):
        name = os.path.basename(path)
        head = name.split("_", 1)[0]
        if not head.isdigit():
            continue
        shard = int(head)
        if not os.path.exists(os.path.join(os.fspath(out_dir), SHARD_NAME.format(shard=shard))):
            continue
        try:
            with open(path, encoding="utf-8") as fh:
                out[shard] = json.load(fh)
        except (OSError, ValueError):
            continue  # unreadable marker: treat the shard as not done, it gets rebuilt
    return out


def done_shards(out_dir: str | os.PathLike) -> set[int]:
    """Ids of shards whose stats file (the done-marker) and tar both exist."""
    return set(read_stats(out_dir))


def write_manifest(
    out_dir: str | os.PathLike, source: str, build_config: dict[str, Any], schema_version: int = SCHEMA_VERSION
) -> dict[str, Any]:
    """Write ``manifest.json`` from the stats files: shard list with counts, totals, source, build config."""
    stats = read_stats(out_dir)
    failures: Counter[str] = Counter()
    shards = []
    for shard in sorted(stats):
        st = stats[shard]
        failures.update(st.get("failures", {}))
        shards.append(
            {
                "name": SHARD_NAME.format(shard=shard),
                "samples": int(st.get("successes", 0)),
                "failed": int(st.get("failed", 0)),
                "bytes": int(st.get("bytes", 0)),
            }
        )
    manifest = {
        "schema_version": schema_version,
        "source": source,
        "build_config": build_config,
        "shards": shards,
        "num_shards": len(shards),
        "num_samples": sum(s["samples"] for s in shards),
        "num_failed": sum(s["failed"] for s in shards),
        "failures": dict(sorted(failures.items())),
    }
    _atomic_write(os.path.join(os.fspath(out_dir), MANIFEST_NAME), json.dumps(manifest, indent=2).encode() + b"\n")
    return manifest


@dataclasses.dataclass
class BuildSummary:
    """What one ``write_shards`` call did (this run) and what the folder now holds (totals)."""

    shards_written: int = 0
    shards_skipped: int = 0
    samples: int = 0
    failed: int = 0
    failures: dict[str, int] = dataclasses.field(default_factory=dict)
    bytes: int = 0
    seconds: float = 0.0
    total_shards: int = 0
    total_samples: int = 0
    total_expected: int = 0  # shards the input maps to (all tasks together)
    shards_other_ranks: int = 0  # left to the other tasks of a multi-task build
    manifest_pending: int = 0  # shards not yet done by other tasks; their last one writes the manifest
    errors: list[str] = dataclasses.field(default_factory=list)

    def __str__(self) -> str:
        rate = self.samples / self.seconds if self.seconds > 0 else 0.0
        lines = [
            f"shards: {self.shards_written} written, {self.shards_skipped} already done (skipped)",
            f"samples: {self.samples} written, {self.failed} failed; {self.bytes / 1e6:.1f} MB in "
            f"{self.seconds:.1f} s ({rate:.1f} samples/s)",
        ]
        if self.shards_other_ranks:
            lines.append(f"shards left to the other tasks of this job: {self.shards_other_ranks}")
        if self.failures:
            lines.append("failed by reason: " + ", ".join(f"{k}: {v}" for k, v in sorted(self.failures.items())))
        if self.manifest_pending:
            lines.append(
                f"{self.manifest_pending} shards still being built by other tasks; the last writes the manifest"
            )
        else:
            lines.append(f"folder now holds {self.total_samples} samples in {self.total_shards} shards")
        for err in self.errors:
            lines.append(f"ERROR {err}")
        if self.errors:
            lines.append("some shards were not finished; rerun the same command to retry them")
        return "\n".join(lines)


@dataclasses.dataclass
class _ShardJob:
    out_dir: str
    image_size: int
    resize_mode: str
    samples_per_shard: int
    jpeg_quality: int
    source: str
    settings: dict[str, Any]
    download: DownloadOptions | None
    max_pixels: int


def _load_source(rec: Record, fetched: bytes | DownloadError | None) -> Any:
    """The image input of a record: PIL image or bytes; raises ImageError/DownloadError with a reason."""
    if rec.data is not None:
        return rec.data
    if rec.path is not None:
        try:
            with open(rec.path, "rb") as fh:
                return fh.read()
        except FileNotFoundError as exc:
            raise ImageError("missing file", rec.path) from exc
        except OSError as exc:
            raise ImageError("unreadable file", f"{rec.path}: {exc}") from exc
    if rec.url is not None:
        if isinstance(fetched, DownloadError):
            raise fetched
        if fetched is None:
            raise DownloadError("download error", "no result")
        return fetched
    raise ImageError("no image", "record has neither path, url nor data")


def _build_shard(
    shard_id: int, items: list[tuple[int, Record | Problem]], job: _ShardJob, on_item: Callable[[], None] | None = None
) -> dict[str, Any]:
    """Build one whole shard (runs in a worker process); returns its stats."""
    start = time.time()
    failures: list[dict[str, Any]] = []
    reasons: Counter[str] = Counter()
    needs_download = any(isinstance(it, Record) and it.url and it.data is None and not it.path for _, it in items)
    downloader = Downloader(job.download or DownloadOptions()) if needs_download else None

    def url_of(pair: tuple[int, Record | Problem]) -> str | None:
        it = pair[1]
        return it.url if isinstance(it, Record) and it.data is None and not it.path else None

    stream: Iterator[tuple[tuple[int, Record | Problem], Any]]
    stream = downloader.map_ordered(items, url_of) if downloader else ((p, None) for p in items)
    with ShardWriter(job.out_dir, shard_id) as writer:
        for (index, item), fetched in stream:
            key = sample_key(shard_id, index % job.samples_per_shard, job.samples_per_shard)
            if isinstance(item, Problem):
                reasons[item.reason] += 1
                failures.append({"index": index, "key": key, "file": item.file, "row": item.row, "reason": item.reason})
            else:
                try:
                    src = _load_source(item, fetched)
                    img = process_image(src, job.image_size, job.resize_mode, job.jpeg_quality, job.max_pixels)
                except (ImageError, DownloadError) as exc:
                    reasons[exc.reason] += 1
                    failures.append(
                        {
                            "index": index,
                            "key": key,
                            "id": item.orig_id,
                            "file": item.path or item.url or "<data>",
                            "reason": exc.reason,
                            "detail": exc.detail[:300],
                        }
                    )
                else:
                    meta = dict(item.extra)
                    meta.update(
                        captions=list(item.captions),
                        source=job.source,
                        orig_id=item.orig_id,
                        width=img.width,
                        height=img.height,
                        orig_width=img.orig_width,
                        orig_height=img.orig_height,
                    )
                    writer.write(key, img.jpg, item.captions[0], meta)
            if on_item is not None:
                on_item()
        end = time.time()
        stats = {
            "count": len(items),
            "successes": writer.count,
            "failed": len(failures),
            "failures": dict(sorted(reasons.items())),
            "start_time": start,
            "end_time": end,
            "duration": end - start,
            "settings": job.settings,
        }
        return writer.finish(stats, failures)


def _group(records: Iterable[Record | Problem], samples_per_shard: int) -> Iterator[tuple[int, list]]:
    buf: list[tuple[int, Record | Problem]] = []
    shard = 0
    for i, item in enumerate(records):
        buf.append((i, item))
        if len(buf) == samples_per_shard:
            yield shard, buf
            shard += 1
            buf = []
    if buf:
        yield shard, buf


def _remove_stale(out_dir: str, shard: int) -> None:
    """Drop leftovers of an interrupted attempt (temp tar, or a tar whose stats never got written)."""
    base = os.path.join(out_dir, SHARD_NAME.format(shard=shard))
    for path in (base, base + TMP_SUFFIX, os.path.join(out_dir, FAILURES_NAME.format(shard=shard))):
        if os.path.exists(path):
            os.remove(path)


def write_shards(
    records: Iterable[Record | Problem],
    out_dir: str | os.PathLike,
    *,
    image_size: int,
    resize_mode: str,
    samples_per_shard: int,
    workers: int,
    source: str,
    build_config: dict[str, Any],
    jpeg_quality: int = 95,
    download_opts: DownloadOptions | None = None,
    progress: bool = True,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    rank: int = 0,
    world_size: int = 1,
) -> BuildSummary:
    """Write ``records`` into shards under ``out_dir`` (see the module doc); skips shards already done.

    ``workers=0`` builds in this process; ``workers>=1`` uses that many worker processes, each building whole
    shards. A shard whose worker crashed is reported in ``summary.errors`` and left unfinished for a rerun.

    With ``world_size > 1`` (slurm array or multi-task jobs, torchrun) this task builds only the shards with
    ``shard % world_size == rank``; every task reads the whole annotation list (cheap next to the images) so shard
    numbering is the same everywhere. The manifest is written by whichever task finds every shard done after
    finishing its own, i.e. the last one.
    """
    if not 0 <= rank < world_size:
        raise ConfigError(f"rank {rank} is outside world size {world_size}")
    from tqdm import tqdm

    if samples_per_shard < 1:
        raise ConfigError("out.samples_per_shard: must be >= 1")
    out = os.fspath(out_dir)
    os.makedirs(out, exist_ok=True)
    settings = {
        "image_size": image_size,
        "resize_mode": resize_mode,
        "samples_per_shard": samples_per_shard,
        "jpeg_quality": jpeg_quality,
        "source": source,
    }
    prior = read_stats(out)
    for shard, st in sorted(prior.items()):
        old = st.get("settings")
        if old is not None and old != settings:
            diff = [k for k in SETTINGS_KEYS if old.get(k) != settings.get(k)]
            raise ConfigError(
                f"out.dir: {out} holds shard {shard:05d} built with different settings ({', '.join(diff)}: "
                f"{[old.get(k) for k in diff]} vs {[settings.get(k) for k in diff]}); use a new out.dir or delete it"
            )
    job = _ShardJob(
        out, image_size, resize_mode, samples_per_shard, jpeg_quality, source, settings, download_opts, max_pixels
    )
    summary = BuildSummary()
    reasons: Counter[str] = Counter()
    t0 = time.time()
    bar = tqdm(unit=" samples", disable=not progress, dynamic_ncols=True, smoothing=0.1)

    def collect(stats: dict[str, Any]) -> None:
        summary.shards_written += 1
        summary.samples += int(stats["successes"])
        summary.failed += int(stats["failed"])
        summary.bytes += int(stats["bytes"])
        reasons.update(stats["failures"])
        bar.set_postfix(written=summary.samples, failed=summary.failed, refresh=False)

    pool = cf.ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn")) if workers > 0 else None
    pending: dict[cf.Future, tuple[int, int]] = {}

    def drain(block_until: int) -> None:
        while len(pending) > block_until:
            done, _ = cf.wait(list(pending), return_when=cf.FIRST_COMPLETED)
            for fut in done:
                shard, n = pending.pop(fut)
                try:
                    collect(fut.result())
                except Exception as exc:  # noqa: BLE001 - report and keep building the other shards
                    summary.errors.append(f"shard {shard:05d}: {type(exc).__name__}: {exc}")
                bar.update(n)

    try:
        for shard, items in _group(records, samples_per_shard):
            summary.total_expected = shard + 1
            if shard % world_size != rank:
                summary.shards_other_ranks += 1
                continue
            if shard in prior:
                summary.shards_skipped += 1
                bar.update(len(items))
                continue
            _remove_stale(out, shard)
            if pool is None:
                try:
                    collect(_build_shard(shard, items, job, on_item=lambda: bar.update(1)))
                except Exception as exc:  # noqa: BLE001
                    summary.errors.append(f"shard {shard:05d}: {type(exc).__name__}: {exc}")
            else:
                drain(2 * workers - 1)  # bounded queue: at most 2 shards per worker in memory
                pending[pool.submit(_build_shard, shard, items, job)] = (shard, len(items))
        drain(0)
    except BaseException:
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)
        bar.close()
        raise
    if pool is not None:
        pool.shutdown(wait=True)
    bar.close()
    summary.seconds = time.time() - t0
    summary.failures = dict(sorted(reasons.items()))
    missing = set(range(summary.total_expected)) - done_shards(out)
    if missing and world_size > 1:
        # other tasks still building (or this run had errors): the last task to finish writes the manifest
        summary.manifest_pending = len(missing)
        return summary
    manifest = write_manifest(out, source, build_config, SCHEMA_VERSION)
    summary.total_shards = manifest["num_shards"]
    summary.total_samples = manifest["num_samples"]
    return summary
