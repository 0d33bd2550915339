"""Who may use the HTTP endpoint: the settings that require credentials off loopback, the
guard's checks, and the real server answering with and without them."""

from __future__ import annotations

import base64
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from email.message import Message
from pathlib import Path

import pytest

from denoised_node.config.settings import ConfigError, HttpSettings, Settings, is_loopback
from denoised_node.daemon.web.auth import Guard
from denoised_node.daemon.web.csrf import CsrfTokens
from denoised_node.daemon.web.endpoint import StatusServer
from denoised_node.daemon.web.metrics import node_registry
from denoised_node.daemon.web.probes import CheckResult, Readiness
from denoised_node.daemon.web.request import Request, Response
from denoised_node.storage.runtime import Runtime


def _secret(tmp_path: Path, name: str, value: str) -> Path:
    path = tmp_path / name
    path.write_text(value + "\n")
    return path


def _basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


@pytest.mark.parametrize("host,loopback", [("127.0.0.1", True), ("127.8.9.1", True),
                                           ("::1", True), ("localhost", True),
                                           ("0.0.0.0", False), ("::", False), ("", False),
                                           ("10.2.3.4", False), ("node.example", False)])
def test_loopback_hosts(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


def test_a_host_off_loopback_needs_credentials(settings_factory: Callable[..., Settings],
                                               tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"http\.host '0\.0\.0\.0' is not loopback.*"
                                          r"http\.username and http\.password_file.*"
                                          r"http\.token_file.*allow_unauthenticated"):
        settings_factory(http__host="0.0.0.0")
    token = _secret(tmp_path, "token", "s3cret-token")
    assert settings_factory(http__host="0.0.0.0", http__token_file=str(token)).http.authenticated
    assert settings_factory(http__host="10.1.1.1", http__allow_unauthenticated=True)
    assert settings_factory(http__host="0.0.0.0", http__enabled=False)  # nothing listens
    with pytest.raises(ConfigError, match="http.username and http.password_file go together"):
        settings_factory(http__username="admin")
    with pytest.raises(ConfigError, match="unknown key 'http.password'"):
        settings_factory(http__password="inline")  # secrets live in files only


def test_credential_files_must_be_readable_and_not_empty(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"http\.token_file .*missing.*cannot read it"):
        Guard(HttpSettings(token_file=tmp_path / "missing"))
    with pytest.raises(ConfigError, match=r"http\.password_file .* is empty"):
        Guard(HttpSettings(username="admin", password_file=_secret(tmp_path, "empty", "")))


def test_basic_and_bearer_credentials(tmp_path: Path) -> None:
    guard = Guard(HttpSettings(username="admin", password_file=_secret(tmp_path, "pw", "pässword"),
                               token_file=_secret(tmp_path, "token", "tok-123")))
    assert guard.check({"authorization": _basic("admin", "pässword")}).user == "admin"
    assert guard.check({"authorization": "Bearer tok-123"}).user == "token"
    for wrong in (_basic("admin", "password"), _basic("root", "pässword"), "Bearer tok-12",
                  "Bearer", "Basic !!!", "Basic " + base64.b64encode(b"nocolon").decode(), ""):
        verdict = guard.check({"authorization": wrong, "host": "127.0.0.1"})
        assert (verdict.allowed, verdict.status) == (False, 401), wrong
    assert guard.challenge().startswith('Basic realm="denoised-node"')
    token_only = Guard(HttpSettings(token_file=_secret(tmp_path, "t2", "x")))
    assert token_only.challenge().startswith("Bearer")


def test_without_credentials_only_local_host_names_get_in() -> None:
    """DNS rebinding: a page from elsewhere whose name resolves to 127.0.0.1."""
    guard = Guard(HttpSettings())
    for host in ("127.0.0.1:8080", "localhost:8080", "[::1]:8080", "127.0.0.1"):
        assert guard.check({"host": host}).allowed, host
    for host in ("evil.example:8080", "", "10.0.0.1:8080"):
        verdict = guard.check({"host": host})
        assert (verdict.allowed, verdict.status) == (False, 403), host
    behind_proxy = Guard(HttpSettings(host="0.0.0.0", allow_unauthenticated=True))
    assert behind_proxy.check({"host": "node.hospital.example"}).allowed


def test_csrf_tokens_expire_and_are_bound_to_the_secret() -> None:
    tokens = CsrfTokens(b"k" * 32)
    token = tokens.issue(now=1000.0)
    headers = {"host": "127.0.0.1:8080", "origin": "http://127.0.0.1:8080"}
    assert tokens.problem(token, headers, now=1000.0 + 3600) == ""
    assert "expired" in tokens.problem(token, headers, now=1000.0 + 2 * 86400)
    assert "reload" in CsrfTokens(b"j" * 32).problem(token, headers, now=1001.0)
    assert "another site" in tokens.problem(token, {**headers, "sec-fetch-site": "cross-site"},
                                            now=1001.0)
    assert tokens.problem(token, {"host": "127.0.0.1:8080"}, now=1001.0) == ""  # no Origin


class _Echo:
    """Pages that say who asked."""

    def handle(self, request: Request) -> Response:
        return Response(200, f"{request.method} {request.path} by {request.user}".encode(),
                        "text/plain; charset=utf-8")


def _open(url: str, **headers: str) -> tuple[int, Message, str]:
    """Status, headers (names in any case, as HTTP has them) and body."""
    request = urllib.request.Request(url, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=10) as answer:
            return answer.status, answer.headers, answer.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.headers, error.read().decode()


@pytest.fixture
def guarded(runtime: Runtime, tmp_path: Path) -> Iterator[str]:
    registry, _ = node_registry(runtime.sessions, postgres=False)
    settings = HttpSettings(port=0, username="admin",
                            password_file=_secret(tmp_path, "pw", "correct horse"))
    server = StatusServer(settings, registry, Readiness([("x", lambda: CheckResult(True, "ok"))]),
                          _Echo()).start()
    yield f"http://127.0.0.1:{server.port}"
    server.shutdown()


def test_the_server_asks_for_credentials_except_on_probes(guarded: str) -> None:
    status, headers, _ = _open(f"{guarded}/")
    assert status == 401 and headers["WWW-Authenticate"].startswith("Basic")
    assert _open(f"{guarded}/metrics")[0] == 401
    assert _open(f"{guarded}/healthz")[0] == 200 and _open(f"{guarded}/readyz")[0] == 200
    auth = _basic("admin", "correct horse")
    status, headers, body = _open(f"{guarded}/jobs", Authorization=auth)
    assert (status, body) == (200, "GET /jobs by admin")
    assert "frame-ancestors 'none'" in headers["Content-Security-Policy"]
    assert "denoised_node_queue_jobs" in _open(f"{guarded}/metrics", Authorization=auth)[2]


def test_posts_reach_the_pages_with_their_form(guarded: str) -> None:
    request = urllib.request.Request(f"{guarded}/jobs/1/replay", data=b"a=1", method="POST",
                                      headers={"Authorization": _basic("admin", "correct horse")})
    with urllib.request.urlopen(request, timeout=10) as answer:
        assert answer.read() == b"POST /jobs/1/replay by admin"
    unauthorised = urllib.request.Request(f"{guarded}/jobs/1/replay", data=b"a=1")
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(unauthorised, timeout=10)
    assert refused.value.code == 401


def test_a_rebinding_host_is_refused_without_credentials(runtime: Runtime) -> None:
    registry, _ = node_registry(runtime.sessions, postgres=False)
    server = StatusServer(HttpSettings(port=0), registry, Readiness([]), _Echo()).start()
    try:
        base = f"http://127.0.0.1:{server.port}"
        assert _open(f"{base}/")[2] == "GET / by None"
        status, _, body = _open(f"{base}/", Host=f"evil.example:{server.port}")
        assert status == 403 and "Host header" in body
        assert _open(f"{base}/healthz", Host="evil.example")[0] == 200
    finally:
        server.shutdown()
