"""The status pages' password: stored as a bcrypt hash in an htpasswd line (`user:$2b$...`,
what `htpasswd -B` and `denoised-node http-password` write), or, as before, in plain text.

bcrypt is slow on purpose (about 0.1-0.3 s a check), so a password once verified is
remembered as its SHA-256 digest for the life of the process: a browser sends it with every
request, and only a new or wrong one pays bcrypt again.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import threading
from pathlib import Path

from denoised_node.config.settings import ConfigError

BCRYPT_PREFIXES = (b"$2a$", b"$2b$", b"$2y$")
# bcrypt's work factor for new hashes: 2**12 rounds, about 0.2 s on a server core.
ROUNDS = 12


def is_bcrypt(secret: bytes) -> bool:
    return secret.startswith(BCRYPT_PREFIXES)


class StoredPassword:
    """The password of ``http.password_file`` for ``username``, checked in constant time."""

    def __init__(self, secret: bytes, username: str | None, key: str) -> None:
        user, sep, rest = secret.partition(b":")
        if sep and is_bcrypt(rest):  # an htpasswd line
            if username is not None and user.decode("utf-8", "replace") != username:
                raise ConfigError(f"{key} holds a hash for user {user.decode(errors='replace')!r}, "
                                  f"not for http.username {username!r}")
            secret = rest
        self.hashed = is_bcrypt(secret)
        self._secret = secret if self.hashed else hashlib.sha256(secret).digest()
        self._verified: set[bytes] = set()
        self._lock = threading.Lock()

    def remembered(self, password: bytes) -> bool:
        """The cheap check: a plain-text password, or one bcrypt already verified."""
        digest = hashlib.sha256(password).digest()
        if not self.hashed:
            return hmac.compare_digest(digest, self._secret)
        with self._lock:
            return any(hmac.compare_digest(digest, known) for known in self._verified)

    def matches(self, password: bytes) -> bool:
        if self.remembered(password):
            return True
        if not self.hashed:
            return False
        digest = hashlib.sha256(password).digest()
        import bcrypt

        if not bcrypt.checkpw(password, self._secret):
            return False
        with self._lock:
            self._verified.add(digest)
        return True


def htpasswd_line(username: str, password: str, rounds: int = ROUNDS) -> str:
    import bcrypt

    if ":" in username or not username:
        raise ValueError("a user name is not empty and has no colon")
    hashed = bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds)).decode()
    return f"{username}:{hashed}\n"


def write_password_file(path: Path, username: str, password: str,
                        rounds: int = ROUNDS) -> None:
    """Write ``username:bcrypt-hash`` to ``path``, mode 0600, atomically."""
    line = htpasswd_line(username, password, rounds)
    temporary = path.with_name(f".{path.name}.tmp")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as handle:
        handle.write(line)
    temporary.replace(path)
