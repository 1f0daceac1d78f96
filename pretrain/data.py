"""Webdataset shard loader with balanced ranks, corrupt-sample skipping and exact mid-epoch resume.

How it works (details in docs/loader.md):

* **Positions.** Each epoch orders the shards by a permutation seeded from (seed, epoch) and concatenates their
  samples into one sequence (per-shard counts come from manifest.json / sizes.json / ``*_stats.json``, else from a
  header scan). The epoch has ``N`` positions (``data.samples_per_epoch`` or the total), padded by wrap-around to
  ``T = R·W·K·B`` where ``R`` ranks, ``W = max(1, num_workers)`` workers, ``B`` the per-rank batch and
  ``K = ceil(N / (R·W·B))`` batches per worker. Worker ``w`` of rank ``r`` owns the contiguous slot
  ``[(r·W+w)·K·B, (r·W+w+1)·K·B)``, so every rank runs ``steps_per_epoch = K·W`` steps and the slots only overlap
  in the ``T - N`` padded positions.
* **Shuffle.** Within a slot, samples are emitted in windows of ``data.shuffle_buffer`` positions, each window
  permuted by a generator seeded from (seed, epoch, rank, worker, window). Emission order is a pure function of
  the position, so a worker can jump to any emission index by skipping whole shards by count and then samples by
  reading (never decoding) them.
* **Corrupt samples** (missing image or caption, bad json, undecodable image, unreadable tar) are skipped, counted
  and logged (rate-limited); the worker tops its last batch up from the positions right after its slot.
* **Batch order.** Step ``i`` of an epoch is made by worker ``i mod W``; torch's DataLoader hands batches out
  round-robin in that order, so the main process knows which worker made which batch. Each batch carries the
  worker's emission cursor, and ``state_dict()`` records (epoch, step, one cursor per worker) of the batches the
  trainer consumed. A new loader given that state restarts each worker at its cursor.
* **Iteration is infinite**: the epoch increments (and reshuffles) after ``steps_per_epoch`` steps; ``iter()``
  always continues from the consumed position. ``train=False`` gives one finite, unshuffled, unpadded pass.
"""

from __future__ import annotations

import bisect
import hashlib
import io
import json
import logging
import math
import os
import signal
import tarfile
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from data_prep.schema import MANIFEST_NAME, captions_of, image_bytes_of
from data_prep.transforms import EvalTransform, TrainTransform, eval_transform, pre_caption, train_transform
from launch.config import expand_shards
from pretrain.config import DataConfig

log = logging.getLogger("vlp.data")

STATE_VERSION = 1
_COUNT_KEYS = ("samples", "num_samples", "successes", "written", "count", "n")
_NAME_KEYS = ("name", "path", "file", "tar", "url", "shard")


# ----------------------------------------------------------------------------------------------- shard metadata


