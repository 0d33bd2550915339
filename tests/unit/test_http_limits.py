"""Issue 15, item 4: the HTTP side cannot be held open. An idle connection is closed after
http.request_timeout, connections past http.max_connections get a quick 503 instead of a
thread and a descriptor each, and the unit raises the descriptor limit."""

from __future__ import annotations

import re
import socket
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from denoised_node.config.settings import load_settings
from denoised_node.daemon.web.endpoint import StatusServer
from denoised_node.daemon.web.probes import Readiness
from denoised_node.daemon.web.request import Request, Response
from tests.fixtures.sockets import closed_quickly

WAIT = 15.0


@pytest.fixture
def http_factory() -> Iterator:  # type: ignore[type-arg]
    servers: list[StatusServer] = []

    def start(pages: object = None, **keys: str) -> int:
        environ = {f"DENOISED_NODE_HTTP__{k.upper()}": v for k, v in keys.items()}
        settings = load_settings(None, environ={"DENOISED_NODE_HTTP__PORT": "0", **environ})
        server = StatusServer(settings.http, CollectorRegistry(), Readiness([]),
                              pages).start()  # type: ignore[arg-type]
        servers.append(server)
        return server.port

    yield start
    for server in servers:
        server.shutdown()


def _idle(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=WAIT)


def _closed_by_the_server(sock: socket.socket) -> bool:
    try:
        while sock.recv(4096):
            pass
        return True
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def _healthz(port: int) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=WAIT) as answer:
            return int(answer.status)
    except urllib.error.HTTPError as error:
        return int(error.code)


def test_an_idle_connection_is_closed_after_the_request_timeout(http_factory) -> None:  # type: ignore[no-untyped-def]
    port = http_factory(request_timeout="0.5")
    with _idle(port) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\n")  # and never the rest of the headers
        assert _closed_by_the_server(sock)
    assert _healthz(port) == 200


def test_past_the_cap_idle_connections_give_way_and_busy_ones_get_a_quick_503(  # type: ignore[no-untyped-def]
        http_factory) -> None:
    release = threading.Event()
    port = http_factory(_SlowPages(release), max_connections="3", request_timeout="30")
    idle = [_idle(port) for _ in range(3)]
    try:
        time.sleep(0.2)  # accepted, each waiting for its request
        assert _healthz(port) == 200  # at once: the longest idle connection made room
        assert sum(closed_quickly(sock) for sock in idle) == 1
    finally:
        for sock in idle:
            sock.close()
    # Connections busy with a request (a page being made) are not closed: a new connection
    # is answered 503 at once instead of waiting for a slot.
    busy = [_idle(port) for _ in range(3)]
    try:
        for sock in busy:
            sock.sendall(b"GET /jobs HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        time.sleep(0.2)
        assert _healthz(port) == 503
    finally:
        release.set()
        for sock in busy:
            sock.close()
    deadline = time.monotonic() + WAIT
    while _healthz(port) != 200 and time.monotonic() < deadline:
        time.sleep(0.05)  # the closed ones' threads notice and give their slots back
    assert _healthz(port) == 200


def test_a_flood_of_idle_connections_never_locks_the_probe_out(http_factory) -> None:  # type: ignore[no-untyped-def]
    port = http_factory(max_connections="4", request_timeout="30")
    flood = [_idle(port) for _ in range(20)]
    try:
        time.sleep(0.2)
        assert _healthz(port) == 200
        assert sum(not closed_quickly(sock) for sock in flood) <= 4  # the rest were closed
    finally:
        for sock in flood:
            sock.close()


class _SlowPages:
    """Status pages that take until ``release`` is set."""

    def __init__(self, release: threading.Event) -> None:
        self.release = release

    def handle(self, request: Request) -> Response:
        self.release.wait(WAIT)
        return Response(200, b"page\n", "text/plain")


def test_the_unit_raises_the_descriptor_limit() -> None:
    unit = (Path(__file__).resolve().parents[2] / "systemd" / "denoised-node.service").read_text()
    found = re.search(r"^LimitNOFILE=(\d+)$", unit, re.MULTILINE)
    assert found and int(found.group(1)) >= 8192
