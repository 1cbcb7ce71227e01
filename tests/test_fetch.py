"""Remote images (``--allow-remote-images``): public addresses only, one deadline, a size cap, one error text.

Nothing here reaches the internet: address checks run on monkeypatched resolution, and fetches go to local
listeners, which must see no connection when the address is refused.
"""

import functools
import http.server
import ipaddress
import socket
import threading
import time
from typing import Any, ClassVar

import httpx
import pytest
from test_serve import Server, _image_msg

import nvlm.serve.app as app_module
from nvlm.serve import fetch as fetch_module
from nvlm.serve.fetch import FETCH_FAILED, FetchError, fetch, is_public

NOT_PUBLIC = [
    "127.0.0.1",
    "127.8.9.10",
    "10.1.2.3",
    "172.16.0.1",
    "192.168.1.1",
    "169.254.169.254",
    "100.64.0.1",
    "0.0.0.0",
    "224.0.0.1",
    "239.1.1.1",
    "240.0.0.1",
    "255.255.255.255",
    "198.18.0.1",
    "::1",
    "::",
    "fe80::1",
    "fc00::1",
    "ff02::1",
    "::ffff:127.0.0.1",
    "::ffff:10.0.0.1",
    "2002:7f00:1::1",
    "2001:0:4136:e378:8000:63bf:80ff:fffe",
    "2001:db8::1",
]
PUBLIC = ["8.8.8.8", "93.184.216.34", "2606:4700:4700::1111", "2002:808:808::1"]


@pytest.mark.parametrize("address", NOT_PUBLIC)
def test_non_public_addresses_are_refused(address):
    assert not is_public(ipaddress.ip_address(address))


@pytest.mark.parametrize("address", PUBLIC)
def test_public_addresses_pass(address):
    assert is_public(ipaddress.ip_address(address))


class Listener:
    """A TCP listener on 127.0.0.1 that counts the connections it gets."""

    def __init__(self, host="127.0.0.1"):
        self.sock = socket.create_server((host, 0))
        self.sock.settimeout(0.05)
        self.port, self.connections, self.stop = self.sock.getsockname()[1], 0, False
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self):
        while not self.stop:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            self.connections += 1
            conn.close()

    def close(self):
        self.stop = True
        self.sock.close()


@pytest.fixture
def listener():
    lst = Listener()
    yield lst
    lst.close()


def _no_connect(*a, **k):
    raise AssertionError("a refused address must not be connected to")


@pytest.mark.parametrize(
    "host", ["127.0.0.1", "localhost", "2130706433", "0x7f000001", "0177.0.0.1", "[::ffff:127.0.0.1]"]
)
def test_loopback_in_any_spelling_is_refused_without_a_connection(host, listener):
    with pytest.raises(FetchError) as e:
        fetch(f"http://{host}:{listener.port}/cat.png", 10**6, 2.0)
    assert str(e.value) == FETCH_FAILED
    time.sleep(0.1)
    assert listener.connections == 0


def test_one_private_address_among_public_ones_is_refused(monkeypatch):
    monkeypatch.setattr(fetch_module.socket, "create_connection", _no_connect)
    with pytest.raises(FetchError):
        fetch("http://images.example/cat.png", 10**6, 2.0, resolver=lambda h, p: ["93.184.216.34", "10.0.0.7"])
    with pytest.raises(FetchError):  # rebinding to a private name
        fetch("https://cdn.example/x.png", 10**6, 2.0, resolver=lambda h, p: ["fd00::1"])


class _Handler(http.server.BaseHTTPRequestHandler):
    routes: ClassVar[dict[str, Any]] = {}

    def do_GET(self):
        status, headers, body = self.routes[self.path]
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()
        for piece in body() if callable(body) else [body]:
            self.wfile.write(piece)
            self.wfile.flush()

    def log_message(self, *a):
        pass


class _Quiet(http.server.ThreadingHTTPServer):
    def handle_error(self, request, client_address):  # a client that hung up on purpose
        pass


@pytest.fixture
def web():
    srv = _Quiet(("127.0.0.1", 0), _Handler)
    srv.daemon_threads = True
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield srv, f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()
    srv.server_close()