def _seed_of(*parts: int | str) -> int:
    """A 63-bit seed mixed from the parts (stable across processes and Python versions)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def _count_from(entry: Any) -> int | None:
    if isinstance(entry, bool):
        return None
    if isinstance(entry, int):
        return entry
    if isinstance(entry, dict):
        for key in _COUNT_KEYS:
            value = entry.get(key)
            if isinstance(value, int) and not isinstance(value, bool):
                return value
    return None


def _manifest_counts(folder: str) -> dict[str, int]:
    """Basename -> sample count from ``manifest.json`` (and open_clip's ``sizes.json``) in ``folder``."""
    out: dict[str, int] = {}
    sizes = os.path.join(folder, "sizes.json")
    if os.path.exists(sizes):
        try:
            with open(sizes) as fh:
                data = json.load(fh)
            out.update({os.path.basename(k): int(v) for k, v in data.items() if isinstance(v, int)})
        except (OSError, ValueError, AttributeError) as exc:
            log.warning("ignoring unreadable %s: %s", sizes, exc)
    path = os.path.join(folder, MANIFEST_NAME)
    if not os.path.exists(path):
        return out
    try:
        with open(path) as fh:
            manifest = json.load(fh)
    except (OSError, ValueError) as exc:
        log.warning("ignoring unreadable %s: %s", path, exc)
        return out
    shards = manifest.get("shards") if isinstance(manifest, dict) else None
    if isinstance(shards, dict):
        for name, entry in shards.items():
            count = _count_from(entry)
            if count is not None:
                out[os.path.basename(str(name))] = count
    elif isinstance(shards, list):
        for entry in shards:
            if not isinstance(entry, dict):
                continue
            count = _count_from(entry)
            name = next((entry[k] for k in _NAME_KEYS if k in entry), None)
            if count is None or name is None:
                continue
            name = f"{name:05d}.tar" if isinstance(name, int) else os.path.basename(str(name))
            out[name] = count
    return out


def _stats_count(tar_path: str) -> int | None:
    stem = tar_path[: -len(".tar")] if tar_path.endswith(".tar") else tar_path
    path = stem + "_stats.json"
    if not os.path.exists(path):
        return None
    try:
        with open(path) as fh:
            return _count_from(json.load(fh))
    except (OSError, ValueError):
        return None


def scan_sample_count(tar_path: str) -> int:
    """Count the samples of a tar by its member names (seeks over the data; reads no image)."""
    keys = 0
    last = None
    with tarfile.open(tar_path, "r:") as tf:
        for member in tf:
            if not member.isreg():
                continue
            prefix, _ = wds.tariterators.base_plus_ext(member.name)
            if prefix is not None and prefix != last:
                keys += 1
                last = prefix
    return keys


def shard_sample_counts(paths: list[str]) -> list[int]:
    """Samples per shard: manifest.json / sizes.json, else ``{shard}_stats.json``, else a header scan of the tar."""
    by_folder: dict[str, dict[str, int]] = {}
    counts: list[int] = []
    for path in paths:
        folder = os.path.dirname(os.path.abspath(path))
        if folder not in by_folder:
            by_folder[folder] = _manifest_counts(folder)
        count = by_folder[folder].get(os.path.basename(path))
        if count is None:
            count = _stats_count(path)
        if count is None:
            try:
                count = scan_sample_count(path)
            except (OSError, tarfile.TarError) as exc:
                log.warning("cannot count samples of %s (%s): treating it as empty", path, exc)
                count = 0
        counts.append(max(0, int(count)))
    return counts


# ------------------------------------------------------------------------------------------------------ the plan


class _Plan:
    """Everything a worker needs, picklable; a pure function from (epoch, worker, emission index) to a sample."""

    def __init__(
        self,
        paths: list[str],
        counts: list[int],
        num_samples: int,
        *,
        seed: int,
        rank: int,
        world_size: int,
        workers: int,
        batch_size: int,
        shuffle_buffer: int,
        train: bool,
    ) -> None:
        self.paths = paths
        self.counts = counts
        self.total = sum(counts)
        self.num_samples = num_samples
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.workers = workers
        self.batch_size = batch_size
        self.train = train
        self.slots = world_size * workers
        self.per_worker_batches = math.ceil(num_samples / (self.slots * batch_size))
        self.slot_len = self.per_worker_batches * batch_size
        self.window = max(1, min(shuffle_buffer, self.slot_len)) if train else 1

    @property
    def steps_per_epoch(self) -> int:
        if self.train:
            return self.per_worker_batches * self.workers
        return sum(math.ceil(len(range(*self.eval_range(w))) / self.batch_size) for w in range(self.workers))

    def slot(self, worker: int) -> int:
        return self.rank * self.workers + worker

    def eval_range(self, worker: int) -> tuple[int, int]:
        """Unpadded contiguous split of [0, N) for the one-pass evaluation order."""
        j = self.slot(worker)
        return j * self.num_samples // self.slots, (j + 1) * self.num_samples // self.slots

    def shard_order(self, epoch: int) -> tuple[list[int], list[int]]:
        """Shard indices in this epoch's order and the cumulative sample offsets (starts) in that order."""
        if self.train:
            gen = torch.Generator().manual_seed(_seed_of("shards", self.seed, epoch))
            order = torch.randperm(len(self.paths), generator=gen).tolist()
        else:
            order = list(range(len(self.paths)))
        starts, acc = [], 0
        for s in order:
            starts.append(acc)
            acc += self.counts[s]
        return order, starts

    def window_perm(self, epoch: int, worker: int, window: int, length: int) -> list[int]:
        gen = torch.Generator().manual_seed(_seed_of("window", self.seed, epoch, self.rank, worker, window))
        return torch.randperm(length, generator=gen).tolist()

    def sample_seed(self, epoch: int, worker: int, t: int) -> int:
        return _seed_of("sample", self.seed, epoch, self.rank, worker, t)


class _ShardReader:
    """Sequential access to (shard, index) samples; skipping reads bytes but decodes nothing."""

    def __init__(self, paths: list[str], counts: list[int]) -> None:
        self.paths = paths
        self.counts = counts
        self._shard: int | None = None
        self._next = 0
        self._it: Iterator[dict[str, Any]] | None = None
        self._fh: Any = None
        self._error: str | None = None

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
        self._fh = self._it = None
        self._shard = None

    def _open(self, shard: int) -> None:
        self.close()
        self._shard, self._next, self._error = shard, 0, None
        path = self.paths[shard]
        try:
            self._fh = open(path, "rb")  # noqa: SIM115 - lives across calls, closed in close()
        except OSError as exc:
            self._error = f"unreadable shard: {path}: {exc}"
            return

        def on_error(exc: Exception) -> bool:
            log.warning("skipping a tar member of %s: %s", path, exc)
            return True

        files = ({**f, "__url__": path} for f in wds.tariterators.tar_file_iterator(self._fh, handler=on_error))
        self._it = wds.tariterators.group_by_keys(files, handler=on_error)

    def get(self, shard: int, index: int) -> tuple[dict[str, Any] | None, str]:
        """The raw sample at ``index`` of ``shard``, or ``(None, reason)`` when the tar cannot deliver it."""
        if self._shard != shard or index < self._next:
            self._open(shard)
        while self._error is None and self._next <= index:
            try:
                sample = next(self._it)  # type: ignore[arg-type]
            except StopIteration:
                self._error = (
                    f"missing from shard: {self.paths[shard]} ends after {self._next} samples, "
                    f"its count says {self.counts[shard]}"
                )
                break
            except (OSError, tarfile.TarError, ValueError, EOFError) as exc:
                self._error = f"tar read error: {self.paths[shard]} after {self._next} samples: {exc}"
                break
            self._next += 1
            if self._next - 1 == index:
                return sample, ""
        return None, self._error or "missing"


class _Skip(Exception):
    """A sample that cannot be used (reason in args); the reader counts it and moves on."""


class _Worker:
    """Turns a plan into batches for one worker role; used inside DataLoader workers (or in-process)."""

    def __init__(self, plan: _Plan, tf: TrainTransform | EvalTransform, views: int, max_words: int) -> None:
        self.plan = plan
        self.tf = tf
        self.views = views
        self.max_words = max_words
        self.reader = _ShardReader(plan.paths, plan.counts)
        self._order_epoch: int | None = None
        self._order: list[int] = []
        self._starts: list[int] = []
        self._logged = 0
        self._last_log = 0.0
        self._unlogged = 0

    # --- positions -> raw samples
    def _locate(self, epoch: int, g: int) -> tuple[int, int]:
        if self._order_epoch != epoch:
            self._order, self._starts = self.plan.shard_order(epoch)
            self._order_epoch = epoch
        # the last shard starting at or before g holds it (an empty shard shares its start with the next one)
        k = bisect.bisect_right(self._starts, g) - 1
        return self._order[k], g - self._starts[k]

    def _raw(self, epoch: int, q: int) -> tuple[dict[str, Any] | None, str]:
        plan = self.plan
        g = (q % plan.num_samples) % plan.total
        shard, index = self._locate(epoch, g)
        return self.reader.get(shard, index)

    def emissions(self, epoch: int, worker: int, t0: int) -> Iterator[tuple[int, dict[str, Any] | None, str]]:
        """(emission index, raw sample or None, reason) from ``t0`` on, endless (top-up past the slot end)."""
        plan = self.plan
        base = plan.slot(worker) * plan.slot_len
        t = t0
        while t < plan.slot_len:
            w = t // plan.window
            lo = w * plan.window
            hi = min(lo + plan.window, plan.slot_len)
            perm = plan.window_perm(epoch, worker, w, hi - lo) if plan.window > 1 else list(range(hi - lo))
            # read the window in position order (sequential in the tars), emit it in permuted order
            needed = sorted(perm[t - lo :])
            raws = {p: self._raw(epoch, base + lo + p) for p in needed}
            for p in perm[t - lo :]:
                raw, why = raws.pop(p)
                yield t, raw, why
                t += 1
        while True:
            raw, why = self._raw(epoch, base + t)
            yield t, raw, why
            t += 1

    # --- raw sample -> tensors
    def _prepare(
        self, raw: dict[str, Any], seed: int, out: torch.Tensor | None, out2: torch.Tensor | None
    ) -> dict[str, Any]:
        """Validate one raw sample and transform it into ``out`` (and ``out2``, the second view).

        With ``out=None`` (replay) it stops after decoding: enough to know whether the sample is usable."""
        if "json" in raw:
            try:
                meta = json.loads(raw["json"])
            except (ValueError, UnicodeDecodeError) as exc:
                raise _Skip(f"bad json: {exc}") from None
            if not isinstance(meta, dict):
                raise _Skip("bad json: not an object")
            raw = {**raw, "json": meta}  # parsed once; captions_of accepts the dict
        data = image_bytes_of(raw)
        if not data:
            raise _Skip("missing image")
        captions = [pre_caption(c, self.max_words) for c in captions_of(raw)]
        captions = [c for c in captions if c]
        if not captions:
            raise _Skip("missing or empty caption")
        try:
            with Image.open(io.BytesIO(data)) as im:
                img = im.convert("RGB")
        except Exception as exc:  # PIL raises many types (OSError, SyntaxError, DecompressionBombError, ...)
            raise _Skip(f"undecodable image: {type(exc).__name__}: {exc}") from None
        if out is None:
            return {}
        gen = torch.Generator().manual_seed(seed)
        idx = int(torch.randint(len(captions), (), generator=gen)) if self.plan.train else 0
        try:
            self.tf(img, gen, out=out)
            if out2 is not None:
                self.tf(img, gen, out=out2)
        except Exception as exc:
            raise _Skip(f"transform failed: {type(exc).__name__}: {exc}") from None
        return {"text": captions[idx], "caption_idx": idx}

    def _report(self, key: str, reason: str) -> None:
        # first few individually, then at most one summary line every 30 s per worker
        self._unlogged += 1
        now = time.monotonic()
        if self._logged < 5 or now - self._last_log > 30.0:
            more = f" (+{self._unlogged - 1} more since the last report)" if self._unlogged > 1 else ""
            log.warning("skipping sample %s: %s%s", key, reason, more)
            self._logged += 1
            self._last_log = now
            self._unlogged = 0

    def _alloc(self, n: int) -> torch.Tensor:
        """An uninitialized ``[n,3,S,S]`` batch; in a worker it lives in shared memory (as torch's default_collate
        does) so it crosses to the main process without another copy."""
        shape = (n, 3, self.tf.image_size, self.tf.image_size)
        if get_worker_info() is None:
            return torch.empty(shape)
        storage = torch.UntypedStorage._new_shared(math.prod(shape) * 4)
        return torch.empty(0).set_(storage).view(shape)

    def take(self, stream: Iterator, epoch: int, worker: int, n: int, check_only: bool = False) -> tuple:
        """Up to ``n`` good samples from ``stream`` as a batch, the skip counts by reason, the next emission index.

        Images are transformed straight into the batch tensors. ``check_only`` (replay) decodes but does not
        transform, and logs nothing."""
        images = None if check_only else self._alloc(n)
        images2 = self._alloc(n) if (not check_only and self.views == 2) else None
        items: list[dict[str, Any]] = []
        skipped: Counter[str] = Counter()
        t_next = None
        in_a_row = 0
        while len(items) < n:
            try:
                t, raw, why = next(stream)
            except StopIteration:
                break
            t_next = t + 1
            key = str(raw.get("__key__", "?")) if raw is not None else f"epoch {epoch} worker {worker} index {t}"
            i = len(items)
            try:
                if raw is None:
                    raise _Skip(why)
                item = self._prepare(
                    raw,
                    self.plan.sample_seed(epoch, worker, t),
                    images[i] if images is not None else None,
                    images2[i] if images2 is not None else None,
                )
            except _Skip as skip:
                reason = str(skip)
                skipped[reason.split(":")[0]] += 1
                if not check_only:
                    self._report(key, reason)
                in_a_row += 1
                if in_a_row > min(self.plan.num_samples, self.plan.total):
                    # the endless top-up stream has wrapped through every sample without one good one
                    raise RuntimeError(
                        f"no usable sample in {len(self.plan.paths)} shard(s): last reason {reason}"
                    ) from None
                continue
            in_a_row = 0
            item["key"] = key
            items.append(item)
        batch: dict[str, Any] = {}
        if images is not None:
            k = len(items)
            batch["image"] = images if k == n else images[:k]
            if images2 is not None:
                batch["image2"] = images2 if k == n else images2[:k]
            batch["text"] = [it["text"] for it in items]
            batch["key"] = [it["key"] for it in items]
            batch["caption_idx"] = [it["caption_idx"] for it in items]
        return batch, len(items), skipped, t_next

    def train_batches(
        self, epoch: int, step: int, worker: int, cursor: int, replay_until: int = 0
    ) -> Iterator[dict[str, Any]]:
        """Batches of steps ``step, step+W, ...`` for ``worker``, epoch after epoch, from emission ``cursor``.

        Steps below ``replay_until`` (first epoch only) are only decoded, to find which samples they used, and
        not yielded: the replay path when a state carries no cursor for this worker."""
        plan = self.plan
        steps = plan.steps_per_epoch
        while True:
            stream = self.emissions(epoch, worker, cursor)
            t = cursor
            while step < steps:
                replay = step < replay_until
                batch, _, skipped, t_next = self.take(stream, epoch, worker, plan.batch_size, check_only=replay)
                t = t_next if t_next is not None else t
                if not replay:
                    batch["_meta"] = {"epoch": epoch, "step": step, "cursor": t, "skipped": dict(skipped)}
                    yield batch
                step += plan.workers
            stream.close()
            self.reader.close()
            epoch += 1
            step -= steps
            cursor = 0
            replay_until = 0

    def eval_batches(self, worker: int) -> Iterator[dict[str, Any]]:
        lo, hi = self.plan.eval_range(worker)
        stream = ((t, *self._raw(0, t)) for t in range(lo, hi))
        while True:
            batch, k, skipped, _ = self.take(stream, 0, worker, self.plan.batch_size)
            if k:
                batch["_meta"] = {"epoch": 0, "step": -1, "cursor": -1, "skipped": dict(skipped)}
                yield batch
            if k < self.plan.batch_size:
                break
        self.reader.close()


class _Dataset(IterableDataset):
    """The per-iteration DataLoader payload: the plan plus the position to start from."""

    def __init__(self, worker: _Worker, epoch: int, step: int, cursors: list[int | None]) -> None:
        super().__init__()
        self.worker = worker
        self.epoch = epoch
        self.step = step
        self.cursors = cursors

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        plan = self.worker.plan
        if not plan.train:
            yield from self.worker.eval_batches(info.id if info is not None else 0)
            return
        W = plan.workers
        # DataLoader worker d serves role (d + step) mod W: the first batch the main process receives comes
        # from DataLoader worker 0, and it must be step ``step``'s batch.
        role = ((info.id if info is not None else 0) + self.step) % W
        first = self.step + (role - self.step) % W
        if self.cursors[role] is not None:
            yield from self.worker.train_batches(self.epoch, first, role, self.cursors[role])
            return
        # no cursor (a state from another rank, or approximate resume): replay this role's earlier batches of
        # the epoch, decoding without transforming, to learn which samples they used; exact, costs one decode each
        yield from self.worker.train_batches(self.epoch, role, role, 0, replay_until=self.step)


def ignore_job_signals(_worker_id: int = 0) -> None:
    """Leave SIGTERM/SIGUSR2 to the main process.

    Slurm signals every process of a job; a worker dying on SIGTERM would fail the step the main process is finishing
    before its preemption checkpoint. Workers still exit when the main process goes away (torch watches the parent).
    """
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)


