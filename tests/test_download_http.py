"""The downloader's own HTTP/1.1 client against local servers: redirects, size caps, framing, keep-alive, proxies, TLS.

The HTTP/1.0 cases (timeouts, retries, politeness, the cache, whole builds) are in tests/test_download.py.
"""

from __future__ import annotations

import os
import shutil
import socket
import ssl
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from helpers import download_reason

import data_prep.download as download
from data_prep.download import MAX_REDIRECTS, Downloader, DownloadOptions


def _body(path: str, size: int = 3000) -> bytes:
    """Distinct bytes per path, so that a response handed to the wrong request shows."""
    seed = path.encode()
    return (seed + b"|") * (size // (len(seed) + 1)) + seed[: size % (len(seed) + 1)]


class _State:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.hits: dict[str, int] = {}
        self.ports: list[int] = []  # the client's port per request: one per connection


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    state: _State

    def log_message(self, *args):
        pass

    def handle(self) -> None:
        try:
            super().handle()
        except (ConnectionResetError, BrokenPipeError):
            pass  # the client closed a connection it would not reuse (unread body, error): expected here

    def _send(self, body: bytes, code: int = 200, headers: dict[str, str] | None = None) -> None:
        self.send_response(code)
        for k, v in {"Content-Length": str(len(body)), **(headers or {})}.items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def _redirect(self, location: str | None, code: int = 302) -> None:
        self.send_response(code)
        if location is not None:
            self.send_header("Location", location)
        self.send_header("Content-Length", "9")
        self.end_headers()
        self.wfile.write(b"moved on\n")

    def do_GET(self):  # noqa: C901, N802 - one route table
        st, path = self.state, self.path
        with st.lock:
            st.hits[path] = st.hits.get(path, 0) + 1
            st.ports.append(self.client_address[1])
        if path.startswith("/img/") or path.startswith("http://proxied.invalid/"):
            self._send(_body(path))
        elif path.startswith("/size/"):  # /size/<n>: n bytes with Content-Length
            self._send(b"x" * int(path[6:]))
        elif path.startswith("/size-eof/"):  # n bytes, framed by closing the connection
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"x" * int(path[10:]))
            self.close_connection = True
        elif path.startswith("/chain/"):  # /chain/<k>: k more redirects, then an image
            k = int(path[7:])
            self._redirect(f"/chain/{k - 1}" if k else "/img/end-of-chain")
        elif path == "/loop":
            self._redirect("/loop")
        elif path == "/relative":
            self._redirect("../img/relative-target", code=301)
        elif path == "/redirect-file":
            self._redirect("file:///etc/passwd")
        elif path == "/redirect-data":
            self._redirect("data:image/png;base64,AAAA", code=307)
        elif path == "/redirect-no-location":
            self._redirect(None)
        elif path == "/missing":
            self._send(b"no such image, sorry\n" * 50, code=404)  # a body the client must not mistake for a head
        elif path == "/chunked":
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            body = _body(path, 5000)
            for i in range(0, len(body), 1500):
                part = body[i : i + 1500]
                self.wfile.write(b"%x;ext=1\r\n%s\r\n" % (len(part), part))
            self.wfile.write(b"0\r\nX-Trailer: yes\r\n\r\n")
        elif path == "/close-after":  # answers as if keeping the connection, then closes it
            self._send(_body(path))
            self.close_connection = True
        elif path == "/connection-close":
            self._send(_body(path), headers={"Connection": "close"})
            self.close_connection = True
        elif path == "/truncated":
            self.send_response(200)
            self.send_header("Content-Length", "5000")
            self.end_headers()
            self.wfile.write(b"y" * 100)
            self.close_connection = True
        elif path == "/trickle":  # every read gets a byte well within the socket timeout; the whole never ends
            self.send_response(200)
            self.send_header("Content-Length", "1000")
            self.end_headers()
            try:
                for _ in range(60):
                    self.wfile.write(b"z")
                    time.sleep(0.05)
            except OSError:
                pass
            self.close_connection = True
        elif path == "/continue":
            self.wfile.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            self._send(_body(path))
        elif path.startswith("/img%20"):
            self._send(_body(path))
        else:
            self._send(b"unknown route\n", code=404)


def _serve(tls: ssl.SSLContext | None = None):
    state = _State()
    handler = type("H", (_Handler,), {"state": state})
    server_cls = type("S", (ThreadingHTTPServer,), {"daemon_threads": True, "request_queue_size": 64})
    httpd = server_cls(("127.0.0.1", 0), handler)
    if tls is not None:
        httpd.socket = tls.wrap_socket(httpd.socket, server_side=True)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    return httpd, state


@pytest.fixture(scope="module")
def server():
    httpd, state = _serve()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", state
    httpd.shutdown()
    httpd.server_close()


