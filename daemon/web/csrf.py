"""CSRF protection for the forms (replay): a token that only the node's own pages carry, and
a same-origin check on the Origin header browsers send with every POST.

The token is an HMAC of its issue time under a secret made at start, so it needs no
storage; it expires after a day, and a restart makes old pages' forms ask for a reload.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections.abc import Mapping
from urllib.parse import urlsplit

TOKEN_FIELD = "csrf_token"
LIFETIME_SECONDS = 24 * 3600


class CsrfTokens:
    def __init__(self, secret: bytes | None = None) -> None:
        self._secret = secret or secrets.token_bytes(32)

    def issue(self, now: float | None = None) -> str:
        issued = str(int(time.time() if now is None else now))
        return f"{issued}.{self._sign(issued)}"

    def problem(self, token: str, headers: Mapping[str, str], now: float | None = None) -> str:
        """Why this POST must be refused ("" when it may go on); ``headers`` in lower case."""
        origin = headers.get("origin")
        if origin and origin != "null" and (
                urlsplit(origin).netloc.lower() != headers.get("host", "").lower()):
            return "the form was sent from another site"
        if headers.get("sec-fetch-site") == "cross-site":
            return "the form was sent from another site"
        issued, _, signature = token.partition(".")
        if not issued.isdigit() or not hmac.compare_digest(signature, self._sign(issued)):
            return "the form has expired (or the node restarted); reload the page and try again"
        age = (time.time() if now is None else now) - int(issued)
        if not 0 <= age <= LIFETIME_SECONDS:
            return "the form has expired; reload the page and try again"
        return ""

    def _sign(self, issued: str) -> str:
        return hmac.new(self._secret, f"csrf:{issued}".encode(), hashlib.sha256).hexdigest()
