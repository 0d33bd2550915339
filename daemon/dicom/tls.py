"""DICOM TLS (PS3.15 B.9, the BCP 195 profile): the TLS contexts built from [tls], and an
association server that does the TLS handshake in the connection's own thread.

pynetdicom's server wraps each accepted socket in its accept loop, so one client that
connects and never says hello would stall every other connection; here the handshake runs
in the new connection's thread with a deadline.
"""

from __future__ import annotations

import logging
import socket
import ssl
from collections.abc import Callable
from pathlib import Path
from typing import Any

from denoised_node.config.settings import (
    ConfigError,
    Destination,
    DicomwebDestination,
    TLSSettings,
)
from denoised_node.daemon.dicom.connection_guard import GuardedAssociationServer

log = logging.getLogger(__name__)

_VERSIONS = {"TLSv1.2": ssl.TLSVersion.TLSv1_2, "TLSv1.3": ssl.TLSVersion.TLSv1_3}


def server_context(tls: TLSSettings) -> ssl.SSLContext:
    """The SCP's context: its certificate, and client certificates checked against
    tls.ca_certificates when tls.require_client_certificate (mutual TLS)."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = _VERSIONS[tls.minimum_version]
    _load_identity(context, tls, required=True)
    if tls.ca_certificates is not None:
        _load_trust(context, tls.ca_certificates)
    context.verify_mode = ssl.CERT_REQUIRED if tls.require_client_certificate else ssl.CERT_NONE
    return context


def client_context(tls: TLSSettings,
                   destination: Destination | DicomwebDestination) -> ssl.SSLContext:
    """The context for sends to ``destination`` (DIMSE over TLS, or DICOMweb over https):
    its server certificate verified against
    tls.ca_certificates (else the system's trust store), and the node's own certificate
    offered for mutual TLS when one is configured."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    context.minimum_version = _VERSIONS[tls.minimum_version]
    if tls.ca_certificates is not None:
        _load_trust(context, tls.ca_certificates)
    context.check_hostname = destination.tls_verify_hostname
    context.verify_mode = ssl.CERT_REQUIRED
    _load_identity(context, tls, required=False)
    return context


def client_tls_args(tls: TLSSettings,
                    destination: Destination) -> tuple[ssl.SSLContext, str] | None:
    """pynetdicom's ``tls_args`` for an association to ``destination`` (None: no TLS)."""
    if not destination.tls:
        return None
    return client_context(tls, destination), destination.host


def _load_identity(context: ssl.SSLContext, tls: TLSSettings, *, required: bool) -> None:
    if tls.certificate is None or tls.private_key is None:
        if required:
            raise ConfigError("tls.certificate and tls.private_key are needed for the TLS port")
        return
    _readable(tls.certificate, "tls.certificate")
    _readable(tls.private_key, "tls.private_key")
    try:
        context.load_cert_chain(tls.certificate, tls.private_key)
    except ssl.SSLError as exc:
        raise ConfigError(f"tls.certificate {tls.certificate} and tls.private_key "
                          f"{tls.private_key} do not load as a PEM certificate and its "
                          f"unencrypted key ({exc.reason or exc})") from None


def _load_trust(context: ssl.SSLContext, path: Path) -> None:
    _readable(path, "tls.ca_certificates")
    try:
        context.load_verify_locations(cafile=str(path))
    except ssl.SSLError as exc:
        raise ConfigError(f"tls.ca_certificates {path} holds no PEM certificate "
                          f"({exc.reason or exc})") from None


def _readable(path: Path, key: str) -> None:
    try:
        with path.open("rb"):
            pass
    except OSError as exc:
        raise ConfigError(f"{key} {path} cannot be read ({exc.strerror}); check the path "
                          "and that the node's user may read it") from None


class TLSAssociationServer(GuardedAssociationServer):
    """A guarded association server that wraps each connection in TLS in its own thread."""

    def __init__(self, *args: Any, tls_context: ssl.SSLContext, handshake_timeout: float,
                 on_handshake_failure: Callable[[], None] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.tls_context = tls_context
        self.handshake_timeout = handshake_timeout
        self.on_handshake_failure = on_handshake_failure

    def finish_request(self, request: Any, client_address: Any) -> None:
        raw: socket.socket = request
        raw.settimeout(self.handshake_timeout)
        try:
            wrapped = self.tls_context.wrap_socket(raw, server_side=True)
        except (ssl.SSLError, OSError) as exc:
            log.warning("TLS handshake failed: %s", _reason(exc),
                        extra={"peer_address": str(client_address[0])})
            raw.close()
            if self.on_handshake_failure is not None:
                self.on_handshake_failure()
            return
        wrapped.settimeout(None)  # the connection guard sets the read timeouts from here on
        super().finish_request(wrapped, client_address)


def _reason(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return str(exc.reason)
    return str(exc) or type(exc).__name__