class ShardLoader:
    """Iterable over Batch-contract dicts from webdataset shards; see the module docstring.

    ``iter(loader)`` continues from the consumed position (infinite in training). ``state_dict()`` reflects the
    batches handed to the caller (not those prefetched by workers); ``load_state_dict`` before ``iter()`` resumes
    exactly. Exposes ``steps_per_epoch``, ``epoch``, ``step``, ``skipped`` and ``skip_reasons``.
    """

    def __init__(
        self,
        cfg: DataConfig,
        *,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        train: bool = True,
        pin_memory: bool = False,
    ) -> None:
        if not cfg.shards:
            raise ValueError("data.shards: no shard pattern given")
        paths = expand_shards(cfg.shards)
        if not paths:
            raise ValueError(f"data.shards: pattern {cfg.shards!r} matches no file")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world_size {world_size}")
        workers = max(1, cfg.num_workers)
        if len(paths) < world_size * workers:
            raise ValueError(
                f"data.shards: {len(paths)} shard(s) in {cfg.shards!r} but world_size {world_size} x "
                f"max(1, data.num_workers={cfg.num_workers}) = {world_size * workers} readers need at least one "
                "each; write more (smaller) shards or lower data.num_workers"
            )
        counts = shard_sample_counts(paths)
        total = sum(counts)
        if total == 0:
            raise ValueError(f"data.shards: the shards of {cfg.shards!r} hold no samples")
        num_samples = cfg.samples_per_epoch if (cfg.samples_per_epoch and train) else total
        self.cfg = cfg
        self.seed = int(seed)
        self.rank = rank
        self.world_size = world_size
        self.train = train
        self.pin_memory = pin_memory
        self.paths = paths
        self.plan = _Plan(
            paths,
            counts,
            num_samples,
            seed=self.seed,
            rank=rank,
            world_size=world_size,
            workers=workers,
            batch_size=cfg.batch_size,
            shuffle_buffer=cfg.shuffle_buffer,
            train=train,
        )
        self.transform = _make_transform(cfg, train)
        self._epoch = 0
        self._step = 0
        # emission cursor per worker role after its last consumed batch of this epoch; None = unknown (replay)
        self._cursors: list[int | None] = [0] * workers
        self._generation = 0
        self.skipped = 0
        self.skip_reasons: Counter[str] = Counter()

    # --- sizes and position
    @property
    def steps_per_epoch(self) -> int:
        return self.plan.steps_per_epoch

    @property
    def num_samples(self) -> int:
        """Samples per epoch before padding (all ranks together)."""
        return self.plan.num_samples

    @property
    def epoch(self) -> int:
        return self._epoch

    @property
    def step(self) -> int:
        """Batches consumed in the current epoch."""
        return self._step

    def _fingerprint(self) -> dict[str, Any]:
        p = self.plan
        return {
            "seed": self.seed,
            "world_size": self.world_size,
            "workers": p.workers,
            "batch_size": p.batch_size,
            "num_samples": p.num_samples,
            "num_shards": len(p.paths),
            "total_samples": p.total,
            "shuffle_buffer": p.window,
        }

    def state_dict(self) -> dict[str, Any]:
        """Position of this rank after the batches consumed so far (plain ints, safe for weights_only loading)."""
        return {
            "version": STATE_VERSION,
            "epoch": self._epoch,
            "step": self._step,
            "rank": self.rank,
            "cursors": list(self._cursors) if None not in self._cursors else None,
            "skipped": self.skipped,
            "skip_reasons": dict(self.skip_reasons),
            "fingerprint": self._fingerprint(),
        }

    def load_state_dict(self, state: dict[str, Any], strict: bool = True) -> None:
        """Resume at ``state``'s position. A state saved with another seed, world size, worker count, batch size
        or data raises ValueError (``strict=False``: continue at the same epoch fraction, not exact)."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"loader state version {state.get('version')!r}, expected {STATE_VERSION}")
        mine, theirs = self._fingerprint(), state.get("fingerprint", {})
        diff = {k: (theirs.get(k), v) for k, v in mine.items() if theirs.get(k) != v}
        self._generation += 1  # invalidates live iterators
        self.skipped = int(state.get("skipped", 0))
        self.skip_reasons = Counter(state.get("skip_reasons", {}))
        if diff:
            detail = ", ".join(f"{k}: saved {a!r} now {b!r}" for k, (a, b) in diff.items())
            if strict:
                raise ValueError(f"loader state does not match this loader ({detail}); exact resume impossible")
            log.warning("loader state differs (%s): resuming at the same epoch fraction, not exactly", detail)
            old_workers = int(theirs.get("workers", 1))
            old_slots = int(theirs.get("world_size", 1)) * old_workers * int(theirs.get("batch_size", 1))
            old_steps = max(1, old_workers * math.ceil(int(theirs.get("num_samples", 1)) / max(1, old_slots)))
            self._epoch = int(state["epoch"])
            self._step = min(self.steps_per_epoch - 1, int(state["step"]) * self.steps_per_epoch // old_steps)
            self._cursors = self._unknown_cursors()
            return
        if not 0 <= int(state["step"]) < self.steps_per_epoch or int(state["epoch"]) < 0:
            raise ValueError(
                f"loader state position epoch {state['epoch']} step {state['step']} is outside an epoch of "
                f"{self.steps_per_epoch} steps"
            )
        self._epoch = int(state["epoch"])
        self._step = int(state["step"])
        cursors = state.get("cursors")
        if state.get("rank") != self.rank or cursors is None or len(cursors) != self.plan.workers:
            log.info(
                "loader state has no cursors for rank %d: replaying the epoch up to step %d", self.rank, self._step
            )
            self._cursors = self._unknown_cursors()
        else:
            self._cursors = [int(c) for c in cursors]

    def _unknown_cursors(self) -> list[int | None]:
        """Roles that made no batch yet this epoch start at 0; the others must be replayed."""
        return [0 if self._step <= role else None for role in range(self.plan.workers)]

    # --- iteration
    def __iter__(self) -> Iterator[dict[str, Any]]:
        self._generation += 1
        generation = self._generation
        worker = _Worker(self.plan, self.transform, self.cfg.views, self.cfg.max_words)
        if not self.train:
            dataset = _Dataset(worker, 0, 0, [None] * self.plan.workers)
        else:
            dataset = _Dataset(worker, self._epoch, self._step, list(self._cursors))
        nw = self.cfg.num_workers
        loader = DataLoader(
            dataset,
            batch_size=None,
            num_workers=nw,
            pin_memory=self.pin_memory,
            prefetch_factor=2 if nw > 0 else None,
            persistent_workers=False,  # a new iter() starts from the consumed position, so workers restart
            # its base-seed draw must not touch the global torch RNG: a resumed run creates its first iterator
            # after the RNG restore, an uninterrupted one long before, and models with dropout/MLM masking would
            # then see different random streams (every randomness here comes from explicit seeded generators)
            generator=torch.Generator(),
            worker_init_fn=ignore_job_signals if nw > 0 else None,
        )
        return self._consume(loader, generation)

    def _consume(self, loader: DataLoader, generation: int) -> Iterator[dict[str, Any]]:
        steps = self.steps_per_epoch
        W = self.plan.workers
        for batch in loader:
            if generation != self._generation:
                return  # a newer iter() or load_state_dict took over
            meta = batch.pop("_meta")
            for reason, n in meta["skipped"].items():
                self.skip_reasons[reason] += n
                self.skipped += n
            if self.train:
                if (meta["epoch"], meta["step"]) != (self._epoch, self._step):
                    raise RuntimeError(
                        f"loader order broken: got epoch {meta['epoch']} step {meta['step']}, "
                        f"expected epoch {self._epoch} step {self._step}"
                    )
                self._cursors[self._step % W] = meta["cursor"]
                self._step += 1
                if self._step == steps:
                    self._epoch += 1
                    self._step = 0
                    self._cursors = [0] * W
            yield batch

    def __repr__(self) -> str:
        return (
            f"ShardLoader({len(self.paths)} shards, {self.num_samples} samples/epoch, rank {self.rank}/"
            f"{self.world_size}, {self.plan.workers} worker(s), batch {self.plan.batch_size}, "
            f"{self.steps_per_epoch} steps/epoch)"
        )


def _make_transform(cfg: DataConfig, train: bool) -> TrainTransform | EvalTransform:
    """``albef``: RandomResizedCrop(crop_scale)+flip(+RandAugment); ``clip``: crop scale (0.9, 1), no flip;
    ``none`` (or evaluation): square resize. All normalize with cfg.mean/std."""
    if not train or cfg.transform == "none":
        return eval_transform(cfg.image_size, cfg.mean, cfg.std)
    if cfg.transform == "clip":
        return train_transform(cfg.image_size, (0.9, 1.0), False, cfg.mean, cfg.std, flip=False)
    tcl = cfg.transform == "tcl"  # TCL's views add colour jitter, grayscale and blur to ALBEF's augmentation
    return train_transform(cfg.image_size, tuple(cfg.crop_scale), cfg.randaugment, cfg.mean, cfg.std, color=tcl)
