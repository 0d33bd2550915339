"""Requests and responses as plain values, so pages are tested without a socket."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from urllib.parse import parse_qs, urlsplit

# No scripts, nothing from elsewhere, never inside someone else's frame.
SECURITY_HEADERS = (
    ("Content-Security-Policy", ("default-src 'none'; img-src 'self'; style-src 'self'; "
                                 "form-action 'self'; base-uri 'none'; frame-ancestors 'none'")),
    ("X-Content-Type-Options", "nosniff"),
    ("X-Frame-Options", "DENY"),
    ("Referrer-Policy", "same-origin"),
)
MAX_FORM_BYTES = 64 * 1024


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    query: Mapping[str, list[str]] = field(default_factory=dict)
    headers: Mapping[str, str] = field(default_factory=dict)  # names in lower case
    form: Mapping[str, list[str]] = field(default_factory=dict)
    user: str | None = None  # who authenticated (None: nobody had to)

    @classmethod
    def build(cls, method: str, target: str, headers: Mapping[str, str] | None = None,
              body: bytes = b"", user: str | None = None) -> Request:
        parts = urlsplit(target)
        lowered = {k.lower(): v for k, v in (headers or {}).items()}
        form: dict[str, list[str]] = {}
        if body and lowered.get("content-type", "").startswith(
                "application/x-www-form-urlencoded"):
            form = parse_qs(body.decode("utf-8", "replace"), keep_blank_values=True)
        return cls(method.upper(), parts.path or "/", parse_qs(parts.query), lowered, form, user)

    def arg(self, name: str, default: str = "") -> str:
        return self.query.get(name, [default])[0]

    def form_value(self, name: str) -> str:
        return self.form.get(name, [""])[0]


@dataclass(frozen=True)
class Response:
    status: int
    body: bytes
    content_type: str = "text/html; charset=utf-8"
    headers: tuple[tuple[str, str], ...] = ()
    cache: str = "no-store"

    @classmethod
    def text(cls, status: int, message: str) -> Response:
        return cls(status, (message + "\n").encode(), "text/plain; charset=utf-8")

    @classmethod
    def redirect(cls, location: str) -> Response:
        return cls(303, b"", "text/plain; charset=utf-8", (("Location", location),))

    def all_headers(self) -> list[tuple[str, str]]:
        return [("Content-Type", self.content_type), ("Content-Length", str(len(self.body))),
                ("Cache-Control", self.cache), *SECURITY_HEADERS, *self.headers]
