"""Hashed passwords for the status pages: htpasswd lines with bcrypt, the CLI that writes
them, the cache that keeps bcrypt off every request, and doctor's word on plain text."""

from __future__ import annotations

import base64
import stat
from pathlib import Path

import pytest
from click.testing import CliRunner

from denoised_node.config.settings import ConfigError, HttpSettings
from denoised_node.daemon.cli.main import main
from denoised_node.daemon.web import passwords
from denoised_node.daemon.web.auth import Guard
from denoised_node.daemon.web.passwords import StoredPassword, htpasswd_line


def _basic(user: str, password: str) -> dict[str, str]:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"authorization": f"Basic {token}", "host": "10.0.0.5:8080"}


def _guard(tmp_path: Path, content: str, user: str = "admin") -> Guard:
    secret = tmp_path / "http-password"
    secret.write_text(content)
    return Guard(HttpSettings(host="10.0.0.5", username=user, password_file=secret))


def test_a_bcrypt_htpasswd_line_is_checked(tmp_path: Path) -> None:
    guard = _guard(tmp_path, htpasswd_line("admin", "correct horse", rounds=4))
    assert guard.check(_basic("admin", "correct horse")).allowed
    assert not guard.check(_basic("admin", "wrong horse")).allowed
    assert not guard.check(_basic("root", "correct horse")).allowed
    assert not guard.plaintext_password


def test_a_bare_bcrypt_hash_and_plain_text_still_work(tmp_path: Path) -> None:
    bare = htpasswd_line("x", "s3cret-pass", rounds=4).split(":", 1)[1]
    assert _guard(tmp_path, bare).check(_basic("admin", "s3cret-pass")).allowed
    plain = _guard(tmp_path, "s3cret-pass\n")
    assert plain.check(_basic("admin", "s3cret-pass")).allowed and plain.plaintext_password


def test_a_hash_for_another_user_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="holds a hash for user 'bob', not for http.username"):
        _guard(tmp_path, htpasswd_line("bob", "correct horse", rounds=4))


def test_bcrypt_runs_once_per_password_not_per_request(monkeypatch: pytest.MonkeyPatch) -> None:
    import bcrypt

    stored = StoredPassword(htpasswd_line("admin", "correct horse", rounds=4).strip().encode(),
                            "admin", "http.password_file")
    calls: list[bytes] = []
    real = bcrypt.checkpw
    monkeypatch.setattr(bcrypt, "checkpw", lambda p, h: calls.append(p) or real(p, h))
    assert all(stored.matches(b"correct horse") for _ in range(20))
    assert not stored.matches(b"wrong")
    assert calls == [b"correct horse", b"wrong"]


def test_the_cli_writes_a_private_htpasswd_file(tmp_path: Path) -> None:
    target = tmp_path / "http-password"
    result = CliRunner().invoke(main, ["http-password", str(target), "--user", "admin",
                                       "--password-stdin"], input="correct horse battery\n")
    assert result.exit_code == 0, result.output
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    user, hashed = target.read_text().strip().split(":", 1)
    assert user == "admin" and passwords.is_bcrypt(hashed.encode())
    guard = Guard(HttpSettings(host="10.0.0.5", username="admin", password_file=target))
    assert guard.check(_basic("admin", "correct horse battery")).allowed
    short = CliRunner().invoke(main, ["http-password", str(target), "--user", "admin",
                                      "--password-stdin"], input="short\n")
    assert short.exit_code != 0 and "shorter than 8 characters" in short.output


def test_doctor_flags_a_plain_text_password(tmp_path: Path) -> None:
    from denoised_node.config.settings import Settings
    from denoised_node.daemon.cli.doctor_security import http_check

    secret = tmp_path / "pw"
    secret.write_text("plain-text-password\n")
    settings = Settings.model_validate({"http": {"host": "127.0.0.1", "port": 0,
                                                 "username": "admin",
                                                 "password_file": str(secret)}})
    check = http_check(settings)
    assert check is not None and not check.ok and "plain text" in check.detail
    assert "denoised-node http-password" in (check.fix or "")


def test_wrong_passwords_are_throttled_per_address_and_the_right_one_is_not(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 29, item 8: every wrong password cost a full bcrypt check, unthrottled (16
    threads of them took a core). Past the limit an address gets 429 with Retry-After and no
    bcrypt runs; other addresses, and a password already accepted, are not slowed."""
    import bcrypt
    from prometheus_client import CollectorRegistry

    from denoised_node.daemon.web.app import HttpApp
    from denoised_node.daemon.web.probes import CheckResult, Readiness
    from tests.fixtures.wsgi import call

    secret = tmp_path / "http-password"
    secret.write_text(htpasswd_line("admin", "correct horse", rounds=4))
    guard = Guard(HttpSettings(host="10.0.0.5", username="admin", password_file=secret))
    app = HttpApp(CollectorRegistry(), Readiness([("x", lambda: CheckResult(True, "ok"))]), guard)
    calls: list[bytes] = []
    real = bcrypt.checkpw
    monkeypatch.setattr(bcrypt, "checkpw", lambda p, h: calls.append(p) or real(p, h))

    def get(address: str, password: str) -> tuple[int, dict[str, str]]:
        def with_address(environ: dict[str, object], start: object) -> object:
            return app({**environ, "REMOTE_ADDR": address}, start)

        answer = call(with_address, "GET", "/metrics", headers={
            "Host": "10.0.0.5:8080", **{k.title(): v for k, v in _basic("admin", password).items()
                                        if k == "authorization"}})
        return answer.status, answer.headers

    assert get("10.0.0.7", "correct horse")[0] == 200  # verified once, from this address
    statuses = [get("10.0.0.9", f"guess {n}")[0] for n in range(20)]
    assert statuses == [401] * 10 + [429] * 10  # the defaults: 10 failures a minute
    assert len(calls) == 1 + 10  # no bcrypt for a throttled attempt
    status, headers = get("10.0.0.9", "guess 21")
    assert status == 429 and 0 < int(headers["Retry-After"]) <= 60
    assert get("10.0.0.9", "correct horse")[0] == 200  # the right password is never slowed
    assert get("10.0.0.8", "another guess")[0] == 401  # other addresses are checked as ever

    from denoised_node.daemon.web.throttle import FailureThrottle

    now = [1000.0]  # a clock of the test's own for the expiry: nothing waits
    guard.throttle = FailureThrottle(2, 60.0, clock=lambda: now[0])
    assert [get("10.0.0.9", "guess")[0] for _ in range(3)] == [401, 401, 429]
    assert get("10.0.0.9", "guess")[1]["Retry-After"] == "60"
    now[0] += 61  # the oldest failures expire: the address is checked again
    assert get("10.0.0.9", "guess 22")[0] == 401
