"""Every DICOM network knob in one place: the function that builds an AE from the settings."""

from __future__ import annotations

import socket
from typing import Any

from pynetdicom import AE

from denoised_node.config.settings import Settings


def make_ae(settings: Settings, ae_title: str | None = None) -> AE:
    node = settings.node
    ae = AE(ae_title=ae_title or node.ae_title)
    ae.acse_timeout = node.acse_timeout
    ae.dimse_timeout = node.dimse_timeout
    ae.network_timeout = node.network_timeout
    ae.connection_timeout = node.acse_timeout
    ae.maximum_associations = node.max_associations
    ae.maximum_pdu_size = node.maximum_pdu_size
    return ae


def set_tcp_nodelay(event: Any) -> None:
    """EVT_CONN_OPEN handler: without TCP_NODELAY each small PDU waits for a delayed ACK
    (about 40 ms per C-STORE); pynetdicom leaves Nagle's algorithm on."""
    sock = getattr(getattr(event.assoc.dul, "socket", None), "socket", None)
    if sock is not None:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass
