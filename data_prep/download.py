"""Concurrent, polite image downloader used inside a shard worker (threads within one process).

Safety: only ``http``/``https`` URLs (redirects to any other scheme are refused), a socket timeout plus a total
deadline per attempt, a byte cap per file (checked against Content-Length and while reading), retries with
exponential backoff for transient errors only (timeouts, connection errors, HTTP 429/5xx), and at most
``per_host`` requests in flight to any one host. Whether the bytes are an image is decided later by decoding
(:func:`data_prep.images.process_image`), never by extension or content-type.

Images a user already downloaded are used instead of fetching: ``cache_dir/<sha1(url)>`` with or without an image
extension (see :func:`local_name`). With ``keep=True`` fetched originals that decode are saved there too.
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import dataclasses
import hashlib
import http.client
import io
import os
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable, Iterator
from typing import Any

CACHE_EXTS = ("", ".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp")
RETRY_STATUS = {408, 425, 429, 500, 502, 503, 504}


class DownloadError(Exception):
    """A failed download; ``reason`` is a short category (``http 404``, ``timeout``, ``too large``, ...)."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclasses.dataclass
class DownloadOptions:
    """Downloader settings (the ``download.*`` config section plus the cache folder)."""

    timeout: float = 10.0
    retries: int = 2
    backoff: float = 1.0
    threads: int = 32
    per_host: int = 4
    max_bytes: int = 20_000_000
    user_agent: str = "mixgen-vlp-data-prep/0.1"
    cache_dir: str | None = None
    keep: bool = False


def local_name(url: str) -> str:
    """The deterministic file name of a URL's image in ``source.images``: the sha1 hex digest of the URL string."""
    return hashlib.sha1(url.encode("utf-8")).hexdigest()


def find_cached(url: str, cache_dir: str | None) -> str | None:
    """Path of an already-downloaded copy of ``url`` in ``cache_dir``, if any."""
    if not cache_dir:
        return None
    base = os.path.join(cache_dir, local_name(url))
    for ext in CACHE_EXTS:
        if os.path.isfile(base + ext):
            return base + ext
    return None


