"""Guarding the SCP's connections before and while they speak DICOM.

pynetdicom reads a PDU in a blocking loop its timers cannot interrupt, and counts every
open connection, agreed or still in its handshake, against one limit: connections that
sent half a request, or agreed an association and went silent, held every slot. Here:

- a connection from an address no allowlist entry can admit is closed at once;
- one address holds at most node.max_associations_per_address connections;
- connections in the handshake (accepted, association request not yet whole) and agreed
  associations have a pool of slots each (node.max_associations), shared fairly across
  addresses (connection_slots.py): when a pool is full, an address holding less than its
  share takes a slot from the address holding the most, whose connection silent longest is
  closed; past that, a connection is closed when accepted or its association rejected
  (transient, local limit exceeded);
- every read has a timeout (node.network_timeout), and the whole association request must
  arrive within node.handshake_timeout of the connection (no dripping one byte at a time);
  pynetdicom ends an association silent for node.network_timeout;
- a PDU longer than the node accepts ends the connection before it is read.

Each drop is logged (throttled per address) and counted.
"""

from __future__ import annotations

import gc
import logging
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from pynetdicom.transport import AssociationSocket, ThreadedAssociationServer

from denoised_node.config.settings import NodeSettings
from denoised_node.daemon.dicom.access import AccessPolicy
from denoised_node.daemon.dicom.connection_slots import Connection, FairPool

log = logging.getLogger(__name__)

# A PDU other than P-DATA (an association request with many contexts and a user identity)
# fits in this; P-DATA-TF PDUs are bounded by what the node advertises.
_SMALLEST_PDU_LIMIT = 2**20
_PDU_SLACK = 1024
_READ_CHUNK = 65536
# Log one line per address and reason at most this often; the rest are counted.
_LOG_EVERY_SECONDS = 10.0
# A-ASSOCIATE-RJ: rejected-transient, service-provider (presentation), local-limit-exceeded.
_NO_SLOT_REJECT = (0x02, 0x03, 0x02)


class DropCounts(Protocol):
    def association(self, result: str, transport: str) -> None: ...


@dataclass(frozen=True)
class GuardLimits:
    read_timeout: float  # seconds a read may wait for the next bytes of a PDU
    request_deadline: float  # seconds from connection to a whole association request
    per_address: int
    max_pdu_bytes: int  # the longest PDU the node reads
    slots: int  # associations; as many again for connections in the handshake

    @classmethod
    def from_settings(cls, node: NodeSettings) -> GuardLimits:
        largest = node.maximum_pdu_size or node.max_instance_mb * 2**20
        return cls(node.network_timeout, node.handshake_timeout,
                   node.max_associations_per_address,
                   max(largest, _SMALLEST_PDU_LIMIT) + _PDU_SLACK, node.max_associations)

    @property
    def thread_ceiling(self) -> int:
        """For pynetdicom's own count of association threads, which would count handshakes
        and closing connections against the associations' slots: high enough never to
        decide; the guard's pools do."""
        return 4 * self.slots


