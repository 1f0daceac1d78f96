"""Concurrent, polite image downloader used inside a shard worker (threads within one process).

Safety: only ``http``/``https`` URLs (redirects to any other scheme are refused, at most ``MAX_REDIRECTS`` hops),
a socket timeout plus a total deadline per attempt, a byte cap per file (checked against Content-Length and while
reading), retries with exponential backoff for transient errors only (timeouts, connection errors, HTTP 429/5xx),
and at most ``per_host`` requests in flight to any one host. HTTPS verifies certificates and host names
(:func:`ssl.create_default_context`). Whether the bytes are an image is decided later by decoding
(:func:`data_prep.images.process_image`), never by extension or content-type.

The client is a small HTTP/1.1 GET over sockets rather than ``urllib``: urllib's opener, handler chain and
``email``-based header parsing cost about as much CPU per image as the connection itself (bench/download.py,
docs/benchmarks.md). Idle connections are kept for reuse (keep-alive) when the server allows it. When the environment
configures a proxy for a URL (``http_proxy``/``https_proxy``, ``no_proxy``), that URL goes through urllib as before.

Images a user already downloaded are used instead of fetching: ``cache_dir/<sha1(url)>`` with or without an image
extension (see :func:`local_name`). With ``keep=True`` fetched originals that decode are saved there too.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import io
import os
import queue
import re
import socket
import string
import sys
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterable, Iterator
from typing import Any

CACHE_EXTS = ("", ".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp")
RETRY_STATUS = {408, 425, 429, 500, 502, 503, 504}
REDIRECT_STATUS = {301, 302, 303, 307, 308}
MAX_REDIRECTS = 10  # as urllib's HTTPRedirectHandler.max_redirections
MAX_HEAD_BYTES = 65536  # status line plus headers (http.client allows 100 lines of up to 64 KiB each)
MAX_HEADERS = 100  # as http.client
KEEPALIVE_IDLE = 4.0  # seconds an idle connection may wait for reuse; servers commonly drop them after 5 s
_RECV = 65536  # per read of a response head or a body of unknown length
_BODY_RECV = 262144  # per read of a body of known length
_UNSAFE = re.compile(r"[^!-~]")  # not printable ASCII: percent-encode the request target
_HEAD_END = re.compile(rb"\r?\n\r?\n")
_HOST_OK = re.compile(r"[A-Za-z0-9._~%:-]+")  # after IDNA; anything else could smuggle bytes into the request
_HEX = re.compile(rb"[0-9A-Fa-f]{1,16}")
_STATUS_LINE = re.compile(rb"HTTP/1\.(\d) (\d\d\d)(?: ([^\r\n]*))?\r?(?:\n|$)")
_FIELDS = re.compile(
    rb"^(content-length|transfer-encoding|connection|location|uri)[ \t]*:[ \t]*([^\r\n]*?)[ \t]*\r?$", re.I | re.M
)


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


def _env_proxies() -> dict[str, str]:
    """The http/https proxies urllib would use; without ``*_proxy`` variables on Linux, none (and no urllib import)."""
    if sys.platform.startswith("linux") and not any(k.lower().endswith("_proxy") for k in os.environ):
        return {}  # urllib.request.getproxies() reads only the environment here
    import urllib.request

    return {k: v for k, v in urllib.request.getproxies().items() if k in ("http", "https")}


class _Raised:
    """A BaseException (SystemExit, KeyboardInterrupt) a download thread hit, re-raised to the consumer."""

    __slots__ = ("exc",)

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


class _Stale(Exception):
    """A kept-alive connection the server had already closed: no byte of a response came back."""


class _Conn:
    """An open connection to ``key`` = (scheme, host, port) and the bytes read past what was consumed."""

    __slots__ = ("sock", "key", "buf", "idle_since")

    def __init__(self, sock: socket.socket, key: tuple[str, str, int]) -> None:
        self.sock = sock
        self.key = key
        self.buf: bytes | memoryview = b""  # a view into the last recv: the body's first bytes are not copied
        self.idle_since = 0.0

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


class Downloader:
    """Fetch URLs with timeouts, retries, a size cap and per-host politeness; thread-safe.

    Idle keep-alive connections are closed by :meth:`close` (also at the end of :meth:`map_ordered`).
    """

    def __init__(self, opts: DownloadOptions | None = None) -> None:
        self.opts = opts or DownloadOptions()
        ua = self.opts.user_agent
        if "\r" in ua or "\n" in ua:
            raise ValueError("user_agent must not contain line breaks")
        self._tail = f"User-Agent: {ua}\r\nAccept: image/*,*/*;q=0.8\r\nAccept-Encoding: identity\r\n\r\n".encode(
            "latin-1"
        )
        self._host_sem: dict[str, threading.BoundedSemaphore] = {}
        self._lock = threading.Lock()
        self._idle: collections.deque[_Conn] = collections.deque()  # least recently used first
        self._ssl: Any = None
        self._proxies = _env_proxies()
        self._opener: Any = None

    def __enter__(self) -> Downloader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the idle keep-alive connections (the downloader stays usable)."""
        with self._lock:
            idle, self._idle = list(self._idle), collections.deque()
        for conn in idle:
            conn.close()

    def _host(self, host: str) -> threading.BoundedSemaphore:
        sem = self._host_sem.get(host)
        if sem is None:
            with self._lock:
                sem = self._host_sem.get(host)
                if sem is None:
                    sem = self._host_sem[host] = threading.BoundedSemaphore(max(1, self.opts.per_host))
        return sem

    # --- one attempt: request, redirects, response ---------------------------------------------------------------

    def _attempt(self, url: str, parts: urllib.parse.SplitResult) -> bytes:
        deadline = time.monotonic() + self.opts.timeout
        try:
            return self._follow(url, parts, deadline)
        except DownloadError:
            raise
        except TimeoutError as exc:
            raise DownloadError("timeout", str(exc) or "socket timeout") from exc
        except UnicodeError as exc:  # a host name IDNA cannot encode
            raise DownloadError("bad url", f"{exc}: {url[:200]}") from exc
        except OSError as exc:  # refused, reset, DNS, TLS (certificate) errors
            raise DownloadError("connection error", f"{type(exc).__name__}: {exc}") from exc

    def _follow(self, url: str, parts: urllib.parse.SplitResult, deadline: float) -> bytes:
        hops = 0
        while True:
            if self._proxies and self._proxied(parts):
                return self._attempt_urllib(url, deadline)
            status, reason, headers, body = self._get(parts, deadline)
            if body is not None:
                return body
            location = headers.get("location") or headers.get("uri")
            if status not in REDIRECT_STATUS or not location:
                raise DownloadError(f"http {status}", reason)
            if hops >= MAX_REDIRECTS:
                raise DownloadError(f"http {status}", f"more than {MAX_REDIRECTS} redirects")
            # header bytes came in as latin-1: percent-encode those very bytes (as urllib does)
            url = urllib.parse.urljoin(url, urllib.parse.quote(location.encode("latin-1"), safe=string.punctuation))
            parts = urllib.parse.urlsplit(url)
            if parts.scheme not in ("http", "https"):
                raise DownloadError("unsupported scheme", f"redirect to {parts.scheme or 'none'}: {url[:200]}")
            hops += 1

    def _get(self, parts: urllib.parse.SplitResult, deadline: float) -> tuple[int, str, dict[str, str], bytes | None]:
        """One GET: (status, reason, lower-cased headers, body); the body is read for 2xx answers only, else None."""
        scheme, host = parts.scheme, parts.hostname
        if scheme not in ("http", "https") or not host:
            raise DownloadError("bad url", parts.geturl()[:200])
        try:
            port = parts.port
        except ValueError as exc:
            raise DownloadError("bad url", f"{exc}: {parts.geturl()[:200]}") from exc
        default = 443 if scheme == "https" else 80
        port = port or default
        if not host.isascii():
            host = host.encode("idna").decode("ascii")
        if not _HOST_OK.fullmatch(host):
            raise DownloadError("bad url", f"host {host[:100]!r}")
        netloc = f"[{host}]" if ":" in host else host
        if port != default:
            netloc = f"{netloc}:{port}"
        target = parts.path or "/"
        if parts.query:
            target = f"{target}?{parts.query}"
        if _UNSAFE.search(target):  # spaces, control characters and non-ASCII never reach the wire raw
            target = urllib.parse.quote(target, safe=string.punctuation)
        request = f"GET {target} HTTP/1.1\r\nHost: {netloc}\r\n".encode("ascii") + self._tail

        key = (scheme, host, port)
        conn = self._checkout(key)
        done = False
        try:
            if conn is None:
                conn = self._connect(key)
                status, reason, headers, reusable = self._exchange(conn, request, deadline, fresh=True)
            else:
                try:
                    status, reason, headers, reusable = self._exchange(conn, request, deadline, fresh=False)
                except _Stale:  # the server closed it while idle: the request never ran, send it on a new one
                    conn.close()
                    conn = self._connect(key)
                    status, reason, headers, reusable = self._exchange(conn, request, deadline, fresh=True)
            if not 200 <= status < 300:
                return status, reason, headers, None  # the unread body makes the connection unusable: closed
            if status == 204:
                body, framed = b"", True
            else:
                body, framed = self._read_body(conn, headers, deadline)
            if reusable and framed and not conn.buf:
                self._checkin(conn)
                done = True
            return status, reason, headers, body
        finally:
            if conn is not None and not done:
                conn.close()

    def _connect(self, key: tuple[str, str, int]) -> _Conn:
        # the socket timeout bounds each connect/send/recv; the deadline is checked before each read (_recv)
        scheme, host, port = key
        sock = socket.create_connection((host, port), timeout=self.opts.timeout)
        if scheme == "https":
            try:
                sock = self._ssl_context().wrap_socket(sock, server_hostname=host)
            except BaseException:
                sock.close()
                raise
        return _Conn(sock, key)

    def _ssl_context(self) -> Any:
        if self._ssl is None:
            import ssl

            ctx = ssl.create_default_context()  # verifies the certificate chain and the host name
            ctx.set_alpn_protocols(["http/1.1"])
            self._ssl = ctx
        return self._ssl

    def _recv(self, conn: _Conn, deadline: float) -> bytes:
        if time.monotonic() > deadline:
            # a server trickling bytes never trips the per-read socket timeout
            raise DownloadError("timeout", f"transfer exceeded {self.opts.timeout}s")
        return conn.sock.recv(_RECV)

    def _exchange(
        self, conn: _Conn, request: bytes, deadline: float, fresh: bool
    ) -> tuple[int, str, dict[str, str], bool]:
        """Send ``request`` and read the final response head; raises :class:`_Stale` if nothing came back."""
        try:
            conn.sock.sendall(request)
        except OSError as exc:  # broken pipe, reset, a TLS error: on a kept-alive connection, the server closed it
            if fresh or isinstance(exc, TimeoutError):
                raise
            raise _Stale from None
        for _ in range(10):  # interim 1xx answers (100 Continue, 103 Early Hints) precede the real one
            status, reason, headers, http11 = _parse_head(self._read_head(conn, deadline, fresh))
            fresh = True  # bytes came back: the connection was alive
            if not 100 <= status < 200 or status == 101:
                reusable = http11 and "close" not in headers.get("connection", "").lower()
                return status, reason, headers, reusable
        raise DownloadError("connection error", "too many interim responses")

    def _read_head(self, conn: _Conn, deadline: float, fresh: bool) -> bytes:
        buf = bytes(conn.buf)
        scanned = 0
        while True:
            m = _HEAD_END.search(buf, max(0, scanned - 3))
            if m is not None:
                conn.buf = memoryview(buf)[m.end() :]
                return buf[: m.start()]
            if len(buf) > MAX_HEAD_BYTES:
                raise DownloadError("connection error", f"response head over {MAX_HEAD_BYTES} bytes")
            scanned = len(buf)
            try:
                data = self._recv(conn, deadline)
            except OSError as exc:
                if fresh or buf or isinstance(exc, TimeoutError):
                    raise
                raise _Stale from None
            if not data:
                if buf:
                    raise DownloadError("connection error", "connection closed in the response head")
                if fresh:
                    raise DownloadError("connection error", "connection closed without a response")
                raise _Stale
            buf = buf + data if buf else data

    def _read_body(self, conn: _Conn, headers: dict[str, str], deadline: float) -> tuple[bytes, bool]:
        """The body and whether its end was framed (Content-Length, chunked) rather than the connection closing."""
        cap = self.opts.max_bytes
        if headers.get("transfer-encoding", "").lower() == "chunked":
            return self._read_chunked(conn, deadline), True
        length = headers.get("content-length", "")
        if length.isdecimal():  # anything else is ignored and the body runs to the end, as in http.client
            if int(length) > cap:
                raise DownloadError("too large", f"Content-Length {length} > max_bytes {cap}")
            return self._read_exact(conn, int(length), deadline), True
        parts, total = [conn.buf], len(conn.buf)
        conn.buf = b""
        while total <= cap:
            data = self._recv(conn, deadline)
            if not data:
                return b"".join(parts), False
            parts.append(data)
            total += len(data)
        raise DownloadError("too large", f"more than max_bytes {cap}")

    def _read_exact(self, conn: _Conn, n: int, deadline: float) -> bytes:
        # the pieces as recv returns them, joined once: one copy of the body (a preallocated buffer takes two)
        have = conn.buf
        if len(have) >= n:
            conn.buf = have[n:]
            return bytes(have[:n])
        parts, got = [have], len(have)
        conn.buf = b""
        recv = conn.sock.recv
        while got < n:
            if time.monotonic() > deadline:
                raise DownloadError("timeout", f"transfer exceeded {self.opts.timeout}s")
            data = recv(min(n - got, _BODY_RECV))
            if not data:
                raise DownloadError("connection error", f"connection closed after {got} of {n} body bytes")
            parts.append(data)
            got += len(data)
        return b"".join(parts)

    def _read_line(self, conn: _Conn, deadline: float) -> bytes:
        buf = bytes(conn.buf)
        scanned = 0
        while True:
            end = buf.find(b"\n", scanned)
            if end >= 0:
                conn.buf = memoryview(buf)[end + 1 :]
                return buf[:end].rstrip(b"\r")
            if len(buf) > MAX_HEAD_BYTES:
                raise DownloadError("connection error", "chunk header line too long")
            scanned = len(buf)
            data = self._recv(conn, deadline)
            if not data:
                raise DownloadError("connection error", "connection closed in a chunked body")
            buf += data

    def _read_chunked(self, conn: _Conn, deadline: float) -> bytes:
        cap = self.opts.max_bytes
        parts: list[bytes] = []
        total = 0
        while True:
            size = self._read_line(conn, deadline).split(b";", 1)[0].strip()
            if not _HEX.fullmatch(size):
                raise DownloadError("connection error", f"bad chunk size {size[:20]!r}")
            n = int(size, 16)
            if n == 0:
                break
            total += n
            if total > cap:
                raise DownloadError("too large", f"more than max_bytes {cap}")
            parts.append(self._read_exact(conn, n, deadline))
            if self._read_line(conn, deadline):
                raise DownloadError("connection error", "chunk not followed by a line break")
        for _ in range(MAX_HEADERS):  # trailer fields, then the empty line
            if not self._read_line(conn, deadline):
                return b"".join(parts)
        raise DownloadError("connection error", f"more than {MAX_HEADERS} trailer lines")

    # --- keep-alive pool ---------------------------------------------------------------------------------------

    def _checkout(self, key: tuple[str, str, int]) -> _Conn | None:
        if not self._idle:
            return None
        with self._lock:
            idle = self._idle
            for i in range(len(idle) - 1, -1, -1):
                if idle[i].key == key:
                    conn = idle[i]
                    del idle[i]
                    break
            else:
                return None
        if time.monotonic() - conn.idle_since > KEEPALIVE_IDLE:
            conn.close()
            return None
        return conn

    def _checkin(self, conn: _Conn) -> None:
        conn.idle_since = time.monotonic()
        with self._lock:
            self._idle.append(conn)
            # one idle connection per thread is all the reuse there can be; the oldest goes first
            drop = self._idle.popleft() if len(self._idle) > max(1, self.opts.threads) else None
        if drop is not None:
            drop.close()

    # --- proxies: urllib, as before ----------------------------------------------------------------------------

    def _proxied(self, parts: urllib.parse.SplitResult) -> bool:
        import urllib.request

        return parts.scheme in self._proxies and not urllib.request.proxy_bypass(parts.hostname or "")

    def _attempt_urllib(self, url: str, deadline: float) -> bytes:
        import http.client
        import urllib.error
        import urllib.request

        opts = self.opts
        if self._opener is None:
            self._opener = urllib.request.build_opener(_safe_redirect_handler())
        req = urllib.request.Request(url, headers={"User-Agent": opts.user_agent, "Accept": "image/*,*/*;q=0.8"})
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

    # --- public ------------------------------------------------------------------------------------------------

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
        sem = self._host(parts.hostname)
        attempt = 0
        while True:
            try:
                with sem:
                    data = self._attempt(url, parts)
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
        then_slots: int | None = None,
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

        ``then_slots`` caps how many ``then`` calls run at once (None: no cap). Set it to the CPUs this process may
        use: beyond that, concurrent decodes only time-slice those CPUs, and every extra thread switch and GIL
        hand-over costs CPU (16 threads uncapped took ~25 % more CPU per image: bench/download.py --profile).
        """
        threads = max(1, self.opts.threads)
        window = window or max(2, threads * 2)
        # A slot is [item, url, result, done]: the thread that did the work releases ``done``, the consumer waits
        # on it. Plain C locks and a SimpleQueue instead of ThreadPoolExecutor's Futures, whose Python-level
        # Conditions cost more CPU per image than the hand-off needs.
        jobs: queue.SimpleQueue[list | None] = queue.SimpleQueue()
        limited = then
        if then is not None and then_slots is not None and then_slots < threads:
            # a queue of tokens is a semaphore whose get/put are C calls (threading.Semaphore runs in Python)
            tokens: queue.SimpleQueue[None] = queue.SimpleQueue()
            for _ in range(max(1, then_slots)):
                tokens.put(None)

            def limited(item: Any, data: bytes) -> Any:
                tokens.get()
                try:
                    return then(item, data)
                finally:
                    tokens.put(None)

        state = {"stop": False}
        workers: list[threading.Thread] = []

        def run() -> None:
            while True:
                slot = jobs.get()
                if slot is None:
                    return
                try:
                    if not state["stop"]:  # the consumer has gone: skip the work still queued
                        slot[2] = self._work(slot[0], slot[1], limited)
                except BaseException as exc:  # noqa: BLE001 - _work returns Exceptions; this is SystemExit & co
                    slot[2] = _Raised(exc)
                finally:
                    slot[3].release()

        pending: collections.deque[list] = collections.deque()
        it = iter(items)
        exhausted = False
        try:
            while True:
                while not exhausted and len(pending) < window:
                    try:
                        item = next(it)
                    except StopIteration:
                        exhausted = True
                        break
                    url = url_of(item)
                    if not url:
                        pending.append([item, None, None, None])
                        continue
                    done = threading.Lock()
                    done.acquire()
                    slot = [item, url, None, done]
                    pending.append(slot)
                    jobs.put(slot)
                    if len(workers) < threads:
                        t = threading.Thread(target=run, name=f"dl_{len(workers)}", daemon=True)
                        t.start()
                        workers.append(t)
                if not pending:
                    return
                item, _, result, done = slot = pending.popleft()
                if done is not None:
                    done.acquire()
                    result = slot[2]
                    if isinstance(result, _Raised):
                        raise result.exc
                yield item, result
        finally:
            state["stop"] = True
            for _ in workers:
                jobs.put(None)
            for t in workers:
                t.join()
            self.close()

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


def _parse_head(head: bytes) -> tuple[int, str, dict[str, str], bool]:
    """(status, reason, the headers the client acts on by lower-cased name, HTTP/1.1?); first value wins."""
    m = _STATUS_LINE.match(head)
    if m is None:
        raise DownloadError("connection error", f"bad status line {head.splitlines()[0][:100] if head else b''!r}")
    if head.count(b"\n") > MAX_HEADERS:
        raise DownloadError("connection error", f"more than {MAX_HEADERS} response headers")
    headers: dict[str, str] = {}
    # one regex pass picks the few fields that matter instead of building every header
    for name, value in _FIELDS.findall(head, m.end()):
        headers.setdefault(name.lower().decode("ascii"), value.decode("latin-1"))
    return int(m[2]), (m[3] or b"").strip().decode("latin-1"), headers, m[1] == b"1"


def _safe_redirect_handler() -> Any:
    """urllib redirect handler that follows redirects only to http(s) (urllib would also follow one to ftp)."""
    import urllib.request

    class _SafeRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, req, fp, code, msg, headers, newurl):  # type: ignore[no-untyped-def]
            scheme = urllib.parse.urlsplit(newurl).scheme.lower()
            if scheme not in ("http", "https"):
                raise DownloadError("unsupported scheme", f"redirect to {scheme or 'relative'}: {newurl[:200]}")
            return super().redirect_request(req, fp, code, msg, headers, newurl)

    return _SafeRedirect()
