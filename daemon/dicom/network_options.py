"""Every DICOM network knob in one place: the function that builds an AE from the settings."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from types import ModuleType
from typing import Any

import pynetdicom.association
from pynetdicom import AE
from pynetdicom import _config as pynetdicom_config

from denoised_node.config.settings import Settings

# pynetdicom's two reactor threads poll: the DUL sleeps 1 ms whenever its event queue is
# empty, the association's loop sleeps 1 ms every pass. A C-STORE waits on both, so those
# naps, not the work, bound one association to about 250 images/s. Shorter naps (0.2 ms)
# gave +35 % images/s on this project's benchmark for a few % of a core per open association.
REACTOR_NAP_SECONDS = 0.0002


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
        pynetdicom.association.time = _ShortNaps("time")


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


@contextmanager
def files_sent_as_they_are() -> Iterator[None]:
    """Within: send_c_store(path) sends the file's bytes in chunks, as they are on disk.
    pynetdicom's default decodes the whole file and encodes it again, two thirds of the
    SCU's CPU per image, and converts it to the accepted transfer syntax; the SCU passes
    a path only where the file's own syntax was accepted. A switch of pynetdicom's module,
    so it is on only while the node sends (a send overlapping another may finish with
    pynetdicom's default: slower, as correct)."""
    previous = pynetdicom_config.STORE_SEND_CHUNKED_DATASET
    pynetdicom_config.STORE_SEND_CHUNKED_DATASET = True
    try:
        yield
    finally:
        pynetdicom_config.STORE_SEND_CHUNKED_DATASET = previous


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


def keep_responses_for_the_caller(assoc: Any) -> None:
    """pynetdicom's association reactor also polls the DIMSE queue (for requests a peer may
    send us) and, in a race with send_c_store's pause, sometimes takes the C-STORE response:
    the send then waits out its timeout and the PACS aborts ("Received unexpected C-STORE
    service message"; about one send in eight here). Our SCU associations never serve
    requests, so the reactor's non-blocking polls see an empty queue; the blocking waits of
    send_c_store and send_c_echo still get every message."""
    get_msg = assoc.dimse.get_msg

    def responses_only(block: bool = False) -> Any:
        return get_msg(block=True) if block else (None, None)

    assoc.dimse.get_msg = responses_only