class _DropLog:
    """Drops logged at most once per (address, reason) every _LOG_EVERY_SECONDS, with how
    many were not logged since: a flood of connections must not flood the log."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last: dict[tuple[str, str], float] = {}
        self._unlogged: Counter[tuple[str, str]] = Counter()

    def dropped(self, address: str, kind: str, message: str) -> None:
        key, now = (address, kind), time.monotonic()
        with self._lock:
            if now - self._last.get(key, -_LOG_EVERY_SECONDS) < _LOG_EVERY_SECONDS:
                self._unlogged[key] += 1
                return
            self._last[key] = now
            unlogged = self._unlogged.pop(key, 0)
            if len(self._last) > 4096:  # forget addresses long quiet
                self._last = {k: t for k, t in self._last.items()
                              if now - t < _LOG_EVERY_SECONDS}
        log.warning("connection dropped: %s", message,
                    extra={"peer_address": address, "reason": kind,
                           "similar_drops_not_logged": unlogged})


class ConnectionGuard:
    """The decisions and the bookkeeping for one SCP (all its listeners)."""

    def __init__(self, limits: GuardLimits, policy: AccessPolicy, counts: DropCounts) -> None:
        self.limits = limits
        self.policy = policy
        self.counts = counts
        self._log = _DropLog()
        self._lock = threading.Lock()
        self._handshakes = FairPool(limits.slots)
        self._associations = FairPool(limits.slots)
        self._open: dict[Any, Connection] = {}  # by the peer's (address, port): until it ends

    def watched_connections(self) -> int:
        """Connections accepted, watched (their socket known, so they can be closed to make
        room for another address) and not yet ended."""
        with self._lock:
            return sum(1 for c in self._open.values() if c.close is not None and not c.ended)

    def drop(self, address: str, kind: str, message: str, transport: str) -> None:
        self._log.dropped(address, kind, message)
        self.counts.association(f"dropped_{kind}", transport)

    def admit(self, client_address: Any, transport: str) -> bool:
        """Called by the accept loop: may this connection start? It then holds a handshake
        slot until its association request is whole (requested()) or it ends (ended())."""
        address = str(client_address[0])
        if not self.policy.may_connect_from(address):
            self.drop(address, "address", "no entry of node.allowed_peers (or "
                      "allowed_calling_ae_titles) admits this address", transport)
            return False
        conn = Connection(address)
        with self._lock:
            held = sum(1 for c in self._open.values() if c.address == address and not c.ended)
            taken = self._handshakes.take(conn) if held < self.limits.per_address else None
            if taken is not None and taken.granted:
                self._open[client_address] = conn
        if taken is None:
            self.drop(address, "per_address", f"{held} connections from this address already "
                      "(node.max_associations_per_address)", transport)
            return False
        if not taken.granted:
            self.drop(address, "no_slot", f"all {self.limits.slots} handshake slots held, none "
                      "by an address over its share (node.max_associations)", transport)
            return False
        self._evict(taken.evict, "handshake", transport)
        return True

    def requested(self, event: Any, transport: str) -> None:
        """EVT_REQUESTED handler (before the access policy's): the request is whole; the
        connection gives back its handshake slot for an association's, or is rejected."""
        conn: Connection | None = getattr(event.assoc.dul.socket, "conn", None)
        if conn is None:
            return
        with self._lock:
            self._handshakes.give_back(conn)
            taken = self._associations.take(conn)
        if not taken.granted:
            self.drop(conn.address, "no_slot", f"all {self.limits.slots} association slots "
                      "held, none by an address over its share (node.max_associations); "
                      "association rejected", transport)
            event.assoc.acse.send_reject(*_NO_SLOT_REJECT)
            event.assoc.kill()
            return
        self._evict(taken.evict, "association", transport)

    def _evict(self, conn: Connection | None, pool: str, transport: str) -> None:
        if conn is None or conn.close is None:
            return
        self.drop(conn.address, "fair_share", f"closed to give its {pool} slot to an address "
                  "holding fewer (node.max_associations); this one held the most", transport)
        conn.close()

    def ended(self, client_address: Any) -> None:
        """The connection is closed (its association thread ended, or it never started)."""
        with self._lock:
            conn = self._open.pop(client_address, None)
            if conn is not None:
                conn.ended = True
                self._handshakes.give_back(conn)
                self._associations.give_back(conn)

    def ended_unless_watched(self, client_address: Any) -> None:
        """The accept thread is done: a connection that never reached watch() (a failed
        TLS handshake) has ended; one that did ends with its association thread."""
        with self._lock:
            conn = self._open.get(client_address)
        if conn is not None and conn.close is None:
            self.ended(client_address)

    def watch(self, event: Any, transport: str) -> None:
        """EVT_CONN_OPEN handler: read timeouts, the request deadline and the PDU limit on
        this connection's socket; its slot given back when its association thread ends."""
        assoc = event.assoc
        sock = assoc.dul.socket
        client_address = event.address
        with self._lock:
            conn = self._open.get(client_address)
        if conn is None:  # a server without admission (tests): a connection of its own
            conn = Connection(str(client_address[0]) if client_address else "?")
        sock.__class__ = GuardedSocket
        sock.guard_limits = self.limits
        sock.conn = conn
        sock.agreed = False
        sock.on_drop = lambda kind, message: self.drop(conn.address, kind, message, transport)
        raw = sock.socket
        conn.close = lambda: _shut(raw)
        if conn.ended:  # evicted before its socket was known
            conn.close()
        run = assoc.run

        def run_then_give_back() -> None:
            try:
                run()
            finally:
                self.ended(client_address)

        assoc.run = run_then_give_back


def _shut(raw: socket.socket) -> None:
    """Ends a connection another thread is reading: its read returns, and pynetdicom
    closes the association. The plain socket's shutdown, also under TLS (SSLSocket's own
    would pull the TLS state from under the reading thread)."""
    try:
        socket.socket.shutdown(raw, socket.SHUT_RDWR)
    except OSError:
        pass


class GuardedSocket(AssociationSocket):
    """pynetdicom's socket with bounded reads (installed by ConnectionGuard.watch)."""

    guard_limits: GuardLimits
    conn: Connection
    agreed: bool
    on_drop: Callable[[str, str], None]

    def recv(self, nr_bytes: int) -> bytearray:
        limits = self.guard_limits
        if nr_bytes > limits.max_pdu_bytes:
            self.on_drop("pdu_size", f"a PDU of {nr_bytes} bytes, more than the "
                         f"{limits.max_pdu_bytes} the node reads (node.maximum_pdu_size)")
            return bytearray()  # pynetdicom: shorter than announced, connection closed
        sock = self.socket
        data = bytearray()
        while sock is not None and len(data) < nr_bytes:
            timeout = limits.read_timeout
            if not self.agreed:
                if self.assoc.is_established:
                    self.agreed = True
                else:
                    left = self.conn.opened_at + limits.request_deadline - time.monotonic()
                    if left <= 0:
                        self.on_drop("request_deadline", "no whole association request "
                                     f"within {limits.request_deadline:g} s "
                                     "(node.handshake_timeout)")
                        return data
                    timeout = min(timeout, left)
            sock.settimeout(timeout)
            try:
                chunk = sock.recv(min(_READ_CHUNK, nr_bytes - len(data)))
            except TimeoutError:
                if not self.agreed and time.monotonic() >= (self.conn.opened_at
                                                            + limits.request_deadline):
                    continue  # the deadline, reported above
                self.on_drop("read_timeout", f"silent for {timeout:g} s in the middle of a "
                             "PDU (node.network_timeout)")
                return data
            except OSError:
                return data  # closed under us (ConnectionGuard._evict): pynetdicom ends it
            if not chunk:
                return data
            self.conn.touched()
            data.extend(chunk)
        return data


_GC_PASSES = 60  # pynetdicom's own cadence: 60 passes of serve_forever's 0.5 s poll
# Long enough for an idle process to win the accept, short beside an association's set-up.
_YIELD_PER_ASSOCIATION_SECONDS = 0.001


class GuardedAssociationServer(ThreadedAssociationServer):
    """pynetdicom's threaded server with ConnectionGuard's admission in the accept loop,
    accepting on a socket bound beforehand (scp_sockets.py), perhaps shared with other
    receiving processes (``shared``)."""

    def __init__(self, *args: Any, guard: ConnectionGuard, transport: str,
                 listening: socket.socket, shared: bool = False, **kwargs: Any) -> None:
        self.guard = guard
        self.transport = transport
        self._listening = listening
        self._shared = shared
        self._served = False
        self._passes = 0
        super().__init__(*args, **kwargs)

    def server_bind(self) -> None:
        """Take the socket bound beforehand instead of binding one."""
        assert self.socket is not None
        self.socket.close()
        self.socket = self._listening
        self.server_address = self.socket.getsockname()

    def server_activate(self) -> None:
        pass  # listening already

    def server_close(self) -> None:
        """Close this process's descriptor only. pynetdicom's shutdown(SHUT_RDWR) would end
        the listening socket itself, for every process that shares it."""
        assert self.socket is not None
        self.socket.close()

    def get_request(self) -> tuple[socket.socket, Any]:
        """Every process sharing the socket wakes for a connection and one accepts it (the
        others get EAGAIN and wait again). One already serving associations lets the others
        go first, so that associations arriving together spread over the processes."""
        if self._shared:
            serving = sum(1 for assoc in self.active_associations if assoc.is_alive())
            if serving:
                time.sleep(min(serving, 5) * _YIELD_PER_ASSOCIATION_SECONDS)
        return super().get_request()

    def service_actions(self) -> None:
        """pynetdicom collects garbage (gc.collect, its dead association threads) every 60th
        pass of the accept loop, 30 s, idle or not: most of an idle node's CPU. Collect only
        when connections were served since the last collection."""
        self._passes += 1
        if self._served and self._passes >= _GC_PASSES:
            gc.collect()
            self._served = False
            self._passes = 0

    def process_request(self, request: Any, client_address: Any) -> None:
        self._served = True
        if not self.guard.admit(client_address, self.transport):
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self.guard.ended(client_address)
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.guard.ended_unless_watched(client_address)
