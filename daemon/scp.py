"""The Storage SCP: an AE that accepts MR (and, to ignore them politely, all other storage
SOP classes) in every transfer syntax, with handlers bound to the receiver they need."""

from __future__ import annotations

import logging
import threading
from collections import Counter
from typing import Any

from pynetdicom import ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import ThreadedAssociationServer

from denoised_node.config.settings import Settings
from denoised_node.daemon.network import make_ae, set_tcp_nodelay
from denoised_node.daemon.receive import Receiver
from denoised_node.daemon.status import Status, status_for

log = logging.getLogger(__name__)


class DeliveryTracker:
    """Counts, per association, the instances each series got, to tell at release whether
    an association delivered a whole series (an early completion signal)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_assoc: dict[int, Counter[int]] = {}

    def count(self, assoc: Any, series_id: int) -> None:
        with self._lock:
            self._by_assoc.setdefault(id(assoc), Counter())[series_id] += 1

    def pop(self, assoc: Any) -> Counter[int]:
        with self._lock:
            return self._by_assoc.pop(id(assoc), Counter())


def handle_store(event: Any, receiver: Receiver, tracker: DeliveryTracker) -> int:
    calling = event.assoc.requestor.ae_title
    try:
        data = event.encoded_dataset(include_meta=True)
        received = receiver.receive(data, str(event.context.abstract_syntax), calling)
    except Exception as exc:  # noqa: BLE001 - every failure becomes a DIMSE status, never success
        status = status_for(exc)
        level = logging.ERROR if status == Status.PROCESSING_FAILURE else logging.WARNING
        log.log(level, "instance refused: %s", exc, exc_info=status == Status.PROCESSING_FAILURE,
                extra={"status": f"0x{status:04X}", "calling_ae": calling,
                       "sop_instance_uid": str(event.request.AffectedSOPInstanceUID)})
        return int(status)
    if not received.duplicate and received.ignored_reason is None:
        tracker.count(event.assoc, received.series_id)
    log.debug("instance stored", extra={"sop_instance_uid": received.sop_instance_uid,
                                        "duplicate": received.duplicate})
    return int(Status.SUCCESS)


def handle_echo(event: Any) -> int:
    return int(Status.ECHO_SUCCESS)


def handle_released(event: Any, receiver: Receiver, tracker: DeliveryTracker) -> None:
    delivered = tracker.pop(event.assoc)
    try:
        receiver.mark_released(delivered)
    except Exception:  # noqa: BLE001 - only an early-completion hint; idle completion remains
        log.exception("could not record the association release")


def handle_closed(event: Any, tracker: DeliveryTracker) -> None:
    tracker.pop(event.assoc)  # aborted or dropped: no completion hint


def build_scp(settings: Settings, receiver: Receiver) -> tuple[Any, list[Any]]:
    """The AE and its bound handlers, ready for ``start_server``."""
    ae = make_ae(settings)
    ae.require_called_aet = True
    if settings.node.allowed_calling_ae_titles:
        ae.require_calling_aet = list(settings.node.allowed_calling_ae_titles)
    for context in AllStoragePresentationContexts:
        ae.add_supported_context(context.abstract_syntax, ALL_TRANSFER_SYNTAXES)
    ae.add_supported_context(Verification)
    tracker = DeliveryTracker()
    handlers = [
        (evt.EVT_CONN_OPEN, set_tcp_nodelay),
        (evt.EVT_C_STORE, handle_store, [receiver, tracker]),
        (evt.EVT_C_ECHO, handle_echo),
        (evt.EVT_RELEASED, handle_released, [receiver, tracker]),
        (evt.EVT_ABORTED, handle_closed, [tracker]),
    ]
    return ae, handlers


def start_scp(settings: Settings, receiver: Receiver) -> ThreadedAssociationServer:
    ae, handlers = build_scp(settings, receiver)
    server = ae.start_server((settings.node.host, settings.node.port), block=False,
                             evt_handlers=handlers)
    log.info("storage SCP listening", extra={"ae_title": settings.node.ae_title,
                                             "host": settings.node.host,
                                             "port": server.server_address[1]})
    return server  # type: ignore[no-any-return]
