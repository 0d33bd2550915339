"""Who may use the HTTP endpoint: basic authentication and/or a bearer token when configured,
else (loopback only) any local client whose Host header names this machine.

The Host check stops DNS rebinding: a web page elsewhere whose name resolves to 127.0.0.1
would otherwise read the pages from the administrator's own browser. With credentials that
attack gets nothing, since the browser keeps them for the node's origin only.
Secrets are read from files once at start and never logged; the password file may hold a
bcrypt hash (passwords.py).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from denoised_node.config.settings import ConfigError, HttpSettings, is_loopback
from denoised_node.daemon.web.passwords import StoredPassword
from denoised_node.daemon.web.throttle import FailureThrottle

REALM = "denoised-node"


def read_secret(path: Path, key: str) -> bytes:
    """The secret in ``path`` (one line; surrounding white space dropped)."""
    try:
        secret = path.read_bytes().strip()
    except OSError as exc:
        raise ConfigError(f"{key} {path}: cannot read it ({exc.strerror or exc}); make it "
                          "readable by the node's user") from None
    if not secret:
        raise ConfigError(f"{key} {path} is empty; put the secret in it")
    return secret


def _digest(value: bytes) -> bytes:
    # Compare digests so that neither the length nor the content leaks through timing.
    return hashlib.sha256(value).digest()


@dataclass(frozen=True)
class Verdict:
    allowed: bool
    user: str | None = None
    status: int = 200  # 401 (ask for credentials), 403 (refused), 429 (throttled)
    reason: str = ""
    retry_after: int = 0  # with 429: seconds until this address may try again


class Guard:
    def __init__(self, settings: HttpSettings) -> None:
        self.username = settings.username
        self._password = (StoredPassword(read_secret(settings.password_file,
                                                     "http.password_file"),
                                         settings.username, "http.password_file")
                          if settings.password_file else None)
        self._token = (_digest(read_secret(settings.token_file, "http.token_file"))
                       if settings.token_file else None)
        self.authenticated = self._password is not None or self._token is not None
        self.plaintext_password = self._password is not None and not self._password.hashed
        # Without credentials on loopback, only clients that name a local host get in.
        self._check_host = not self.authenticated and is_loopback(settings.host)
        self._own_host = settings.host.lower()
        self.throttle = FailureThrottle(settings.max_failed_logins,
                                        settings.failed_login_window_seconds)

    def check(self, headers: Mapping[str, str], address: str = "") -> Verdict:
        """``headers`` with lower-case names; ``address``: the client's (failures are
        counted per address, and past the limit answered 429 without checking)."""
        if not self.authenticated:
            if self._check_host and not self._local_host(headers.get("host", "")):
                return Verdict(False, status=403, reason="the Host header does not name this "
                               "machine; open the page as http://127.0.0.1:PORT/")
            return Verdict(True)
        scheme, _, value = headers.get("authorization", "").strip().partition(" ")
        value = value.strip()
        if scheme.lower() == "bearer" and self._token is not None:
            if hmac.compare_digest(_digest(value.encode()), self._token):
                return Verdict(True, user="token")  # cheap to check: never throttled
        elif scheme.lower() == "basic" and self._password is not None:
            user, password = _basic_credentials(value)
            user_ok = user is not None and hmac.compare_digest(
                user.encode(), (self.username or "").encode())
            if user_ok and self._password.remembered(password):
                return Verdict(True, user=user)  # the right password is never throttled
            if wait := self.throttle.retry_after(address):
                return Verdict(False, status=429, retry_after=wait,
                               reason=f"too many failed logins from this address; "
                                      f"try again in {wait} s")
            if user_ok & self._password.matches(password):
                return Verdict(True, user=user)
        else:
            return Verdict(False, status=401, reason="authentication required")
        self.throttle.failed(address)
        return Verdict(False, status=401, reason="authentication required")

    def challenge(self) -> str:
        if self._password is not None:
            return f'Basic realm="{REALM}", charset="UTF-8"'
        return f'Bearer realm="{REALM}"'

    def _local_host(self, host_header: str) -> bool:
        host = urlsplit(f"//{host_header}").hostname or ""
        return is_loopback(host) or host == self._own_host


def _basic_credentials(value: str) -> tuple[str | None, bytes]:
    try:
        decoded = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        return None, b""
    user, sep, password = decoded.partition(b":")
    if not sep:
        return None, b""
    return user.decode("utf-8", "replace"), password
