"""Doctor's checks for what issue 6 added: TLS files, the HTTP endpoint, access control."""

from __future__ import annotations

import errno
import socket
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509

from denoised_node.config.settings import ConfigError, Destination, Settings
from denoised_node.daemon.cli.doctor_check import Check
from denoised_node.daemon.dicom.tls import server_context
from denoised_node.daemon.web.auth import Guard

RENEW_BEFORE = timedelta(days=30)
_LOOPBACK = {"127.0.0.1", "::1", "localhost"}


def tls_checks(settings: Settings, now: datetime | None = None) -> Iterator[Check]:
    tls = settings.tls
    sends = [d.name for d in settings.destinations  # over DICOM TLS, or DICOMweb over https
             if (d.tls if isinstance(d, Destination) else d.url.startswith("https:"))]
    if not tls.enabled and not sends:
        return
    now = now or datetime.now(UTC)
    if tls.enabled:
        try:
            server_context(tls)  # readable, PEM, the key matches the certificate
        except ConfigError as exc:
            yield Check("tls", False, str(exc), "point tls.certificate/private_key at the PEM "
                        "files and make them readable by the node's user")
            return
    files = [("tls.certificate", tls.certificate), ("tls.ca_certificates", tls.ca_certificates)]
    for key, path in files:
        if path is not None:
            yield _certificate_file(key, path, now)
    if tls.enabled:
        mode = ("mutual TLS (client certificates required)" if tls.require_client_certificate
                else "client certificates not checked")
        yield Check("tls port", True, f"{settings.node.host}:{tls.port}, {mode}, "
                    f"{tls.minimum_version} or later"
                    + ("" if tls.plain_port else "; plain port closed"))


def _certificate_file(key: str, path: Path, now: datetime) -> Check:
    name = f"{key}"
    try:
        certificates = x509.load_pem_x509_certificates(path.read_bytes())
    except OSError as exc:
        return Check(name, False, f"{path}: {exc.strerror}",
                     "check the path and that the node's user may read it")
    except ValueError:
        return Check(name, False, f"{path} holds no PEM certificate", "give a PEM file")
    problems, soonest = [], None
    for cert in certificates:
        subject = cert.subject.rfc4514_string() or "(no subject)"
        if cert.not_valid_before_utc > now:
            problems.append(f"{subject} is not valid before {cert.not_valid_before_utc:%Y-%m-%d}")
        if cert.not_valid_after_utc <= now:
            problems.append(f"{subject} expired on {cert.not_valid_after_utc:%Y-%m-%d}")
        elif cert.not_valid_after_utc - now < RENEW_BEFORE:
            days = (cert.not_valid_after_utc - now).days
            problems.append(f"{subject} expires in {days} day(s), on "
                            f"{cert.not_valid_after_utc:%Y-%m-%d}")
        if soonest is None or cert.not_valid_after_utc < soonest:
            soonest = cert.not_valid_after_utc
    if problems:
        return Check(name, False, f"{path}: " + "; ".join(problems),
                     "renew the certificate and restart the node")
    return Check(name, True, f"{path}: {len(certificates)} certificate(s), valid until "
                 f"{soonest:%Y-%m-%d}")


def http_check(settings: Settings) -> Check | None:
    http = settings.http
    if not http.enabled:
        return None
    where = f"{http.host}:{http.port}"
    try:
        guard = Guard(http)  # reads the credential files as serve does
    except ConfigError as exc:
        return Check("http", False, str(exc), "serve would refuse to start: fix the file "
                     "or its permissions")
    if guard.plaintext_password:
        return Check("http", False, f"http.password_file {http.password_file} holds the "
                     "password in plain text",
                     f"store a bcrypt hash instead: denoised-node http-password "
                     f"{http.password_file} --user {http.username}")
    try:
        with socket.create_server((http.host, http.port)):
            pass
    except OSError as exc:
        if exc.errno != errno.EADDRINUSE:
            return Check("http", False, f"{where}: {exc.strerror}", "set http.host and http.port")
        if _answers_healthz(http.host, http.port):
            return Check("http", True, f"{where}: the running node answers /healthz")
        return Check("http", False, f"{where} is used by another program",
                     "choose another http.port, or http.enabled = false")
    return Check("http", True, f"{where} is free for /metrics, /healthz, /readyz")


def _answers_healthz(host: str, port: int) -> bool:
    address = f"[{host}]" if ":" in host else host
    try:
        with urllib.request.urlopen(f"http://{address}:{port}/healthz", timeout=3) as answer:
            return bool(answer.status == 200)
    except OSError:
        return False


def access_check(settings: Settings) -> Check:
    node = settings.node
    listed = len(set(node.allowed_calling_ae_titles) | {p.ae_title for p in node.allowed_peers})
    if listed:
        return Check("access", True, f"{listed} calling AE title(s) allowed; called AE title "
                     f"must be {node.ae_title}")
    if node.host in _LOOPBACK:
        return Check("access", True, "any calling AE title (the SCP listens on loopback only)")
    return Check("access", False, f"any calling AE title may store into the node on {node.host}",
                 "list the PACS and scanners in node.allowed_calling_ae_titles or "
                 "[[node.allowed_peers]] (AE title and addresses)")


def security_checks(settings: Settings) -> list[Check]:
    checks = [access_check(settings)]
    checks.extend(tls_checks(settings))
    http = http_check(settings)
    if http is not None:
        checks.append(http)
    return checks
