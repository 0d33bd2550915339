"""The Storage SCP: an AE that accepts MR (and, to ignore them politely, all other storage
SOP classes) in every transfer syntax, with handlers bound to the receiver they need.

It listens on node.port, on tls.port with DICOM TLS, or on both; every connection is guarded
(connection_guard.py: timeouts, slots shared fairly across addresses), every association
checked against the access policy (access.py), and every C-STORE dataset written to a file as
it arrives (spool.py)."""

from __future__ import annotations

import logging
import socket
import threading
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Protocol

from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import ThreadedAssociationServer
from pynetdicom.utils import make_target

from denoised_node.config.settings import Settings
from denoised_node.daemon.dicom.access import AccessPolicy, Refusal, handle_requested
from denoised_node.daemon.dicom.connection_guard import (
    ConnectionGuard,
    GuardedAssociationServer,
    GuardLimits,
)
from denoised_node.daemon.dicom.dimse_status import Status, status_for
from denoised_node.daemon.dicom.network_options import make_ae, set_tcp_nodelay
from denoised_node.daemon.dicom.receive import Receiver
from denoised_node.daemon.dicom.scp_sockets import PLAIN, TLS, bind_listeners
from denoised_node.daemon.dicom.spool import Spool, Spooler
from denoised_node.daemon.dicom.tls import TLSAssociationServer, server_context

log = logging.getLogger(__name__)


class ScpCounts(Protocol):
    """What the SCP reports (metrics.ScpMetrics implements it)."""

    def instance(self, outcome: str, size: int = 0) -> None: ...

    def association(self, result: str, transport: str) -> None: ...


class _NoCounts:
    def instance(self, outcome: str, size: int = 0) -> None:
        pass

    def association(self, result: str, transport: str) -> None:
        pass


@dataclass
class Delivery:
    """What one association brought, per series id: instances kept, and resends of
    instances already kept (which change nothing)."""

    stored: Counter[int] = field(default_factory=Counter)
    duplicates: Counter[int] = field(default_factory=Counter)