class _SafeRedirect(urllib.request.HTTPRedirectHandler):
    """Follow redirects only to http(s) (urllib would also follow one to ftp)."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # type: ignore[no-untyped-def]
        scheme = urllib.parse.urlsplit(newurl).scheme.lower()
        if scheme not in ("http", "https"):
            raise DownloadError("unsupported scheme", f"redirect to {scheme or 'relative'}: {newurl[:200]}")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


class Downloader:
    """Fetch URLs with timeouts, retries, a size cap and per-host politeness; thread-safe."""

    def __init__(self, opts: DownloadOptions | None = None) -> None:
        self.opts = opts or DownloadOptions()
        self._opener = urllib.request.build_opener(_SafeRedirect())
        self._host_sem: dict[str, threading.BoundedSemaphore] = {}
        self._lock = threading.Lock()

    def _host(self, host: str) -> threading.BoundedSemaphore:
        with self._lock:
            sem = self._host_sem.get(host)
            if sem is None:
                sem = self._host_sem[host] = threading.BoundedSemaphore(max(1, self.opts.per_host))
            return sem

    def _attempt(self, url: str) -> bytes:
        opts = self.opts
        req = urllib.request.Request(url, headers={"User-Agent": opts.user_agent, "Accept": "image/*,*/*;q=0.8"})
        deadline = time.monotonic() + opts.timeout
        try:
            with self._opener.open(req, timeout=opts.timeout) as resp:
                length = resp.headers.get("Content-Length")
                if length and length.isdigit() and int(length) > opts.max_bytes:
                    raise DownloadError("too large", f"Content-Length {length} > max_bytes {opts.max_bytes}")
                buf = io.BytesIO()
                while True:
                    chunk = resp.read(65536)
                    if not chunk:
                        break
                    buf.write(chunk)
                    if buf.tell() > opts.max_bytes:
                        raise DownloadError("too large", f"more than max_bytes {opts.max_bytes}")
                    if time.monotonic() > deadline:
                        # a server trickling bytes never trips the per-read socket timeout
                        raise DownloadError("timeout", f"transfer exceeded {opts.timeout}s")
                return buf.getvalue()
        except DownloadError:
            raise
        except urllib.error.HTTPError as exc:
            raise DownloadError(f"http {exc.code}", str(exc.reason)) from exc
        except TimeoutError as exc:
            raise DownloadError("timeout", str(exc)) from exc
        except urllib.error.URLError as exc:
            if isinstance(exc.reason, TimeoutError):
                raise DownloadError("timeout", str(exc.reason)) from exc
            if isinstance(exc.reason, DownloadError):
                raise exc.reason from exc
            raise DownloadError("connection error", str(exc.reason)) from exc
        except (http.client.HTTPException, ConnectionError, OSError) as exc:
            raise DownloadError("connection error", f"{type(exc).__name__}: {exc}") from exc

    def fetch(self, url: str) -> bytes:
        """Download ``url`` (or read its cached copy); raises :class:`DownloadError`."""
        cached = find_cached(url, self.opts.cache_dir)
        if cached:
            with open(cached, "rb") as fh:
                return fh.read()
        parts = urllib.parse.urlsplit(url)
        if parts.scheme.lower() not in ("http", "https"):
            raise DownloadError("unsupported scheme", f"{parts.scheme or 'none'}: {url[:200]}")
        if not parts.hostname:
            raise DownloadError("bad url", url[:200])
        sem = self._host(parts.hostname.lower())
        attempt = 0
        while True:
            try:
                with sem:
                    data = self._attempt(url)
                break
            except DownloadError as exc:
                transient = exc.reason in ("timeout", "connection error") or (
                    exc.reason.startswith("http ") and int(exc.reason[5:]) in RETRY_STATUS
                )
                if not transient or attempt >= self.opts.retries:
                    raise
                # sleep outside the host semaphore so other URLs on that host proceed
                time.sleep(self.opts.backoff * (2**attempt))
                attempt += 1
        if self.opts.keep and self.opts.cache_dir:
            self._save(url, data)
        return data

    def _save(self, url: str, data: bytes) -> None:
        from PIL import Image

        try:  # keep only real images in the cache
            Image.open(io.BytesIO(data)).verify()
        except Exception:  # noqa: BLE001 - any decoding failure means "do not cache"
            return
        os.makedirs(self.opts.cache_dir or ".", exist_ok=True)
        path = os.path.join(self.opts.cache_dir or ".", local_name(url))
        tmp = f"{path}.tmp.{os.getpid()}.{threading.get_ident()}"
        with open(tmp, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)

    def map_ordered(
        self,
        items: Iterable[Any],
        url_of: Callable[[Any], str | None],
        window: int | None = None,
        then: Callable[[Any, bytes], Any] | None = None,
    ) -> Iterator[tuple[Any, Any]]:
        """Yield ``(item, result)`` in input order, working on up to ``window`` items ahead.

        ``result`` is the downloaded bytes, or ``then(item, bytes)`` when ``then`` is given (run in the same
        download thread, right after the fetch), or the :class:`DownloadError` / exception it raised; items whose
        ``url_of`` is None pass through with ``None``. Results come back in order so the caller can write
        deterministically, while the bounded window caps memory at ``window`` images.

        Why ``then`` runs in the download threads: decoding and encoding in the consuming thread made it a serial
        stage that had to win the GIL back from every network thread after each of PIL's GIL-free sections, so
        more threads made the whole pipeline slower. Spread over the threads, that work scales with them until
        the CPU is full (bench/download.py, docs/benchmarks.md).
        """
        threads = max(1, self.opts.threads)
        window = window or max(2, threads * 2)
        with cf.ThreadPoolExecutor(max_workers=threads, thread_name_prefix="dl") as pool:
            pending: collections.deque[tuple[Any, cf.Future | None]] = collections.deque()
            it = iter(items)
            exhausted = False
            while True:
                while not exhausted and len(pending) < window:
                    try:
                        item = next(it)
                    except StopIteration:
                        exhausted = True
                        break
                    url = url_of(item)
                    pending.append((item, pool.submit(self._work, item, url, then) if url else None))
                if not pending:
                    return
                item, fut = pending.popleft()
                yield item, (fut.result() if fut is not None else None)

    def _work(self, item: Any, url: str, then: Callable[[Any, bytes], Any] | None) -> Any:
        data = self._fetch_safe(url)
        if then is None or isinstance(data, DownloadError):
            return data
        try:
            return then(item, data)
        except Exception as exc:  # noqa: BLE001 - handed to the consumer, which reports it per item
            return exc

    def _fetch_safe(self, url: str) -> bytes | DownloadError:
        try:
            return self.fetch(url)
        except DownloadError as exc:
            return exc
        except Exception as exc:  # noqa: BLE001 - one bad URL must never kill the shard
            return DownloadError("download error", f"{type(exc).__name__}: {exc}")
