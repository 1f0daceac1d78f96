"""URL ingestion end to end: our CC3M build against img2dataset on the same loopback HTTP server, interleaved.

A server process on 127.0.0.1 serves ``--num`` photo-like JPEGs (``--size``² px), 5 URLs answering 404 and one
answering text, over HTTP/1.0 (a new connection per image), or HTTP/1.1 with keep-alive (``--keep-alive``). Each
round runs, in turn and for each ``--threads`` value: ``python -m data_prep build`` (cc3m recipe, ``workers``
processes, ``download.threads`` = ``download.per_host`` = T) and, when installed in its own venv, ``img2dataset``
(``processes_count`` processes, ``thread_count`` = T), both to ``--image-size`` keep-ratio webdataset shards.
Anchor: the bare decode+resize+encode loop on the same bytes in ``workers`` processes at once (the CPU limit, no
network and no server). Rows report the whole command's wall time and CPU (start-up included: the default 10,000
images amortise it); best of ``--rounds`` interleaved rounds per row, and the load average beside each.

    .venv/bin/python bench/download.py [--num 10000] [--threads 4,16] [--rounds 2] [--keep-alive]
                                       [--i2d /work/venv-i2d/bin/img2dataset]
    .venv/bin/python bench/download.py --profile [--num 3000] [--threads 4] [--keep-alive]

``--profile`` instead runs one build in this process (``workers=0``, the first ``--threads`` value) and splits its
CPU per image by component, thread CPU time (robust to other load): decode+resize+encode, HTTP fetch, tar writing,
the rest of the download threads and of the main thread; then the same requests fetched alone (a raw-socket floor
and the project's client, one at a time, no decoding); plus the start-up CPU of the real command.

img2dataset is never a dependency of the project: install it in a separate venv
(``python3 -m venv /work/venv-i2d && /work/venv-i2d/bin/pip install img2dataset``) or leave it out.
"""

from __future__ import annotations

import argparse
import io
import json
import multiprocessing as mp
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from PIL import Image  # noqa: E402

from data_prep.images import process_image  # noqa: E402