def _opts(**kw) -> DownloadOptions:
    base = dict(timeout=2.0, retries=0, backoff=0.01, threads=1, per_host=4, max_bytes=100_000)
    base.update(kw)
    return DownloadOptions(**base)


def _new_ports(state: _State, before: int) -> list[int]:
    with state.lock:
        return state.ports[before:]


def test_redirects_followed_within_the_limit(server):
    base, state = server
    with Downloader(_opts()) as dl:
        assert dl.fetch(f"{base}/chain/{MAX_REDIRECTS - 1}") == _body("/img/end-of-chain")  # 10 redirects
        assert dl.fetch(f"{base}/relative") == _body("/img/relative-target")  # resolved against the request URL
        state.hits.pop("/loop", None)
        assert download_reason(dl, f"{base}/loop") == "http 302"
        assert state.hits["/loop"] == MAX_REDIRECTS + 1  # gave up after the limit, did not spin
        assert download_reason(dl, f"{base}/chain/{MAX_REDIRECTS}") == "http 302"
        assert download_reason(dl, f"{base}/redirect-no-location") == "http 302"


def test_redirects_to_other_schemes_refused(server):
    base, _ = server
    with Downloader(_opts()) as dl:
        assert download_reason(dl, f"{base}/redirect-file") == "unsupported scheme"
        assert download_reason(dl, f"{base}/redirect-data") == "unsupported scheme"


def test_size_cap_with_and_without_content_length(server):
    base, state = server
    with Downloader(_opts(max_bytes=100_000)) as dl:
        assert len(dl.fetch(f"{base}/size/100000")) == 100_000  # the cap itself is allowed
        assert download_reason(dl, f"{base}/size/100001") == "too large"  # refused from Content-Length
        assert len(dl.fetch(f"{base}/size-eof/100000")) == 100_000
        assert download_reason(dl, f"{base}/size-eof/100001") == "too large"  # counted while reading
        assert download_reason(dl, f"{base}/size/20000000") == "too large"
    with Downloader(_opts(max_bytes=4000)) as dl:
        assert download_reason(dl, f"{base}/chunked") == "too large"  # chunked bodies are counted too


def test_truncated_body_and_trickle_fail(server):
    base, _ = server
    with Downloader(_opts(timeout=0.5)) as dl:
        assert download_reason(dl, f"{base}/truncated") == "connection error"  # never a short image
        # each byte comes within the socket timeout: only the deadline of the whole attempt stops it
        assert download_reason(dl, f"{base}/trickle") == "timeout"


def test_keep_alive_reuses_one_connection_with_correct_bodies(server):
    base, state = server
    before = len(state.ports)
    with Downloader(_opts()) as dl:
        for i in range(6):
            assert dl.fetch(f"{base}/img/ka-{i}.jpg") == _body(f"/img/ka-{i}.jpg")
        assert dl.fetch(f"{base}/chunked") == _body("/chunked", 5000)  # chunks, extensions and trailer
        assert dl.fetch(f"{base}/img/after-chunked") == _body("/img/after-chunked")
        assert dl.fetch(f"{base}/continue") == _body("/continue")  # an interim 100 answer first
        assert dl.fetch(f"{base}/img/after-continue") == _body("/img/after-continue")
        assert len(dl._idle) == 1
    assert len(set(_new_ports(state, before))) == 1
    assert not dl._idle  # closed on leaving the block


def test_keep_alive_never_reuses_a_connection_with_unread_bytes(server):
    base, state = server
    before = len(state.ports)
    with Downloader(_opts()) as dl:
        assert dl.fetch(f"{base}/img/a") == _body("/img/a")
        assert download_reason(dl, f"{base}/missing") == "http 404"  # its body is never read: the connection goes
        assert dl.fetch(f"{base}/img/b") == _body("/img/b")
        assert dl.fetch(f"{base}/connection-close") == _body("/connection-close")
        assert dl.fetch(f"{base}/img/c") == _body("/img/c")
    ports = _new_ports(state, before)
    assert ports[0] == ports[1] and len({ports[1], ports[2], ports[3], ports[4]}) == 3, ports


def test_keep_alive_resends_once_when_the_server_closed_it(server):
    base, state = server
    before = len(state.ports)
    with Downloader(_opts(retries=0)) as dl:
        assert dl.fetch(f"{base}/close-after") == _body("/close-after")
        time.sleep(0.05)  # the server's close has arrived by now (it would also work before)
        assert dl.fetch(f"{base}/img/after-close") == _body("/img/after-close")  # no retry was allowed
    assert len(set(_new_ports(state, before))) == 2


