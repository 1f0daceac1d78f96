"""Parallel decode → resize → encode → tar writer in img2dataset's webdataset layout; atomic and resumable.

Layout of ``out_dir``::

    00000.tar              {key}.jpg, {key}.json, {key}.txt per sample (members in that order, keys ascending)
    00000_failures.jsonl   one line per input item that produced no sample (index, key, id, file, row, reason)
    00000_stats.json       written LAST: the shard's done-marker (counts, failures by reason, settings, inputs)
    00007_empty.json       done-marker of a shard in which every item failed (no tar; its failures inside)
    manifest.json          shard list with counts, folded empty shards, source, build config, schema version
    sizes.json             open_clip's {tar name: sample count}

Input item ``i`` (a :class:`Record` or a reader's :class:`Problem`) belongs to shard ``i // samples_per_shard`` at
index ``i % samples_per_shard``; failed items leave a gap in the keys, as in img2dataset. Worker processes each build
whole shards; a rerun skips shards whose done-marker records the same inputs (source paths and a fingerprint of the
items that went in) and rebuilds the rest from scratch, so an interrupted build resumed equals an uninterrupted one
byte for byte (tar members carry fixed mtime/uid/gid/mode).

A shard in which every item failed gets no tar (a 0-sample tar stalls webdataset readers with several workers). A
finished single-task build then renumbers the later tars so the names stay contiguous (``{00000..N}`` keeps working);
the stats of a moved tar record the shard it was built as (``built_as``), and a rerun moves them back before building.
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import errno
import glob
import hashlib
import json
import multiprocessing as mp
import os
import tarfile
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from .download import Downloader, DownloadError, DownloadOptions
from .images import DEFAULT_MAX_PIXELS, ImageError, ProcessedImage, process_image
from .paths import check_member_key
from .schema import MANIFEST_NAME, SCHEMA_VERSION, SHARD_NAME, STATS_NAME, sample_key
from .sources.base import Problem, Record

FAILURES_NAME = "{shard:05d}_failures.jsonl"
EMPTY_NAME = "{shard:05d}_empty.json"
SIZES_NAME = "sizes.json"
TMP_SUFFIX = ".tmp"
WRITE_BUFFER = 1 << 20
# Settings that change shard contents: a rerun into the same folder must use the same ones.
SETTINGS_KEYS = ("image_size", "resize_mode", "samples_per_shard", "jpeg_quality", "source")


class DiskFullError(OSError):
    """The disk filled up (``ENOSPC``/``EDQUOT``) while writing ``path``: the build stops at the first one."""


def is_disk_full(exc: BaseException) -> bool:
    """True for "no space left on device" and "disk quota exceeded" (also when raised in a worker process)."""
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)


def _atomic_write(path: str, data: bytes) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        # a half-written temp file (disk full, kill) must not stay behind
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _json_bytes(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, ensure_ascii=False).encode("utf-8")


# after name, mode, uid, gid, size, mtime and the checksum: typeflag "0", linkname, magic "ustar\0", version "00",
# then zeros: uname, gname, devmajor, devminor (empty for regular files), prefix, padding
_USTAR_TAIL = b"0" + b"\0" * 100 + b"ustar\0" + b"00" + b"\0" * (64 + 16 + 167)
_USTAR_TAIL_SUM = sum(_USTAR_TAIL) + 8 * 32  # the checksum field counts as spaces


def ustar_header(name: str, size: int) -> bytes:
    """The 512-byte ustar header of a regular member with mode 0444, uid/gid 0, mtime 0 and empty owner names."""
    raw = name.encode("utf-8")
    if len(raw) > 100:  # needs the prefix field: let tarfile split it
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode, info.uid, info.gid, info.uname, info.gname = size, 0, 0o444, 0, 0, "", ""
        return info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "surrogateescape")
    head = raw.ljust(100, tarfile.NUL) + b"0000444\0" + b"0000000\0" * 2 + b"%011o\0" % size + b"00000000000\0"
    return head + b"%06o\0 " % (sum(head) + _USTAR_TAIL_SUM) + _USTAR_TAIL


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
        # 1 MiB buffer: one write syscall per ~40 samples instead of one per image member
        self._fh = open(self.tmp_path, "wb", buffering=WRITE_BUFFER)  # noqa: SIM115 - closed in finish()/__exit__
        self._offset = 0
        self.count = 0
        self.finished = False

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        if not self.finished:
            try:  # no end-of-archive or fsync for a file about to go; a full disk may fail the flush again
                self._fh.close()
            except OSError:
                pass
            if os.path.exists(self.tmp_path):
                os.remove(self.tmp_path)

    def _add(self, name: str, data: bytes) -> None:
        # the bytes tarfile.addfile writes for this member (tests/test_shards.py checks), without its per-member
        # TarInfo copy and 16 KB block copying, which cost ~5 % of a writer's CPU
        pad = -len(data) % tarfile.BLOCKSIZE
        self._fh.write(ustar_header(name, len(data)) + data + tarfile.NUL * pad)
        self._offset += tarfile.BLOCKSIZE + len(data) + pad

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
            # end of archive as tarfile writes it: two zero blocks, then zeros up to a whole record
            end = self._offset + 2 * tarfile.BLOCKSIZE
            self._fh.write(tarfile.NUL * (2 * tarfile.BLOCKSIZE + (-end % tarfile.RECORDSIZE)))
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

    def finish_empty(self, stats: dict[str, Any], failures: Iterable[dict[str, Any]] = ()) -> dict[str, Any]:
        """Done-marker of a shard without samples: no tar, ``{shard}_empty.json`` holds the stats and failures."""
        self._close()
        os.remove(self.tmp_path)
        out = dict(stats)
        out.update(successes=0, shard=self.shard_id, bytes=0, empty=True, failure_list=list(failures))
        _atomic_write(os.path.join(self.out_dir, EMPTY_NAME.format(shard=self.shard_id)), _json_bytes(out))
        self.finished = True
        return out


def _load_json(path: str) -> Any:
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except (OSError, ValueError):
        return None  # unreadable marker: the shard counts as not done and gets rebuilt


def read_markers(out_dir: str | os.PathLike) -> dict[int, dict[str, Any]]:
    """Done-markers by the shard id an item range was built as; each stats dict gains ``tar`` (its file name now).

    A shard is done when its ``_stats.json`` and tar both exist, or when its ``_empty.json`` exists (every item
    failed; ``tar`` is None). After renumbering, ``01234_stats.json`` may describe shard ``built_as`` 1240.
    """
    out_dir = os.fspath(out_dir)
    out: dict[int, dict[str, Any]] = {}
    for path in sorted(glob.glob(os.path.join(out_dir, "*_stats.json"))):
        head = os.path.basename(path).split("_", 1)[0]
        if not head.isdigit():
            continue
        tar = SHARD_NAME.format(shard=int(head))
        if not os.path.exists(os.path.join(out_dir, tar)):
            continue
        st = _load_json(path)
        if isinstance(st, dict):
            out[int(st.get("built_as", head))] = {**st, "tar": tar}
    for path in sorted(glob.glob(os.path.join(out_dir, "*_empty.json"))):
        head = os.path.basename(path).split("_", 1)[0]
        st = _load_json(path) if head.isdigit() else None
        if isinstance(st, dict):
            out.setdefault(int(head), {**st, "tar": None})
    return out


def read_stats(out_dir: str | os.PathLike) -> dict[int, dict[str, Any]]:
    """Stats of every finished shard in ``out_dir`` (see :func:`read_markers`), by the shard id it was built as."""
    return read_markers(out_dir)


def done_shards(out_dir: str | os.PathLike) -> set[int]:
    """Ids of shards whose done-marker exists (stats file and tar, or an empty-shard marker)."""
    return set(read_markers(out_dir))


def write_manifest(
    out_dir: str | os.PathLike,
    source: str,
    build_config: dict[str, Any],
    schema_version: int = SCHEMA_VERSION,
    only: set[int] | None = None,
) -> dict[str, Any]:
    """Write ``manifest.json`` and open_clip's ``sizes.json`` from the done-markers; returns the manifest.

    Shards without samples have no tar: they are listed under ``empty_shards`` with their failure counts, and a
    renumbered tar's entry says which shard it was built as. ``only`` limits the manifest to those shard ids.
    """
    out_dir = os.fspath(out_dir)
    markers = read_markers(out_dir)
    failures: Counter[str] = Counter()
    shards, empty = [], []
    for built_as in sorted(markers):
        if only is not None and built_as not in only:
            continue
        st = markers[built_as]
        failures.update(st.get("failures", {}))
        if st["tar"] is None:
            empty.append({"built_as": built_as, "failed": int(st.get("failed", 0))})
            continue
        entry = {
            "name": st["tar"],
            "samples": int(st.get("successes", 0)),
            "failed": int(st.get("failed", 0)),
            "bytes": int(st.get("bytes", 0)),
        }
        if st["tar"] != SHARD_NAME.format(shard=built_as):
            entry["built_as"] = built_as
        shards.append(entry)
    shards.sort(key=lambda e: e["name"])
    manifest = {
        "schema_version": schema_version,
        "source": source,
        "build_config": build_config,
        "shards": shards,
        "num_shards": len(shards),
        "num_samples": sum(s["samples"] for s in shards),
        "num_failed": sum(s["failed"] for s in shards) + sum(e["failed"] for e in empty),
        "failures": dict(sorted(failures.items())),
        "empty_shards": empty,
    }
    sizes = {s["name"]: s["samples"] for s in shards}
    _atomic_write(os.path.join(out_dir, SIZES_NAME), json.dumps(sizes, indent=1).encode() + b"\n")
    _atomic_write(os.path.join(out_dir, MANIFEST_NAME), json.dumps(manifest, indent=2).encode() + b"\n")
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
    total_failed: int = 0
    total_expected: int = 0  # shards the input maps to (all tasks together)
    shards_other_ranks: int = 0  # left to the other tasks of a multi-task build
    manifest_pending: int = 0  # shards not yet done by other tasks; their last one writes the manifest
    rebuilt: list[str] = dataclasses.field(default_factory=list)  # done shards whose inputs changed
    empty_shards: list[int] = dataclasses.field(default_factory=list)  # every item failed: no tar
    renumbered: int = 0  # tars moved down so that names stay contiguous
    removed_stale: list[int] = dataclasses.field(default_factory=list)  # shards past the end of the input
    disk_full: str | None = None  # the first ENOSPC: the build stopped there
    errors: list[str] = dataclasses.field(default_factory=list)

    @property
    def all_failed(self) -> bool:
        """No sample at all although items were attempted (the folder's totals once the manifest is written)."""
        if not self.manifest_pending:
            return self.total_samples == 0 and self.total_failed > 0
        return self.samples == 0 and self.failed > 0

    @property
    def ok(self) -> bool:
        """False when the command must exit non-zero: errors, a full disk, or not a single sample built."""
        return not self.errors and self.disk_full is None and not self.all_failed

    def __str__(self) -> str:
        rate = self.samples / self.seconds if self.seconds > 0 else 0.0
        lines = [
            f"shards: {self.shards_written} written, {self.shards_skipped} already done (skipped)",
            f"samples: {self.samples} written, {self.failed} failed; {self.bytes / 1e6:.1f} MB in "
            f"{self.seconds:.1f} s ({rate:.1f} samples/s)",
        ]
        if self.rebuilt:
            lines.append(f"rebuilt {len(self.rebuilt)} shards whose inputs changed since they were built:")
            lines += [f"  {r}" for r in self.rebuilt[:5]] + (
                [f"  ... {len(self.rebuilt) - 5} more"] * (len(self.rebuilt) > 5)
            )
        if self.shards_other_ranks:
            lines.append(f"shards left to the other tasks of this job: {self.shards_other_ranks}")
        if self.failures:
            lines.append("failed by reason: " + ", ".join(f"{k}: {v}" for k, v in sorted(self.failures.items())))
        if self.empty_shards:
            ids = ", ".join(f"{i:05d}" for i in self.empty_shards[:10])
            lines.append(
                f"{len(self.empty_shards)} shards had no sample (every item failed) and have no tar: {ids}"
                + (f"; {self.renumbered} later tars renumbered to keep the names contiguous" if self.renumbered else "")
            )
        if self.removed_stale:
            lines.append(
                f"removed {len(self.removed_stale)} shards past the end of the input (left by an earlier build)"
            )
        if self.manifest_pending:
            lines.append(
                f"{self.manifest_pending} shards still being built by other tasks; the last writes the manifest"
            )
        else:
            lines.append(f"folder now holds {self.total_samples} samples in {self.total_shards} shards")
        if self.disk_full:
            lines.append(
                f"ERROR disk full while writing {self.disk_full}; the build stopped there, temporary files were "
                "removed and finished shards are intact: free space and rerun the same command to continue"
            )
        for err in self.errors:
            lines.append(f"ERROR {err}")
        if self.errors:
            lines.append("some shards were not finished; rerun the same command to retry them")
        if self.all_failed and not self.manifest_pending:
            lines.append(
                f"ERROR no sample could be built: all {self.total_failed} items failed (see failed by reason and the "
                "*_failures.jsonl / *_empty.json files); check the source paths"
            )
        elif self.all_failed:
            lines.append(f"ERROR every one of the {self.failed} items of this task failed")
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
    cpu_slots: int | None = None  # images decoded at once per process (Downloader.map_ordered's then_slots)


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
    shard_id: int,
    items: list[tuple[int, Record | Problem]],
    job: _ShardJob,
    on_item: Callable[[], None] | None = None,
    inputs: dict[str, Any] | None = None,
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

    def process(pair: tuple[int, Record | Problem], data: bytes) -> Any:
        # runs in the download thread that fetched ``data`` (see Downloader.map_ordered)
        return process_image(data, job.image_size, job.resize_mode, job.jpeg_quality, job.max_pixels)

    stream: Iterator[tuple[tuple[int, Record | Problem], Any]]
    if downloader:
        stream = downloader.map_ordered(items, url_of, then=process, then_slots=job.cpu_slots)
    else:
        stream = ((p, None) for p in items)
    with ShardWriter(job.out_dir, shard_id) as writer:
        for (index, item), fetched in stream:
            key = sample_key(shard_id, index % job.samples_per_shard, job.samples_per_shard)
            if isinstance(item, Problem):
                reasons[item.reason] += 1
                failures.append({"index": index, "key": key, "file": item.file, "row": item.row, "reason": item.reason})
            else:
                try:
                    if isinstance(fetched, ProcessedImage):
                        img = fetched  # downloaded and processed in a download thread
                    elif isinstance(fetched, Exception) and not isinstance(fetched, DownloadError):
                        raise fetched  # ImageError is a failure of this item; anything else fails the shard as before
                    else:
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
        if inputs is not None:
            stats["inputs"] = inputs
        if writer.count == 0:
            return writer.finish_empty(stats, failures)
        return writer.finish(stats, failures)


def _item_digest(index: int, item: Record | Problem) -> bytes:
    """What one input item is, for the done-marker: its fields, and for a local file its size and mtime."""
    if isinstance(item, Problem):
        desc: dict[str, Any] = {"problem": [item.file, item.row, item.reason]}
    else:
        desc = {"id": item.orig_id, "captions": item.captions, "path": item.path, "url": item.url, "extra": item.extra}
        if item.path is not None:
            try:
                st = os.stat(item.path)
                desc["file"] = [st.st_size, st.st_mtime_ns]
            except OSError as exc:
                desc["file"] = type(exc).__name__  # e.g. missing: a later fix of the folder must trigger a rebuild
        if isinstance(item.data, (bytes, bytearray, memoryview)):
            desc["data"] = hashlib.blake2b(bytes(item.data), digest_size=16).hexdigest()
        elif item.data is not None and hasattr(item.data, "tobytes"):
            img = item.data
            desc["data"] = [img.mode, list(img.size), hashlib.blake2b(img.tobytes(), digest_size=16).hexdigest()]
    desc["index"] = index
    return json.dumps(desc, sort_keys=True, default=str).encode("utf-8")


def items_fingerprint(items: Iterable[tuple[int, Record | Problem]]) -> str:
    """Content fingerprint of the (index, item) pairs of one shard: rows, captions, paths, file sizes/mtimes, data."""
    h = hashlib.blake2b(digest_size=16)
    for index, item in items:
        h.update(_item_digest(index, item))
        h.update(b"\0")
    return h.hexdigest()


def _inputs_difference(old: dict[str, Any] | None, new: dict[str, Any]) -> str | None:
    """Why a done shard's recorded inputs differ from this run's (None when they are the same)."""
    if not isinstance(old, dict):
        return "its done-marker records no inputs (built by an older version)"
    old_src, new_src = old.get("sources") or {}, new.get("sources") or {}
    changed = [k for k in sorted(set(old_src) | set(new_src)) if old_src.get(k) != new_src.get(k)]
    if changed:
        return "; ".join(f"{k}: {old_src.get(k)} -> {new_src.get(k)}" for k in changed)
    if old.get("rows") != new.get("rows"):
        return "the annotation rows or image files that go into it changed"
    return None


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


def _shard_files(out_dir: str, shard: int) -> list[str]:
    base = os.path.join(out_dir, SHARD_NAME.format(shard=shard))
    return [
        base,
        base + TMP_SUFFIX,
        os.path.join(out_dir, FAILURES_NAME.format(shard=shard)),
        os.path.join(out_dir, STATS_NAME.format(shard=shard)),
        os.path.join(out_dir, EMPTY_NAME.format(shard=shard)),
    ]


def _remove_stale(out_dir: str, shard: int) -> None:
    """Drop every file of shard id ``shard`` (an interrupted attempt, or a done shard whose inputs changed)."""
    # the done-marker goes first: a crash half-way must leave the shard "not done", never "done" without its tar
    for path in reversed(_shard_files(out_dir, shard)):
        if os.path.exists(path):
            os.remove(path)


def _move_shard(out_dir: str, st: dict[str, Any], built_as: int, to: int) -> None:
    """Move a finished shard's tar, failures and stats from their current id to id ``to``; marker removed first."""
    cur = int(st["tar"].split(".", 1)[0])
    os.remove(os.path.join(out_dir, STATS_NAME.format(shard=cur)))
    os.replace(os.path.join(out_dir, SHARD_NAME.format(shard=cur)), os.path.join(out_dir, SHARD_NAME.format(shard=to)))
    fail = os.path.join(out_dir, FAILURES_NAME.format(shard=cur))
    if os.path.exists(fail):
        os.replace(fail, os.path.join(out_dir, FAILURES_NAME.format(shard=to)))
    new = {k: v for k, v in st.items() if k not in ("tar", "built_as")}
    if to != built_as:
        new["built_as"] = built_as
    _atomic_write(os.path.join(out_dir, STATS_NAME.format(shard=to)), _json_bytes(new))


def _restore_layout(out_dir: str, markers: dict[int, dict[str, Any]]) -> None:
    """Move renumbered tars back to the ids they were built as (descending: each target is free by then)."""
    for built_as in sorted(markers, reverse=True):
        st = markers[built_as]
        if st["tar"] is not None and st["tar"] != SHARD_NAME.format(shard=built_as):
            _move_shard(out_dir, st, built_as, built_as)


def _renumber(out_dir: str, markers: dict[int, dict[str, Any]]) -> int:
    """Give the tars contiguous names when empty shards left gaps (ascending: each target is free by then)."""
    moved = 0
    for pos, built_as in enumerate(b for b in sorted(markers) if markers[b]["tar"] is not None):
        if markers[built_as]["tar"] != SHARD_NAME.format(shard=pos):
            _move_shard(out_dir, markers[built_as], built_as, pos)
            moved += 1
    return moved


def _remove_temp_files(out_dir: str) -> None:
    """Temporary files of unfinished shards and atomic writes (after a full disk stopped the build)."""
    for path in glob.glob(os.path.join(out_dir, "*" + TMP_SUFFIX)) + glob.glob(os.path.join(out_dir, "*.tmp.*")):
        try:
            os.remove(path)
        except FileNotFoundError:
            pass


def _cpu_slots(workers: int) -> int:
    """The CPUs each building process may use: this process's CPUs shared by ``workers`` (0: this process alone)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cpus // workers) if workers > 0 else max(1, cpus)


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
    source_paths: dict[str, str] | None = None,
) -> BuildSummary:
    """Write ``records`` into shards under ``out_dir`` (see the module doc); skips shards already done.

    ``workers=0`` builds in this process; ``workers>=1`` uses that many worker processes, each building whole
    shards. A shard whose worker crashed is reported in ``summary.errors`` and left unfinished for a rerun. The
    first full disk (``ENOSPC``) stops the build: temporary files are removed, finished shards stay, and
    ``summary.disk_full`` names the shard.

    A done shard is skipped only if its marker records the same ``source_paths`` (the recipe's source files and
    folders) and the same fingerprint of its items (:func:`items_fingerprint`); otherwise it is rebuilt and listed
    in ``summary.rebuilt`` with the difference. Other settings (size, quality, ...) differing is an error.

    With ``world_size > 1`` (slurm array or multi-task jobs, torchrun) this task builds only the shards with
    ``shard % world_size == rank``; every task reads the whole annotation list (cheap next to the images) so shard
    numbering is the same everywhere. The manifest is written by whichever task finds every shard done after
    finishing its own, i.e. the last one. Such builds do not renumber around empty shards (the tasks do not
    coordinate renames), so their shard names may have gaps; the manifest and ``sizes.json`` list the tars.
    """
    # here, not at the top: worker processes import this module and never need launch.config (yaml & co.)
    from launch.config import ConfigError

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
    sources = {k: os.path.abspath(v) for k, v in sorted((source_paths or {}).items()) if v}
    prior = read_markers(out)
    for shard, st in sorted(prior.items()):
        old = st.get("settings")
        if old is not None and old != settings:
            diff = [k for k in SETTINGS_KEYS if old.get(k) != settings.get(k)]
            raise ConfigError(
                f"out.dir: {out} holds shard {shard:05d} built with different settings ({', '.join(diff)}: "
                f"{[old.get(k) for k in diff]} vs {[settings.get(k) for k in diff]}); use a new out.dir or delete it"
            )
    if any(st["tar"] not in (None, SHARD_NAME.format(shard=b)) for b, st in prior.items()):
        if world_size > 1:
            raise ConfigError(
                f"out.dir: {out} holds a finished build whose tars were renumbered around empty shards; rerun it "
                "as a single task (it moves them back first) or use a new out.dir"
            )
        # the manifest describes the renumbered layout: it goes first, and comes back when the build finishes
        for name in (MANIFEST_NAME, SIZES_NAME):
            if os.path.exists(os.path.join(out, name)):
                os.remove(os.path.join(out, name))
        _restore_layout(out, prior)
        prior = read_markers(out)
    job = _ShardJob(
        out, image_size, resize_mode, samples_per_shard, jpeg_quality, source, settings, download_opts, max_pixels
    )
    job.cpu_slots = _cpu_slots(workers)
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

    def failed(shard: int, exc: BaseException) -> None:
        if is_disk_full(exc):
            if summary.disk_full is None:
                summary.disk_full = f"shard {shard:05d} ({exc})"
        else:
            summary.errors.append(f"shard {shard:05d}: {type(exc).__name__}: {exc}")

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
                    failed(shard, exc)
                bar.update(n)

    try:
        for shard, items in _group(records, samples_per_shard):
            summary.total_expected = shard + 1
            if summary.disk_full is not None:
                continue  # stopped: read on only to count the expected shards
            if shard % world_size != rank:
                summary.shards_other_ranks += 1
                continue
            inputs = {"sources": sources, "rows": items_fingerprint(items)}
            if shard in prior:
                why = _inputs_difference(prior[shard].get("inputs"), inputs)
                if why is None:
                    summary.shards_skipped += 1
                    bar.update(len(items))
                    continue
                summary.rebuilt.append(f"shard {shard:05d}: {why}")
            _remove_stale(out, shard)
            if pool is None:
                try:
                    collect(_build_shard(shard, items, job, on_item=lambda: bar.update(1), inputs=inputs))
                except Exception as exc:  # noqa: BLE001
                    failed(shard, exc)
            else:
                drain(2 * workers - 1)  # bounded queue: at most 2 shards per worker in memory
                if summary.disk_full is None:
                    pending[pool.submit(_build_shard, shard, items, job, None, inputs)] = (shard, len(items))
        if summary.disk_full is not None:
            for fut in pending:
                fut.cancel()  # not started yet: never begin writing onto a full disk
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
    if summary.disk_full is not None:
        _remove_temp_files(out)
        return summary
    try:
        return _finish(out, summary, source, build_config, world_size)
    except OSError as exc:
        if not is_disk_full(exc):
            raise
        _remove_temp_files(out)
        summary.disk_full = f"the manifest ({exc})"
        return summary


def _finish(
    out: str, summary: BuildSummary, source: str, build_config: dict[str, Any], world_size: int
) -> BuildSummary:
    """Renumber around empty shards and write the manifest, once every shard of the input is done."""
    expected = set(range(summary.total_expected))
    markers = read_markers(out)
    missing = expected - set(markers)
    if missing and world_size > 1:
        # other tasks still building (or this run had errors): the last task to finish writes the manifest
        summary.manifest_pending = len(missing)
        return summary
    if world_size == 1:
        # shards past the end of the input belong to an earlier, longer input: they are not part of this build
        for built_as, st in sorted(markers.items()):
            if built_as >= summary.total_expected and (
                st["tar"] is None or st["tar"] == SHARD_NAME.format(shard=built_as)
            ):
                _remove_stale(out, built_as)
                summary.removed_stale.append(built_as)
        markers = read_markers(out)
        if not missing and not summary.errors:
            summary.renumbered = _renumber(out, markers)
    summary.empty_shards = sorted(b for b, st in read_markers(out).items() if st["tar"] is None and b in expected)
    manifest = write_manifest(out, source, build_config, SCHEMA_VERSION, only=expected)
    summary.total_shards = manifest["num_shards"]
    summary.total_samples = manifest["num_samples"]
    summary.total_failed = manifest["num_failed"]
    return summary