LOOPBACK_1 = lambda ip: str(ip) == "127.0.0.1"  # noqa: E731 (tests: one local "public" address)


def test_redirect_hops_are_checked_like_the_first_url(web):
    _srv, base = web
    other = Listener("127.0.0.2")
    try:
        _Handler.routes = {
            "/ok": (200, {}, b"PNGDATA"),
            "/hop": (302, {"Location": "/ok"}, b""),
            "/away": (302, {"Location": f"http://127.0.0.2:{other.port}/x"}, b""),
        }
        assert fetch(base + "/hop", 100, 2.0, allowed=LOOPBACK_1) == b"PNGDATA"
        with pytest.raises(FetchError):
            fetch(base + "/away", 100, 2.0, allowed=LOOPBACK_1)
        time.sleep(0.1)
        assert other.connections == 0
    finally:
        other.close()


def test_the_size_cap_holds_while_streaming_and_the_deadline_is_overall(web):
    _srv, base = web

    def endless():
        while True:
            yield b"x" * 4096

    def trickle():  # one byte every 0.2 s: each read is quick, the whole is not
        for _ in range(100):
            time.sleep(0.2)
            yield b"x"

    _Handler.routes = {
        "/big": (200, {"Content-Length": "999999"}, b"x"),
        "/endless": (200, {}, endless),
        "/slow": (200, {}, trickle),
        "/gone": (404, {}, b"no"),
    }
    for path in ("/big", "/endless", "/gone"):
        with pytest.raises(FetchError) as e:
            fetch(base + path, 50_000, 5.0, allowed=LOOPBACK_1)
        assert str(e.value) == FETCH_FAILED
    start = time.perf_counter()
    with pytest.raises(FetchError):
        fetch(base + "/slow", 50_000, 1.0, allowed=LOOPBACK_1)
    assert time.perf_counter() - start < 1.6


def test_the_server_refuses_loopback_with_one_error_text_and_no_connection(tiny_model_dir, listener):
    s = Server(tiny_model_dir, allow_remote_images=True)
    try:
        closed = socket.create_server(("127.0.0.1", 0))
        closed_port = closed.getsockname()[1]
        closed.close()
        errors = []
        for port in (listener.port, closed_port):
            r = httpx.post(
                s.url + "/v1/chat/completions",
                timeout=30,
                json={"model": "tiny", "messages": _image_msg(f"http://127.0.0.1:{port}/a.png")},
            )
            assert r.status_code == 400
            errors.append(r.json()["error"])
        assert errors[0] == errors[1] and errors[0]["message"] == FETCH_FAILED  # no open/closed port oracle
        time.sleep(0.1)
        assert listener.connections == 0
    finally:
        s.stop()


def test_slow_image_hosts_do_not_hold_text_requests(tiny_model_dir, web, monkeypatch):
    _srv, base = web

    def trickle():
        for _ in range(50):
            time.sleep(0.2)
            yield b"x"

    _Handler.routes = {f"/slow{i}": (200, {}, trickle) for i in range(8)}
    monkeypatch.setattr(app_module, "fetch", functools.partial(fetch, allowed=LOOPBACK_1))
    s = Server(tiny_model_dir, allow_remote_images=True, fetch_timeout_s=2.0, max_images=8)
    try:

        def slow(i):
            parts = [{"type": "image_url", "image_url": {"url": f"{base}/slow{k}"}} for k in range(8)]
            return httpx.post(
                s.url + "/v1/chat/completions",
                timeout=30,
                json={"model": "tiny", "messages": [{"role": "user", "content": parts}]},
            )

        threads = [threading.Thread(target=slow, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        time.sleep(0.3)  # the fetches have started
        start = time.perf_counter()
        r = s.ask([{"role": "user", "content": "hi"}], max_tokens=2)
        assert r.choices and time.perf_counter() - start < 1.5
        start = time.perf_counter()
        assert slow(0).json()["error"]["message"] == FETCH_FAILED and time.perf_counter() - start < 3.0
        for t in threads:
            t.join()
    finally:
        s.stop()