def test_keep_alive_under_threads(server):
    base, state = server
    before = len(state.ports)
    urls = [f"{base}/img/t{i}" for i in range(60)]
    dl = Downloader(_opts(threads=4, per_host=4))
    got = list(dl.map_ordered(urls, lambda u: u))
    assert [u for u, _ in got] == urls
    assert [r for _, r in got] == [_body(u[len(base) :]) for u in urls]
    # connections are reused (without keep-alive: one per URL); a thread finding none idle for a moment opens one
    assert len(set(_new_ports(state, before))) < len(urls) // 2
    assert not dl._idle  # map_ordered closed them at the end


def test_map_ordered_stops_its_threads_when_abandoned(server):
    base, _ = server
    dl = Downloader(_opts(threads=4))
    gen = dl.map_ordered([f"{base}/img/stop{i}" for i in range(50)], lambda u: u)
    next(gen)
    gen.close()
    assert not [t for t in threading.enumerate() if t.name.startswith("dl_")]


def test_request_target_is_percent_encoded(server):
    base, state = server
    with Downloader(_opts()) as dl:
        assert dl.fetch(f"{base}/img a.jpg") == _body("/img%20a.jpg")
    assert state.hits["/img%20a.jpg"] == 1


def test_bad_urls():
    dl = Downloader(_opts())
    assert download_reason(dl, "http://127.0.0.1:99999/x.jpg") == "bad url"
    assert download_reason(dl, "http:///x.jpg") == "bad url"
    assert download_reason(dl, "gopher://127.0.0.1/x.jpg") == "unsupported scheme"


def test_proxy_from_the_environment_is_used(server, monkeypatch):
    base, state = server
    for key in list(os.environ):
        if key.lower().endswith("_proxy"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("http_proxy", base)
    url = "http://proxied.invalid/img/p.jpg"
    with Downloader(_opts()) as dl:
        assert dl.fetch(url) == _body(url)  # the proxy got the absolute URL
    assert state.hits[url] == 1
    monkeypatch.setenv("no_proxy", "proxied.invalid")
    with Downloader(_opts()) as dl:
        assert download_reason(dl, url) == "connection error"  # bypassed: straight to a host that does not resolve


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory):
    if not shutil.which("openssl"):
        pytest.skip("openssl not installed")
    d = tmp_path_factory.mktemp("tls")
    cert, key = d / "cert.pem", d / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
         "-days", "2", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True,
    )  # fmt: skip
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    httpd, state = _serve(tls=ctx)
    yield f"https://127.0.0.1:{httpd.server_address[1]}", state, str(cert)
    httpd.shutdown()
    httpd.server_close()


def test_https_verifies_certificates(tls_server, monkeypatch):
    base, state, cert = tls_server
    with Downloader(_opts()) as dl:
        assert download_reason(dl, f"{base}/img/tls.jpg") == "connection error"  # self-signed: refused
    assert "/img/tls.jpg" not in state.hits
    trusting = ssl.create_default_context(cafile=cert)
    monkeypatch.setattr(download.Downloader, "_ssl_context", lambda self: trusting)
    before = len(state.ports)
    with Downloader(_opts()) as dl:
        assert dl.fetch(f"{base}/img/tls.jpg") == _body("/img/tls.jpg")
        assert dl.fetch(f"{base}/chunked") == _body("/chunked", 5000)
    assert len(set(_new_ports(state, before))) == 1  # kept alive over TLS too


def test_stale_detection_does_not_resend_on_a_fresh_connection():
    """A server that accepts and closes at once is a connection error on a new connection (no endless resend)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    accepted = []

    def accept_and_close() -> None:
        for _ in range(3):
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            accepted.append(1)
            conn.close()

    thread = threading.Thread(target=accept_and_close, daemon=True)
    thread.start()
    try:
        dl = Downloader(_opts(timeout=1.0))
        assert download_reason(dl, f"http://127.0.0.1:{listener.getsockname()[1]}/x.jpg") == "connection error"
        assert len(accepted) == 1
    finally:
        listener.close()


@pytest.mark.parametrize("slots", [1, 3, None])
def test_then_slots_caps_concurrent_processing(slots):
    dl = Downloader(_opts(threads=8))
    dl._fetch_safe = lambda url: url.encode()  # no network: only the thread hand-off and the cap are under test
    lock = threading.Lock()
    running = {"now": 0, "max": 0}

    def then(item: int, data: bytes) -> int:
        with lock:
            running["now"] += 1
            running["max"] = max(running["max"], running["now"])
        time.sleep(0.01)
        with lock:
            running["now"] -= 1
        return item * 2

    got = list(dl.map_ordered(range(40), lambda i: f"http://h/{i}", then=then, then_slots=slots))
    assert got == [(i, i * 2) for i in range(40)]
    if slots:
        assert running["max"] == slots
    else:
        assert running["max"] > 3  # uncapped: the threads overlap
