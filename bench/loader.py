"""Loader throughput against its bare limit.

Anchor: decode + the same train transform in a tight loop in one process, on the same samples held in memory.
The loader runs one epoch over generated shards (USTAR tars, as data_prep writes them) with 0, 1 and 2 DataLoader
workers. Two ratios:

* wall: loader samples/s / (max(1, workers) x bare samples/s), the efficiency per worker (target >= 85 %),
  timed from the first batch to the last (worker start-up is shown apart). Needs idle cores to mean anything.
* cpu: bare CPU time per sample / loader CPU time per sample (main process + workers, start-up included);
  insensitive to other load on the machine, so it is the number to compare across runs on a shared box.

    .venv/bin/python bench/loader.py [--samples 512 --src-size 256 --image-size 224 --batch-size 32]
"""

from __future__ import annotations

import argparse
import gc
import io
import json
import os
import resource
import sys
import tarfile
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from data_prep.schema import sample_key  # noqa: E402
from data_prep.transforms import pre_caption, train_transform  # noqa: E402
from pretrain.config import DataConfig  # noqa: E402
from pretrain.data import ShardLoader  # noqa: E402


def _photo_like(rng: np.random.Generator, size: int) -> bytes:
    """A smooth gradient with a few blocks: compresses and decodes like a photo, unlike pure noise."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    img = np.stack([x, y, (x + y) / 2], -1) * rng.uniform(80, 255, 3)
    for _ in range(6):
        x0, y0 = rng.integers(0, size - 16, 2)
        w, h = rng.integers(8, size // 2, 2)
        img[y0 : y0 + h, x0 : x0 + w] = rng.uniform(0, 255, 3)
    img += rng.normal(0, 6, img.shape)
    buf = io.BytesIO()
    Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def make_shards(root: Path, samples: int, shards: int, size: int) -> list[tuple[bytes, list[str]]]:
    rng = np.random.default_rng(0)
    per = -(-samples // shards)
    raw: list[tuple[bytes, list[str]]] = []
    entries = []
    for s in range(shards):
        n = min(per, samples - s * per)
        with tarfile.open(root / f"{s:05d}.tar", "w", format=tarfile.USTAR_FORMAT) as tf:
            for i in range(n):
                key = sample_key(s, i, per)
                jpg = _photo_like(rng, size)
                caps = [f"A synthetic photo {s} {i} of blocks.", f"Colored blocks, number {i}"]
                files = {"jpg": jpg, "json": json.dumps({"captions": caps}).encode(), "txt": caps[0].encode()}
                for ext, data in files.items():
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tf.addfile(info, io.BytesIO(data))
                raw.append((jpg, caps))
        entries.append({"name": f"{s:05d}.tar", "samples": n})
    (root / "manifest.json").write_text(json.dumps({"shards": entries}))
    return raw


def cpu_seconds() -> float:
    """CPU time of this process plus its reaped children (the loader's workers once joined)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def bare_rate(raw: list[tuple[bytes, list[str]]], image_size: int) -> tuple[float, float]:
    """(samples/s, CPU s/sample)."""
    tf = train_transform(image_size)
    c0 = cpu_seconds()
    t0 = time.perf_counter()
    for i, (jpg, caps) in enumerate(raw):
        gen = torch.Generator().manual_seed(i)
        with Image.open(io.BytesIO(jpg)) as im:
            img = im.convert("RGB")
        _ = [pre_caption(c) for c in caps]
        tf(img, gen)
    wall = time.perf_counter() - t0
    return len(raw) / wall, (cpu_seconds() - c0) / len(raw)


class _Transport(torch.utils.data.IterableDataset):
    """Batches of the right shape written into shared memory, with no decoding: torch's hand-over cost alone."""

    def __init__(self, batches: int, batch_size: int, image_size: int) -> None:
        super().__init__()
        self.batches, self.shape = batches, (batch_size, 3, image_size, image_size)

    def __iter__(self):
        sample = torch.randn(self.shape[1:])
        for _ in range(self.batches):
            storage = torch.UntypedStorage._new_shared(sample.numel() * 4 * self.shape[0])
            out = torch.empty(0).set_(storage).view(self.shape)
            for i in range(self.shape[0]):
                out[i].copy_(sample)
            yield {"image": out, "text": ["a caption"] * self.shape[0]}


def transport_cpu(batches: int, batch_size: int, image_size: int) -> float:
    """CPU s/sample (main + worker) of moving batches from one DataLoader worker to the main process."""
    gc.collect()
    c0 = cpu_seconds()
    dl = torch.utils.data.DataLoader(_Transport(batches, batch_size, image_size), batch_size=None, num_workers=1)
    for _ in dl:
        pass
    del dl
    return (cpu_seconds() - c0) / (batches * batch_size)


def loader_rate(cfg: DataConfig) -> tuple[float, float, float, int]:
    """(steady samples/s, CPU s/sample incl. workers and start-up, start-up s, steps)."""
    gc.collect()  # not inside the timed window: a full collection costs as much as dozens of samples
    c0 = cpu_seconds()
    loader = ShardLoader(cfg, seed=0)
    steps = loader.steps_per_epoch
    t0 = time.perf_counter()
    it = iter(loader)
    next(it)
    t1 = time.perf_counter()
    for _ in range(steps - 1):
        next(it)
    t2 = time.perf_counter()
    it.close()  # joins the workers, so their CPU time is in RUSAGE_CHILDREN
    cpu = (cpu_seconds() - c0) / (steps * cfg.batch_size)
    return (steps - 1) * cfg.batch_size / (t2 - t1), cpu, t1 - t0, steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=512)
    ap.add_argument("--shards", type=int, default=8)
    ap.add_argument("--src-size", type=int, default=256)
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    args = ap.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        raw = make_shards(root, args.samples, args.shards, args.src_size)
        bare_rate(raw[:32], args.image_size)  # warm-up
        bare, bare_cpu = bare_rate(raw, args.image_size)
        print(
            f"{args.samples} samples, {args.src_size}px JPEG -> {args.image_size}px, batch {args.batch_size}, "
            f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}"
        )
        print(
            f"{'setup':<22}{'samples/s':>11}{'wall ratio':>12}{'CPU us/sample':>15}{'CPU ratio':>11}{'startup s':>11}"
        )
        print(f"{'bare (1 process)':<22}{bare:>11.1f}{1:>12.2f}{bare_cpu * 1e6:>15.0f}{1:>11.2f}{'-':>11}")
        for nw in args.workers:
            cfg = DataConfig(
                shards=str(root / "*.tar"),
                batch_size=args.batch_size,
                num_workers=nw,
                image_size=args.image_size,
                shuffle_buffer=256,
            )
            rate, cpu, startup, _ = loader_rate(cfg)
            ratio = rate / (max(1, nw) * bare)
            name = f"loader, {nw} worker(s)"
            print(f"{name:<22}{rate:>11.1f}{ratio:>12.2f}{cpu * 1e6:>15.0f}{bare_cpu / cpu:>11.2f}{startup:>11.2f}")
        cpu = transport_cpu(max(1, args.samples // args.batch_size), args.batch_size, args.image_size)
        print(f"{'torch hand-over only':<22}{'-':>11}{'-':>12}{cpu * 1e6:>15.0f}{'-':>11}{'-':>11}")
        print(
            "(hand-over only: a DataLoader worker writing ready tensors into shared memory; part of every worker row)"
        )


if __name__ == "__main__":
    main()
