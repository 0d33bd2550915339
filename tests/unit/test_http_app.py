"""The HTTP endpoint as a WSGI application, through a test client (no socket): the guard, the
CSRF check on forms, the limits on what a request carries; and the served endpoint when a
client goes away mid-answer."""

from __future__ import annotations

import base64
import logging
import socket
import struct
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from denoised_node.config.settings import HttpSettings, Settings
from denoised_node.daemon.web.app import HttpApp, Pages
from denoised_node.daemon.web.auth import Guard
from denoised_node.daemon.web.csrf import TOKEN_FIELD
from denoised_node.daemon.web.endpoint import StatusServer
from denoised_node.daemon.web.pages import StatusPages
from denoised_node.daemon.web.probes import CheckResult, Readiness
from denoised_node.daemon.web.request import MAX_FORM_BYTES, Request, Response
from denoised_node.storage.runtime import Runtime
from tests.fixtures.wsgi import call

FORM = {"Content-Type": "application/x-www-form-urlencoded"}


class _Echo:
    """Pages that say what they were asked."""

    def handle(self, request: Request) -> Response:
        return Response.text(200, f"{request.method} {request.path} {dict(request.query)} "
                                  f"{dict(request.form)} by {request.user}")


def _app(pages: Pages | None = None, **http: object) -> HttpApp:
    settings = HttpSettings(**http)  # type: ignore[arg-type]
    ready = Readiness([("x", lambda: CheckResult(True, "ok"))])
    return HttpApp(CollectorRegistry(), ready, Guard(settings), pages)


def _basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


@pytest.fixture
def guarded(tmp_path: Path) -> HttpApp:
    password = tmp_path / "pw"
    password.write_text("correct horse\n")
    return _app(_Echo(), username="admin", password_file=password)


def test_without_credentials_only_the_probes_answer(guarded: HttpApp) -> None:
    for path in ("/", "/jobs", "/metrics"):
        answer = call(guarded, "GET", path)
        assert answer.status == 401 and answer.headers["WWW-Authenticate"].startswith("Basic")
    assert call(guarded, "GET", "/", headers=_basic("admin", "wrong")).status == 401
    assert call(guarded, "POST", "/jobs/1/replay", b"a=1", FORM).status == 401
    assert call(guarded, "GET", "/healthz").text == "ok\n"
    assert call(guarded, "GET", "/readyz").status == 200
    answer = call(guarded, "GET", "/jobs?page=2", headers=_basic("admin", "correct horse"))
    assert answer.text == "GET /jobs {'page': ['2']} {} by admin\n"
    assert "frame-ancestors 'none'" in answer.headers["Content-Security-Policy"]


def test_a_form_reaches_the_pages_and_a_long_one_is_refused(guarded: HttpApp) -> None:
    auth = {**_basic("admin", "correct horse"), **FORM}
    assert call(guarded, "POST", "/jobs/1/replay", b"a=1", auth).text == (
        "POST /jobs/1/replay {} {'a': ['1']} by admin\n")
    answer = call(guarded, "POST", "/jobs/1/replay", b"a=" + b"x" * MAX_FORM_BYTES, auth)
    assert answer.status == 413 and "64 KiB" in answer.text


def test_methods_the_endpoint_does_not_take(guarded: HttpApp) -> None:
    auth = _basic("admin", "correct horse")
    for path in ("/metrics", "/healthz", "/readyz"):
        assert call(guarded, "POST", path, b"a=1", {**auth, **FORM}).status == 405
    answer = call(guarded, "PUT", "/jobs", b"a=1", auth)
    assert answer.status == 405 and answer.headers["Allow"] == "GET, HEAD, POST"
    head = call(guarded, "HEAD", "/healthz")
    assert (head.status, head.body, head.headers["Content-Length"]) == (200, b"", "3")
    assert call(_app(), "POST", "/jobs", b"a=1", FORM).status == 405  # no pages
    assert call(_app(), "GET", "/jobs").status == 404


def test_a_form_without_the_pages_token_is_refused(settings: Settings,
                                                   runtime: Runtime) -> None:
    pages = StatusPages(settings, runtime.sessions, runtime.store, Readiness([]))
    app = _app(pages)
    for form in (b"", f"{TOKEN_FIELD}=forged".encode()):
        answer = call(app, "POST", "/jobs/1/replay", form, FORM)
        assert answer.status == 403 and "reload the page" in answer.text
    elsewhere = call(app, "POST", "/jobs/1/approve", b"",
                     {**FORM, "Origin": "https://evil.example"})
    assert elsewhere.status == 403 and "another site" in elsewhere.text


def test_a_rebinding_host_is_refused(guarded: HttpApp) -> None:
    app = _app(_Echo())
    assert call(app, "GET", "/").status == 200
    assert call(app, "GET", "/", headers={"Host": "evil.example"}).status == 403
    assert call(app, "GET", "/healthz", headers={"Host": "evil.example"}).status == 200


class _BigPage:
    """A page too big to leave in the socket's buffers, answered once ``go`` is set."""

    def __init__(self) -> None:
        self.asked = threading.Event()
        self.go = threading.Event()

    def handle(self, request: Request) -> Response:
        self.asked.set()
        self.go.wait(10)
        return Response(200, b"x" * 8_000_000, "text/plain")


def _reset(client: socket.socket) -> None:
    client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    client.close()  # a reset, as a browser tab closed mid-page


@pytest.mark.parametrize("leave", ["reset before the answer", "reset mid-answer",
                                   "close before the answer"])
def test_a_client_that_leaves_mid_answer_leaves_no_traceback(
        leave: str, caplog: pytest.LogCaptureFixture) -> None:
    pages = _BigPage()
    server = StatusServer(HttpSettings(port=0), CollectorRegistry(), Readiness([]),
                          pages).start()
    try:
        with caplog.at_level(logging.DEBUG):
            client = socket.create_connection(("127.0.0.1", server.port))
            client.sendall(b"GET /jobs HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            assert pages.asked.wait(10)
            if leave == "reset mid-answer":
                pages.go.set()
                assert client.recv(65536).startswith(b"HTTP/1.1 200")
                _reset(client)
            else:
                _reset(client) if leave.startswith("reset") else client.close()
                pages.go.set()
            time.sleep(1.0)  # the rest of the answer meets the closed connection
            with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/healthz",
                                        timeout=10) as answer:
                assert answer.status == 200
    finally:
        server.shutdown()
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.WARNING]