def make_jpegs(count: int, size: int) -> list[bytes]:
    """Distinct photo-like JPEGs (gradient + noise + shapes), ``size``² px, quality 90."""
    out = []
    base = Image.linear_gradient("L").resize((size, size)).convert("RGB")
    for i in range(count):
        noise = Image.effect_noise((size, size), 12 + i % 20).convert("RGB")
        img = Image.blend(base, noise, 0.3)
        img.paste((40 * i % 255, 90, 160), (i % size // 2, 20, i % size // 2 + size // 4, 20 + size // 4))
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def serve(
    port_q: mp.Queue,
    stop: mp.Event,
    num_distinct: int,
    size: int,
    delay: float,
    backlog: int = 1024,
    keep_alive: bool = False,
) -> None:
    """The loopback server (its own process): /img/<i>.jpg, /missing/<i> (404), /text (not an image).

    HTTP/1.0 (a new connection per request: the costliest case, and all img2dataset's client ever makes), or
    HTTP/1.1 with keep-alive when ``keep_alive`` (as web servers commonly allow; our client reuses connections).
    """
    images = make_jpegs(num_distinct, size)

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1" if keep_alive else "HTTP/1.0"
        # headers and body go out in two writes: with Nagle on, a kept-alive connection waits for the client's
        # delayed ACK (40 ms) before the body's last segment; web servers set TCP_NODELAY too
        disable_nagle_algorithm = keep_alive

        def log_message(self, *args):  # noqa: ANN002 - quiet
            pass

        def do_GET(self):  # noqa: N802 - http.server API
            if delay:
                time.sleep(delay)
            if self.path.startswith("/img/"):
                body, ctype = images[int(self.path[5:].split(".")[0]) % len(images)], "image/jpeg"
            elif self.path == "/text":
                body, ctype = b"this is not an image\n" * 20, "text/plain"
            else:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            try:
                self.wfile.write(body)
            except (BrokenPipeError, ConnectionResetError):
                pass

    class Server(ThreadingHTTPServer):
        daemon_threads = True
        # listen() backlog: the default 5 drops connections beyond it, and each dropped SYN costs the client a 1 s
        # retransmit, which looks exactly like "more threads are slower"
        request_queue_size = backlog

    httpd = Server(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    port_q.put(httpd.server_address[1])
    stop.wait()
    httpd.shutdown()


def _bare_worker(args: tuple[list[bytes], int, int]) -> tuple[int, float]:
    images, image_size, reps = args
    c0 = time.process_time()
    for _ in range(reps):
        for data in images:
            process_image(data, image_size, "keep_ratio", 95)
    return reps * len(images), time.process_time() - c0


def bare_limit(images: list[bytes], image_size: int, procs: int, reps: int) -> tuple[float, float]:
    """(images/s, images per CPU-second) of ``procs`` processes running the bare decode+resize+encode loop at once."""
    ctx = mp.get_context("spawn")
    with ctx.Pool(procs) as pool:
        pool.map(_bare_worker, [(images[:2], image_size, 1)] * procs)  # warm-up: imports and first calls
        t0 = time.perf_counter()
        res = pool.map(_bare_worker, [(images, image_size, reps)] * procs)
        dt = time.perf_counter() - t0
    n = sum(r[0] for r in res)
    return n / dt, n / sum(r[1] for r in res)


def children_cpu() -> float:
    """CPU seconds (user + sys) of every waited-for descendant: a build command and its worker processes."""
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def stats_rate(out: str) -> float:
    """Samples per second by the tool's own per-shard stats: successes / (last shard end - first shard start)."""
    starts, ends, ok = [], [], 0
    for name in os.listdir(out):
        if name.endswith("_stats.json"):
            with open(os.path.join(out, name)) as fh:
                st = json.load(fh)
            starts.append(st["start_time"])
            ends.append(st["end_time"])
            ok += st["successes"]
    return ok / (max(ends) - min(starts))


def load() -> str:
    return f"{os.getloadavg()[0]:.1f}"


def run_ours(
    tsv: str, out: str, image_size: int, workers: int, threads: int, per_shard: int = 500
) -> tuple[float, float, int, float]:
    shutil.rmtree(out, ignore_errors=True)
    cmd = [
        sys.executable, "-m", "data_prep", "build", "source.format=cc3m", f"source.tsv={tsv}", f"out.dir={out}",
        f"out.image_size={image_size}", f"out.samples_per_shard={per_shard}", f"workers={workers}", "progress=false",
        f"download.threads={threads}", f"download.per_host={threads}", "download.retries=0", "download.timeout=10",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    t0, c0 = time.perf_counter(), children_cpu()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    dt, cpu = time.perf_counter() - t0, children_cpu() - c0
    if proc.returncode != 0:
        raise RuntimeError(proc.stdout[-2000:] + proc.stderr[-2000:])
    with open(os.path.join(out, "manifest.json")) as fh:
        return dt, cpu, json.load(fh)["num_samples"], stats_rate(out)


def run_i2d(
    exe: str, tsv: str, out: str, image_size: int, workers: int, threads: int
) -> tuple[float, float, int, float]:
    shutil.rmtree(out, ignore_errors=True)
    cmd = [
        exe, "--url_list", tsv, "--input_format", "tsv", "--url_col", "url", "--caption_col", "caption",
        "--output_folder", out, "--output_format", "webdataset", "--image_size", str(image_size),
        "--resize_mode", "keep_ratio", "--processes_count", str(workers), "--thread_count", str(threads),
        "--number_sample_per_shard", "500", "--encode_quality", "95", "--retries", "0", "--timeout", "10",
        "--enable_wandb", "False", "--distributor", "multiprocessing", "--compute_hash", "None",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "NO_ALBUMENTATIONS_UPDATE": "1"}
    env.pop("PYTHONPATH", None)
    t0, c0 = time.perf_counter(), children_cpu()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=tempfile.gettempdir())
    dt, cpu = time.perf_counter() - t0, children_cpu() - c0
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-2000:])
    ok = 0
    for name in os.listdir(out):
        if name.endswith("_stats.json"):
            with open(os.path.join(out, name)) as fh:
                ok += json.load(fh)["successes"]
    return dt, cpu, ok, stats_rate(out)


def write_tsv(path: str, base: str, num: int, extras: bool = True) -> None:
    """``num`` image URLs, then (``extras``) 5 answering 404 and one answering text."""
    with open(path, "w") as fh:
        fh.write("caption\turl\n")
        for i in range(num):
            fh.write(f"picture number {i}\t{base}/img/{i}.jpg\n")
        if extras:
            for i in range(5):
                fh.write(f"gone {i}\t{base}/missing/{i}\n")
            fh.write(f"not an image\t{base}/text\n")


def _thread_cpu() -> tuple[float, float]:
    r = resource.getrusage(resource.RUSAGE_THREAD)
    return r.ru_utime, r.ru_stime


def fetch_floors(base: str, n: int, keep_alive: bool) -> list[tuple[str, float, float]]:
    """(label, user ms, sys ms) per image of fetching alone, one request at a time in this thread (no decoding).

    The raw row is the least a Python client can do: a blocking socket (reused with keep-alive), one ``sendall``,
    ``recv_into`` a preallocated buffer, the body sliced out; no URL parsing, safety checks or timeouts. The
    Downloader row is the project's client doing the same requests. Both run without other threads, so the
    difference to the in-build figure is what concurrency (GIL hand-overs, cold caches after each decode) adds.
    """
    import socket

    from data_prep.download import Downloader, DownloadOptions

    host, port = base.rsplit("//", 1)[1].split(":")
    buf = bytearray(1 << 21)
    view = memoryview(buf)

    def raw_get(sock: socket.socket, i: int) -> bytes:
        sock.sendall(f"GET /img/{i}.jpg HTTP/1.1\r\nHost: {host}\r\n\r\n".encode("ascii"))
        got = 0
        while (end := buf.find(b"\r\n\r\n", 0, got)) < 0:
            got += sock.recv_into(view[got:])
        at = buf.find(b"Content-Length: ", 0, end) + 16
        need = end + 4 + int(buf[at : buf.find(b"\r\n", at)])
        while got < need:
            got += sock.recv_into(view[got:])
        return bytes(view[end + 4 : need])

    rows = []
    sock = socket.create_connection((host, int(port))) if keep_alive else None
    u0, s0 = _thread_cpu()
    for i in range(n):
        if not keep_alive:
            sock = socket.create_connection((host, int(port)))
        raw_get(sock, i)
        if not keep_alive:
            sock.close()
    u1, s1 = _thread_cpu()
    if sock is not None:
        sock.close()
    rows.append(("raw socket, one request at a time", (u1 - u0) * 1e3 / n, (s1 - s0) * 1e3 / n))
    with Downloader(DownloadOptions(threads=1, per_host=1, retries=0, timeout=10)) as dl:
        urls = [f"{base}/img/{i}.jpg" for i in range(n)]
        dl.fetch(urls[0])
        u0, s0 = _thread_cpu()
        for url in urls:
            dl.fetch(url)
        u1, s1 = _thread_cpu()
    rows.append(("Downloader.fetch, one request at a time", (u1 - u0) * 1e3 / n, (s1 - s0) * 1e3 / n))
    return rows


def profile(base: str, tmp: str, images: list[bytes], args: argparse.Namespace) -> None:
    """One in-process build with thread CPU time per component (see the module doc), and the command's start-up."""
    import data_prep.download as dl_mod
    import data_prep.shards as shards_mod
    from data_prep.build import BuildConfig, run_build
    from launch.config import load_config

    threads = int(args.threads.split(",")[0])
    spent: dict[str, float] = {"process": 0.0, "fetch": 0.0, "write": 0.0, "dl threads": 0.0}
    lock = threading.Lock()

    def timed(key: str, fn):  # noqa: ANN001, ANN202 - a local wrapper
        def wrapper(*a, **k):  # noqa: ANN002, ANN003, ANN202
            c0 = time.thread_time()
            try:
                return fn(*a, **k)
            finally:
                with lock:
                    spent[key] += time.thread_time() - c0

        return wrapper

    real_run = threading.Thread.run

    def thread_run(self: threading.Thread) -> None:  # every download thread's whole CPU
        if not self.name.startswith("dl_"):
            return real_run(self)
        timed("dl threads", real_run)(self)

    tsv, warm_tsv = os.path.join(tmp, "profile.tsv"), os.path.join(tmp, "warm.tsv")
    write_tsv(tsv, base, args.num, extras=False)
    write_tsv(warm_tsv, base, min(200, args.num), extras=False)

    def build(out: str, tsv: str = tsv) -> Any:
        cfg = load_config(BuildConfig, None, [
            "source.format=cc3m", f"source.tsv={tsv}", f"out.dir={out}", f"out.image_size={args.image_size}",
            "out.samples_per_shard=500", "workers=0", "progress=false", f"download.threads={threads}",
            f"download.per_host={threads}", "download.retries=0", "download.timeout=10",
        ])  # fmt: skip
        return run_build(cfg)

    build(os.path.join(tmp, "warm"), warm_tsv)  # lazy imports and first calls
    patches = [
        (threading.Thread, "run", thread_run),
        (shards_mod, "process_image", timed("process", shards_mod.process_image)),
        (dl_mod.Downloader, "fetch", timed("fetch", dl_mod.Downloader.fetch)),
        (shards_mod.ShardWriter, "write", timed("write", shards_mod.ShardWriter.write)),
    ]
    saved = [(obj, name, getattr(obj, name)) for obj, name, _ in patches]
    for obj, name, new in patches:
        setattr(obj, name, new)
    try:
        c0, m0 = time.process_time(), time.thread_time()
        n = build(os.path.join(tmp, "profiled")).samples
        total, main_cpu = time.process_time() - c0, time.thread_time() - m0
    finally:
        for obj, name, old in saved:
            setattr(obj, name, old)
    c0 = time.process_time()
    for data in images * 8:
        process_image(data, args.image_size, "keep_ratio", 95)
    bare = (time.process_time() - c0) / (8 * len(images))

    start_tsv = os.path.join(tmp, "startup.tsv")
    write_tsv(start_tsv, base, args.workers, extras=False)
    _, start_cpu, _, _ = run_ours(start_tsv, os.path.join(tmp, "startup"), args.image_size, args.workers, threads, 1)

    ms = 1e3 / n
    rows = [
        ("decode+resize+encode (process_image)", spent["process"], f"bare loop here: {bare * 1e3:.3f}"),
        ("HTTP fetch (Downloader.fetch)", spent["fetch"], "keep-alive" if args.keep_alive else "HTTP/1.0"),
        ("download threads, rest", spent["dl threads"] - spent["process"] - spent["fetch"], "hand-off, queue"),
        ("tar writing (ShardWriter.write)", spent["write"], "main thread"),
        ("main thread, rest", main_cpu - spent["write"], "TSV, fingerprint, ordering, sample json"),
        ("other threads", total - main_cpu - spent["dl threads"], ""),
    ]
    print(f"\nprofile: one in-process build (workers=0, {threads} threads), {n} images; CPU ms per image")
    for label, sec, note in rows:
        print(f"  {label:<40} {sec * ms:7.3f}  {note}")
    print(
        f"  {'total (process CPU)':<40} {total * ms:7.3f}  = {bare / (total / n):.0%} of the bare loop's images/CPU-s"
    )
    print("fetch alone, no build around it (user + sys CPU ms per image):")
    for label, user, sys_ in fetch_floors(base, n, args.keep_alive):
        print(f"  {label:<40} {user + sys_:7.3f}  user {user:.3f}, sys {sys_:.3f}")
    print(
        f"start-up of the command (python -m data_prep build, workers={args.workers}, {args.workers} images): "
        f"{start_cpu:.3f} CPU-s = {start_cpu * 1e3 / args.num:.3f} ms per image at --num {args.num}"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--num", type=int, default=10000, help="images per build (large: start-up is amortised)")
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--image-size", type=int, default=256)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--threads", default="4,16", help="comma list of in-flight downloads per process")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--delay", type=float, default=0.0, help="seconds the server waits before each answer")
    ap.add_argument("--backlog", type=int, default=1024, help="the server's listen() backlog (Python's default: 5)")
    ap.add_argument("--i2d", default="/work/venv-i2d/bin/img2dataset", help="img2dataset executable ('' = skip)")
    ap.add_argument("--keep-alive", action="store_true", help="the server speaks HTTP/1.1 and keeps connections")
    ap.add_argument("--profile", action="store_true", help="CPU per image by component of one in-process build")
    args = ap.parse_args()
    threads = [int(t) for t in args.threads.split(",") if t.strip()]
    have_i2d = bool(args.i2d) and os.path.exists(args.i2d)
    tmp = tempfile.mkdtemp(prefix="bench_download_")
    ctx = mp.get_context("spawn")
    port_q, stop = ctx.Queue(), ctx.Event()
    distinct = 64
    server = ctx.Process(
        target=serve, args=(port_q, stop, distinct, args.size, args.delay, args.backlog, args.keep_alive), daemon=True
    )
    server.start()
    try:
        port = port_q.get(timeout=60)
        base = f"http://127.0.0.1:{port}"
        images = make_jpegs(distinct, args.size)
        if args.profile:
            profile(base, tmp, images, args)
            return
        tsv = os.path.join(tmp, "urls.tsv")
        write_tsv(tsv, base, args.num)
        kb = sum(len(b) for b in images) / len(images) / 1e3
        print(
            f"{args.num} x {args.size}² JPEGs (~{kb:.0f} KB) + 5 x 404 + 1 text from 127.0.0.1 (delay {args.delay}s,"
            f" backlog {args.backlog}, {'HTTP/1.1 keep-alive' if args.keep_alive else 'HTTP/1.0'})"
            f" -> {args.image_size} keep_ratio, {args.workers} processes; {os.cpu_count()} CPUs; best of"
            f" {args.rounds} interleaved rounds; img2dataset: {'yes' if have_i2d else 'not installed'}"
        )
        best: dict[tuple[str, int], tuple[float, float, str, float]] = {}

        def keep(key: tuple[str, int], wall: float, cpu: float, ld: str, own: float = 0.0) -> None:
            old = best.get(key, (0.0, 0.0, "", 0.0))
            best[key] = (max(old[0], wall), max(old[1], cpu), ld if wall > old[0] else old[2], max(old[3], own))

        reps = max(1, args.num // (distinct * args.workers))  # about as many images as a build
        for rnd in range(args.rounds):
            ld = load()
            keep(("bare", 0), *bare_limit(images, args.image_size, args.workers, reps), ld)
            for t in threads:
                ld = load()
                dt, cpu, n, own = run_ours(tsv, os.path.join(tmp, "ours"), args.image_size, args.workers, t)
                assert n == args.num, n
                keep(("ours", t), n / dt, n / cpu, ld, own)
                if have_i2d:
                    ld = load()
                    dt, cpu, n, own = run_i2d(args.i2d, tsv, os.path.join(tmp, "i2d"), args.image_size, args.workers, t)
                    keep(("i2d", t), n / dt, n / cpu, ld, own)
            print(f"round {rnd + 1} done", flush=True)
        bare = best[("bare", 0)]
        print(
            f"\n{'pipeline':<36} {'thr':>4} {'img/s':>7} {'vs i2d':>7} {'vs bare':>8} {'img/CPU-s':>9} {'vs i2d':>7}"
            f" {'vs bare':>8} {'stats/s':>7} {'vs i2d':>7} {'load':>5}"
        )

        def row(label: str, t: str, r: tuple, ref: tuple | None) -> None:
            vs_wall = f"{r[0] / ref[0]:.2f}x" if ref else "-"
            vs_cpu = f"{r[1] / ref[1]:.2f}x" if ref else "-"
            own = f"{r[3]:.1f}" if r[3] else "-"
            vs_own = f"{r[3] / ref[3]:.2f}x" if ref and ref[3] and r[3] else "-"
            print(
                f"{label:<36} {t:>4} {r[0]:>7.1f} {vs_wall:>7} {r[0] / bare[0]:>8.0%} {r[1]:>9.1f} {vs_cpu:>7}"
                f" {r[1] / bare[1]:>8.0%} {own:>7} {vs_own:>7} {r[2]:>5}"
            )

        row(f"bare loop, {args.workers} procs (anchor)", "-", bare, None)
        for t in threads:
            i2d = best.get(("i2d", t))
            row("data_prep build (cc3m)", str(t), best[("ours", t)], i2d)
            if i2d:
                row("img2dataset", str(t), i2d, i2d)
        print(
            "\nimg/s = samples written / wall time of the whole command (start-up included); img/CPU-s = samples per"
            "\nCPU-second of the command and all its processes (the server excluded); stats/s = the tool's own"
            "\nper-shard stats (successes / first shard start to last shard end: no start-up); load = 1-min average."
        )
    finally:
        stop.set()
        server.join(timeout=10)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