class DeliveryTracker:
    """Counts, per association, the instances each series got: to tell at release whether
    an association delivered a whole series (an early completion signal), and which series
    it only sent again (a duplicate delivery, which is logged and noted, never processed)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_assoc: dict[int, Delivery] = {}

    def count(self, assoc: Any, series_id: int, duplicate: bool = False) -> None:
        with self._lock:
            delivery = self._by_assoc.setdefault(id(assoc), Delivery())
            (delivery.duplicates if duplicate else delivery.stored)[series_id] += 1

    def pop(self, assoc: Any) -> Delivery:
        with self._lock:
            return self._by_assoc.pop(id(assoc), Delivery())


def handle_store(event: Any, receiver: Receiver, tracker: DeliveryTracker,
                 counts: ScpCounts | None = None) -> int:
    counts = counts or _NoCounts()
    calling = event.assoc.requestor.ae_title
    spool = getattr(event.request, "_dataset_file", None)
    try:
        context_sop_class = str(event.context.abstract_syntax)
        if isinstance(spool, Spool):
            received = receiver.receive_spooled(spool, context_sop_class, calling)
            size = spool.size
        else:  # an association the spooler was not attached to: pynetdicom's bytes
            data = event.encoded_dataset(include_meta=True)
            received, size = receiver.receive(data, context_sop_class, calling), len(data)
    except Exception as exc:  # every failure becomes a DIMSE status, never success
        counts.instance("refused")
        status = status_for(exc)
        level = logging.ERROR if status == Status.PROCESSING_FAILURE else logging.WARNING
        log.log(level, "instance refused: %s", exc, exc_info=status == Status.PROCESSING_FAILURE,
                extra={"status": f"0x{status:04X}", "calling_ae": calling,
                       "sop_instance_uid": str(event.request.AffectedSOPInstanceUID)})
        return int(status)
    finally:
        if isinstance(spool, Spool):
            spool.discard()  # kept: renamed into place; refused: not kept
    if received.ignored_reason is None:
        tracker.count(event.assoc, received.series_id, received.duplicate)
    outcome = ("duplicate" if received.duplicate
               else "ignored" if received.ignored_reason is not None else "stored")
    counts.instance(outcome, size)
    log.debug("instance stored", extra={"sop_instance_uid": received.sop_instance_uid,
                                        "duplicate": received.duplicate})
    return int(Status.SUCCESS)


def handle_echo(event: Any) -> int:
    return int(Status.ECHO_SUCCESS)


def handle_accepted(event: Any) -> None:
    """One INFO line per accepted association: who called, from where, how many contexts
    (AE titles and addresses only; no patient data is known at this point)."""
    assoc = event.assoc
    log.info("association accepted", extra={
        "calling_ae": str(assoc.requestor.ae_title).strip(),
        "called_ae": str(assoc.acceptor.ae_title).strip(),
        "peer_address": str(assoc.requestor.address),
        "contexts": len(assoc.accepted_contexts)})


def handle_released(event: Any, receiver: Receiver, tracker: DeliveryTracker) -> None:
    delivery = tracker.pop(event.assoc)
    try:
        receiver.mark_released(delivery.stored)
    except Exception:  # only an early-completion hint; idle completion remains
        log.exception("could not record the association release")
    _note_duplicates(event, receiver, delivery)


def handle_closed(event: Any, receiver: Receiver, tracker: DeliveryTracker) -> None:
    delivery = tracker.pop(event.assoc)  # aborted or dropped: no completion hint
    _note_duplicates(event, receiver, delivery)


def _note_duplicates(event: Any, receiver: Receiver, delivery: Delivery) -> None:
    resent_only = Counter({series_id: count for series_id, count in delivery.duplicates.items()
                           if not delivery.stored[series_id]})
    try:
        receiver.note_duplicates(resent_only, str(event.assoc.requestor.ae_title).strip())
    except Exception:  # a note for the admin; the instances are kept
        log.exception("could not record a duplicate delivery")


def build_ae(settings: Settings) -> AE:
    """The SCP's AE: every storage SOP class in every transfer syntax, and Verification."""
    ae = make_ae(settings)
    ae.require_called_aet = True  # also checked by the access policy, which logs it
    for context in AllStoragePresentationContexts:
        if context.abstract_syntax is not None:  # every one of pynetdicom's has its SOP class
            ae.add_supported_context(context.abstract_syntax, ALL_TRANSFER_SYNTAXES)
    ae.add_supported_context(Verification)
    return ae


def scp_handlers(receiver: Receiver, tracker: DeliveryTracker, counts: ScpCounts,
                 transport: str, guard: ConnectionGuard, spooler: Spooler) -> list[Any]:
    def decided(refusal: Refusal | None) -> None:
        counts.association("accepted" if refusal is None else "rejected", transport)

    def requested(event: Any) -> None:
        handle_requested(event, guard.policy, decided)  # the policy of the latest reload

    return [
        (evt.EVT_CONN_OPEN, set_tcp_nodelay),
        (evt.EVT_CONN_OPEN, guard.watch, [transport]),
        (evt.EVT_CONN_OPEN, spooler.attach),
        (evt.EVT_CONN_CLOSE, spooler.discard_unfinished),
        (evt.EVT_REQUESTED, guard.requested, [transport]),
        (evt.EVT_REQUESTED, requested),
        (evt.EVT_ACCEPTED, handle_accepted),
        (evt.EVT_C_STORE, handle_store, [receiver, tracker, counts]),
        (evt.EVT_C_ECHO, handle_echo),
        (evt.EVT_RELEASED, handle_released, [receiver, tracker]),
        (evt.EVT_ABORTED, handle_closed, [receiver, tracker]),
    ]


