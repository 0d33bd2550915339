"""Every DICOM network knob in one place: the function that builds an AE from the settings."""

from __future__ import annotations

import socket
import time
from types import ModuleType
from typing import Any

import pynetdicom.association
from pynetdicom import AE

from denoised_node.config.settings import Settings


# pynetdicom's two reactor threads poll: the DUL sleeps 1 ms whenever its event queue is
# empty, the association's loop sleeps 1 ms every pass. A C-STORE waits on both, so those
# naps, not the work, bound one association to about 250 images/s. Shorter naps (0.1 ms)
# gave +35 % images/s on this project's benchmark for a few % of a core per open association.
REACTOR_NAP_SECONDS = 0.0001


class _ShortNaps(ModuleType):
    """Stands in for the `time` module inside pynetdicom.association: sleeps of a
    millisecond or less (the reactor's poll) become REACTOR_NAP_SECONDS; others unchanged."""

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)

    @staticmethod
    def sleep(seconds: float) -> None:
        time.sleep(REACTOR_NAP_SECONDS if 0 < seconds <= 0.001 else seconds)


def shorten_reactor_naps() -> None:
    if not isinstance(pynetdicom.association.time, _ShortNaps):
        pynetdicom.association.time = _ShortNaps("time")  # type: ignore[attr-defined]


def make_ae(settings: Settings, ae_title: str | None = None) -> AE:
    shorten_reactor_naps()
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
    (about 40 ms per C-STORE); pynetdicom leaves Nagle's algorithm on. Also shortens this
    association's DUL poll (see REACTOR_NAP_SECONDS)."""
    event.assoc.dul._run_loop_delay = REACTOR_NAP_SECONDS
    sock = getattr(getattr(event.assoc.dul, "socket", None), "socket", None)
    if sock is not None:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass
