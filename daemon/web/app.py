"""The node's HTTP endpoint as a WSGI application: the probes (open), /metrics and the status
pages (behind the guard), and the limits on what a request may carry.

A plain callable with its dependencies bound, so that tests call it with a built environ and
no socket; daemon/web/endpoint.py serves it.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from http import HTTPStatus
from typing import BinaryIO, Protocol
from wsgiref.types import StartResponse, WSGIEnvironment

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from denoised_node.daemon.web.auth import Guard
from denoised_node.daemon.web.probes import Readiness
from denoised_node.daemon.web.request import MAX_FORM_BYTES, Request, Response


class Pages(Protocol):
    """The status pages (daemon.web.pages.StatusPages)."""

    def handle(self, request: Request) -> Response: ...


class Stow(Protocol):
    """The STOW-RS receiver (daemon.web.stow.StowReceiver)."""

    def handle(self, method: str, path: str, headers: dict[str, str], body: BinaryIO,
               user: str | None) -> Response: ...


_PROBES = ("/healthz", "/readyz")
_DICOMWEB = "/dicom-web/"  # STOW-RS, where http.stow_rs is on
_METHODS = ("GET", "POST")  # and HEAD, as GET
# The headers that WSGI keeps without the HTTP_ prefix.
_UNPREFIXED = {"CONTENT_TYPE": "content-type", "CONTENT_LENGTH": "content-length"}


class HttpApp:
    def __init__(self, registry: CollectorRegistry, readiness: Readiness, guard: Guard,
                 pages: Pages | None = None, stow: Stow | None = None) -> None:
        self.registry = registry
        self.readiness = readiness
        self.guard = guard
        self.pages = pages
        self.stow = stow

    def __call__(self, environ: WSGIEnvironment,
                 start_response: StartResponse) -> Iterable[bytes]:
        response = self.respond(environ)
        start_response(f"{response.status} {HTTPStatus(response.status).phrase}",
                       response.all_headers())
        # HEAD is GET without the body, which the application leaves out (waitress sends
        # what it is given).
        return [] if _method(environ) == "HEAD" else [response.body]

    def respond(self, environ: WSGIEnvironment) -> Response:
        method = "GET" if (asked := _method(environ)) == "HEAD" else asked
        path = environ.get("PATH_INFO") or "/"
        headers = _headers(environ)
        if method not in _METHODS:
            return Response(405, b"method not allowed\n", "text/plain; charset=utf-8",
                            (("Allow", "GET, HEAD, POST"),))
        if method == "GET" and path == "/healthz":
            return Response.text(200, "ok")
        if method == "GET" and path == "/readyz":
            ready, checks = self.readiness.report()
            body = json.dumps({"ready": ready, "checks": checks}, indent=1).encode() + b"\n"
            return Response(200 if ready else 503, body, "application/json")
        verdict = self.guard.check(headers, str(environ.get("REMOTE_ADDR") or ""))
        if not verdict.allowed:
            extra: tuple[tuple[str, str], ...] = ()
            if verdict.status == 401:
                extra = (("WWW-Authenticate", self.guard.challenge()),)
            elif verdict.status == 429:
                extra = (("Retry-After", str(verdict.retry_after)),)
            return Response(verdict.status, (verdict.reason + "\n").encode(),
                            "text/plain; charset=utf-8", extra)
        if method == "GET" and path == "/metrics":
            return Response(200, generate_latest(self.registry), CONTENT_TYPE_LATEST)
        if path.startswith(_DICOMWEB):
            if self.stow is None:
                return Response.text(404, "STOW-RS is off here: set http.stow_rs = true")
            return self.stow.handle(method, path, headers, environ["wsgi.input"], verdict.user)
        if self.pages is None:
            if method == "POST":
                return Response.text(405, "method not allowed")
            return Response.text(404, "not found: try /metrics, /healthz or /readyz")
        if method == "POST" and path in (*_PROBES, "/metrics"):
            return Response.text(405, "method not allowed")
        body = b""
        if method == "POST":
            length = str(environ.get("CONTENT_LENGTH") or "0")
            if not length.isdigit() or int(length) > MAX_FORM_BYTES:
                return Response.text(413, f"a form of at most {MAX_FORM_BYTES // 1024} KiB, "
                                          "with its Content-Length")
            body = environ["wsgi.input"].read(int(length))
        target = path + (f"?{query}" if (query := environ.get("QUERY_STRING")) else "")
        return self.pages.handle(Request.build(method, target, headers, body, verdict.user))


def _method(environ: WSGIEnvironment) -> str:
    return str(environ["REQUEST_METHOD"]).upper()


def _headers(environ: WSGIEnvironment) -> dict[str, str]:
    """The request's headers, names in lower case (as the guard and the pages read them)."""
    headers = {name: str(environ[key]) for key, name in _UNPREFIXED.items() if environ.get(key)}
    for key, value in environ.items():
        if key.startswith("HTTP_"):
            headers[key[5:].replace("_", "-").lower()] = str(value)
    return headers