@dataclass
class ScpListeners:
    """The running SCP: one server per transport (plain and/or TLS) sharing one AE."""

    servers: dict[str, ThreadedAssociationServer]
    guard: ConnectionGuard
    threads: list[threading.Thread] = field(default_factory=list)

    @property
    def server_address(self) -> tuple[str, int]:
        """The first listener's address (the plain port when there is one)."""
        return next(iter(self.servers.values())).server_address  # type: ignore[return-value]

    def port(self, transport: str) -> int:
        return int(self.servers[transport].server_address[1])

    def alive(self) -> bool:
        return all(thread.is_alive() for thread in self.threads)

    def associations(self) -> list[Any]:
        """The associations in progress (their threads)."""
        return [assoc for server in self.servers.values()
                for assoc in server.active_associations]

    def reconfigure(self, settings: Settings) -> None:
        """A reloaded config: the access policy and TLS certificates of the associations
        requested from now on (those in progress keep going)."""
        self.guard.policy = AccessPolicy.from_settings(settings.node)
        server = self.servers.get(TLS)
        if isinstance(server, TLSAssociationServer):
            server.tls_context = server_context(settings.tls)

    def shutdown(self) -> None:
        """No new associations; the ones in progress finish first."""
        for server in self.servers.values():
            server.shutdown()


def start_scp(settings: Settings, receiver: Receiver, counts: ScpCounts | None = None,
              sockets: dict[str, socket.socket] | None = None,
              shared: bool = False) -> ScpListeners:
    """Serve on ``sockets`` (from scp_sockets.bind_listeners; bound here when None).
    ``shared``: other processes accept on the same sockets (node.receive_processes)."""
    tracker = DeliveryTracker()
    policy = AccessPolicy.from_settings(settings.node)
    counts = counts or _NoCounts()
    limits = GuardLimits.from_settings(settings.node)
    guard = ConnectionGuard(limits, policy, counts)
    ae = build_ae(settings)
    ae.maximum_associations = limits.thread_ceiling  # the guard's slots decide
    spooler = Spooler(receiver.store.incoming, receiver.max_bytes)
    tls = settings.tls
    tls_context = server_context(tls) if tls.enabled else None  # file errors before binding
    sockets = sockets if sockets is not None else bind_listeners(settings)
    listeners = ScpListeners({}, guard)
    try:
        for transport, listening in sockets.items():
            handlers = scp_handlers(receiver, tracker, counts, transport, guard, spooler)
            server = _make_server(ae, settings, transport, listening, shared, handlers,
                                  tls_context, counts, guard)
            thread = threading.Thread(target=make_target(server.serve_forever),
                                      name=f"scp-{transport}", daemon=True)
            thread.start()
            # As AE.start_server does: the AE counts associations over its servers, and a
            # server's shutdown() removes itself from this list.
            ae._servers.append(server)
            listeners.servers[transport] = server
            listeners.threads.append(thread)
            log.info("storage SCP listening", extra={
                "ae_title": settings.node.ae_title, "host": settings.node.host,
                "port": server.server_address[1], "transport": transport,
                "mutual_tls": transport == TLS and tls.require_client_certificate,
                "access": "any calling AE title" if policy.anyone else "allowlist"})
    except BaseException:
        listeners.shutdown()
        raise
    return listeners


def _make_server(ae: AE, settings: Settings, transport: str, listening: socket.socket,
                 shared: bool, handlers: list[Any], tls_context: Any, counts: ScpCounts,
                 guard: ConnectionGuard) -> ThreadedAssociationServer:
    address = listening.getsockname()[:2]
    if transport == TLS:
        return ae.make_server(address, evt_handlers=handlers,
                              server_class=TLSAssociationServer, tls_context=tls_context,
                              handshake_timeout=settings.node.handshake_timeout,
                              on_handshake_failure=lambda: counts.association(
                                  "handshake_failed", TLS), guard=guard, transport=TLS,
                              listening=listening, shared=shared)
    return ae.make_server(address, evt_handlers=handlers,
                          server_class=GuardedAssociationServer, guard=guard,
                          transport=PLAIN, listening=listening, shared=shared)
