"""Guarding the SCP's connections before and while they speak DICOM.

pynetdicom reads a PDU in a blocking loop its timers cannot interrupt, and counts every
open connection against node.max_associations: a connection that sends the first bytes of
a PDU and goes silent held a slot forever, and that many of them stopped all receiving,
from addresses the allowlist would have refused. Here:

- a connection from an address no allowlist entry can admit is closed at once;
- one address holds at most node.max_associations_per_address connections;
- every read has a timeout (node.network_timeout), and until an association is agreed the
  whole request must arrive within node.acse_timeout (no dripping one byte at a time);
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
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from pynetdicom.transport import AssociationSocket, ThreadedAssociationServer

from denoised_node.config.settings import NodeSettings
from denoised_node.daemon.access import AccessPolicy

log = logging.getLogger(__name__)

# A PDU other than P-DATA (an association request with many contexts and a user identity)
# fits in this; P-DATA-TF PDUs are bounded by what the node advertises.
_SMALLEST_PDU_LIMIT = 2**20
_PDU_SLACK = 1024
_READ_CHUNK = 65536
# Log one line per address and reason at most this often; the rest are counted.
_LOG_EVERY_SECONDS = 10.0


class DropCounts(Protocol):
    def association(self, result: str, transport: str) -> None: ...


@dataclass(frozen=True)
class GuardLimits:
    read_timeout: float  # seconds a read may wait for the next bytes of a PDU
    request_deadline: float  # seconds from connection to a whole association request
    per_address: int
    max_pdu_bytes: int  # the longest PDU the node reads

    @classmethod
    def from_settings(cls, node: NodeSettings) -> GuardLimits:
        largest = node.maximum_pdu_size or node.max_instance_mb * 2**20
        return cls(node.network_timeout, node.acse_timeout, node.max_associations_per_address,
                   max(largest, _SMALLEST_PDU_LIMIT) + _PDU_SLACK)


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
        self._starting: Counter[str] = Counter()  # accepted, association thread not yet up

    def drop(self, address: str, kind: str, message: str, transport: str) -> None:
        self._log.dropped(address, kind, message)
        self.counts.association(f"dropped_{kind}", transport)

    def admit(self, address: str, live: Sequence[Any], transport: str) -> bool:
        """Called by the accept loop: may this connection start? ``live`` are the running
        association threads (any listener)."""
        if not self.policy.may_connect_from(address):
            self.drop(address, "address", "no entry of node.allowed_peers (or "
                      "allowed_calling_ae_titles) admits this address", transport)
            return False
        with self._lock:
            held = self._starting[address] + sum(
                1 for assoc in live if assoc.is_alive() and assoc.requestor.address == address)
            if held >= self.limits.per_address:
                refused = True
            else:
                refused = False
                self._starting[address] += 1
        if refused:
            self.drop(address, "per_address", f"{held} connections from this address already "
                      "(node.max_associations_per_address)", transport)
            return False
        return True

    def started(self, address: str) -> None:
        """The connection's association thread runs (or the connection ended first)."""
        with self._lock:
            self._starting[address] -= 1
            if self._starting[address] <= 0:
                del self._starting[address]

    def watch(self, event: Any, transport: str) -> None:
        """EVT_CONN_OPEN handler: read timeouts, the request deadline and the PDU limit on
        this connection's socket."""
        sock = event.assoc.dul.socket
        address = str(event.address[0]) if event.address else "?"
        sock.__class__ = GuardedSocket
        sock.guard_limits = self.limits
        sock.opened_at = time.monotonic()
        sock.agreed = False
        sock.on_drop = lambda kind, message: self.drop(address, kind, message, transport)


class GuardedSocket(AssociationSocket):
    """pynetdicom's socket with bounded reads (installed by ConnectionGuard.watch)."""

    guard_limits: GuardLimits
    opened_at: float
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
                    left = self.opened_at + limits.request_deadline - time.monotonic()
                    if left <= 0:
                        self.on_drop("request_deadline", "no whole association request "
                                     f"within {limits.request_deadline:g} s (node.acse_timeout)")
                        return data
                    timeout = min(timeout, left)
            sock.settimeout(timeout)
            try:
                chunk = sock.recv(min(_READ_CHUNK, nr_bytes - len(data)))
            except TimeoutError:
                if not self.agreed and time.monotonic() >= (self.opened_at
                                                            + limits.request_deadline):
                    continue  # the deadline, reported above
                self.on_drop("read_timeout", f"silent for {timeout:g} s in the middle of a "
                             "PDU (node.network_timeout)")
                return data
            if not chunk:
                return data
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
        self.socket.close()
        self.socket = self._listening
        self.server_address = self.socket.getsockname()

    def server_activate(self) -> None:
        pass  # listening already

    def server_close(self) -> None:
        """Close this process's descriptor only. pynetdicom's shutdown(SHUT_RDWR) would end
        the listening socket itself, for every process that shares it."""
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
        address = str(client_address[0])
        live = [a for a in self.ae.active_associations if a.is_acceptor]
        if not self.guard.admit(address, live, self.transport):
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self.guard.started(address)
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.guard.started(str(client_address[0]))
