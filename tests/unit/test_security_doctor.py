"""`denoised-node doctor` on what issue 6 added: TLS files (readable, matching, not expired),
the HTTP port, and an open SCP without an allowlist."""

from __future__ import annotations

import json
import socket
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner

from denoised_node.config.settings import HttpSettings, Settings, load_settings
from denoised_node.daemon.cli.doctor_security import access_check, http_check, tls_checks
from denoised_node.daemon.cli.main import main
from denoised_node.daemon.web.endpoint import StatusServer
from denoised_node.daemon.web.probes import Readiness
from tests.fixtures.certificates import Credentials, TestCA


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> TestCA:
    return TestCA.create(tmp_path_factory.mktemp("doctor-pki"))


def _tls_settings(node: Credentials, ca: TestCA, **env: str) -> Settings:
    base = {"DENOISED_NODE_TLS__ENABLED": "true",
            "DENOISED_NODE_TLS__CERTIFICATE": str(node.certificate),
            "DENOISED_NODE_TLS__PRIVATE_KEY": str(node.private_key),
            "DENOISED_NODE_TLS__CA_CERTIFICATES": str(ca.certificate)}
    base.update({f"DENOISED_NODE_{k.upper()}": v for k, v in env.items()})
    return load_settings(None, environ=base)


def _by_name(settings: Settings, now: datetime | None = None) -> dict[str, tuple[bool, str]]:
    return {c.name: (c.ok, c.detail) for c in tls_checks(settings, now)}


def test_good_tls_files_pass(ca: TestCA) -> None:
    checks = _by_name(_tls_settings(ca.issue("good"), ca))
    assert checks["tls.certificate"][0] and "valid until" in checks["tls.certificate"][1]
    assert checks["tls.ca_certificates"][0]
    assert checks["tls port"] == (True, ("127.0.0.1:2762, mutual TLS (client certificates "
                                         "required), TLSv1.2 or later"))


def test_expired_and_expiring_certificates_are_problems(ca: TestCA) -> None:
    expired = _by_name(_tls_settings(ca.issue("old", expired=True), ca))
    assert not expired["tls.certificate"][0]
    assert "CN=old expired on" in expired["tls.certificate"][1]
    soon = _by_name(_tls_settings(ca.issue("soon", valid_days=10), ca))
    assert not soon["tls.certificate"][0] and "expires in 9 day(s)" in soon["tls.certificate"][1]
    # The CA itself, checked a year from now: expired too.
    later = _by_name(_tls_settings(ca.issue("later"), ca),
                     now=datetime.now(UTC) + timedelta(days=365))
    assert not later["tls.ca_certificates"][0]


def test_unreadable_or_mismatched_files_say_which(ca: TestCA, tmp_path: Path) -> None:
    node, other = ca.issue("node-a"), ca.issue("node-b")
    mismatched = _by_name(_tls_settings(Credentials(node.certificate, other.private_key), ca))
    assert mismatched["tls"][0] is False and "do not load as a PEM" in mismatched["tls"][1]
    missing = _by_name(_tls_settings(Credentials(tmp_path / "none.crt", node.private_key), ca))
    assert "tls.certificate" in missing["tls"][1] and "cannot be read" in missing["tls"][1]


def test_tls_for_sends_only_checks_the_trust(ca: TestCA) -> None:
    destinations = json.dumps([{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1",
                                "port": 2762, "tls": True}])
    settings = load_settings(None, environ={
        "DENOISED_NODE_TLS__CA_CERTIFICATES": str(ca.certificate),
        "DENOISED_NODE_DESTINATIONS": destinations})
    assert set(_by_name(settings)) == {"tls.ca_certificates"}
    assert _by_name(load_settings(None, environ={})) == {}


def test_an_open_scp_on_the_network_is_a_problem(
        settings_factory: Callable[..., Settings]) -> None:
    assert access_check(settings_factory()).ok  # loopback
    exposed = settings_factory(node__host="0.0.0.0")
    check = access_check(exposed)
    assert not check.ok and "allowed_peers" in check.fix
    assert access_check(settings_factory(node__host="0.0.0.0",
                                         node__allowed_calling_ae_titles='["PACS"]')).ok


def test_http_port_free_taken_or_ours(settings_factory: Callable[..., Settings],
                                      runtime) -> None:  # type: ignore[no-untyped-def]
    from denoised_node.daemon.web.metrics import node_registry

    with socket.create_server(("127.0.0.1", 0)) as other:
        port = other.getsockname()[1]
        taken = http_check(settings_factory(http__port=port))
        assert taken is not None and not taken.ok and "another program" in taken.detail
    registry, _ = node_registry(runtime.sessions, postgres=False)
    server = StatusServer(HttpSettings(port=0), registry, Readiness([])).start()
    try:
        ours = http_check(settings_factory(http__port=server.port))
        assert ours is not None and ours.ok and "answers /healthz" in ours.detail
    finally:
        server.shutdown()
    assert http_check(settings_factory(http__enabled=False)) is None


def test_doctor_command_lists_the_tls_checks(ca: TestCA, tmp_path: Path) -> None:
    node = ca.issue("cli", expired=True)
    config = tmp_path / "node.toml"
    config.write_text(f'[node]\ndata_dir = "{tmp_path / "data"}"\nmin_free_mb = 0\n'
                      f'acse_timeout = 2\n[model]\ndevice = "cpu"\n[http]\nenabled = false\n'
                      f'[tls]\nenabled = true\ncertificate = "{node.certificate}"\n'
                      f'private_key = "{node.private_key}"\nca_certificates = "{ca.certificate}"\n'
                      '[[destinations]]\nname = "pacs"\nae_title = "PACS"\nhost = "127.0.0.1"\n'
                      'port = 1\ntls = true\n')
    result = CliRunner().invoke(main, ["doctor", "--config", str(config)])
    assert result.exit_code == 1
    assert "tls.certificate: PROBLEM:" in result.stdout and "expired on" in result.stdout
    assert "fix: renew the certificate" in result.stdout
    assert "destination pacs: PROBLEM: pacs (PACS@127.0.0.1:1, TLS)" in result.stdout
