"""Issue 15, item 2: connections that hold an association slot without speaking. Every
accepted socket has a read timeout (and, before an association is agreed, a deadline), a
single address holds at most node.max_associations_per_address slots, an address the
allowlist can never admit is closed at once, and each drop is logged with the address.

Issue 29, item 3: a few addresses that fill every slot (with half-sent requests or with
agreed, silent associations) cannot keep out another: handshakes have slots of their own,
and full slots are shared fairly across addresses."""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from denoised_node.config.settings import Settings
from denoised_node.daemon.dicom.receive import Receiver
from denoised_node.daemon.dicom.scp import ScpListeners, start_scp
from denoised_node.storage.runtime import open_runtime
from tests.fixtures.sockets import closed_quickly

# The first bytes of an A-ASSOCIATE-RQ (PDU type 1, reserved, then a 4-byte length): a
# connection that sends this much and goes silent holds its slot inside a blocking read.
HALF_PDU = b"\x01\x00\x00"
ATTACKER = "127.0.0.2"  # another loopback address: the attacker is not the sender
OTHER_ATTACKER = "127.0.0.3"
WAIT = 15.0  # how long a test waits for a drop before it calls the node locked


@pytest.fixture
def scp_factory(settings_factory) -> Iterator[Callable[..., tuple[Settings, int]]]:  # type: ignore[no-untyped-def]
    servers: list[ScpListeners] = []

    def start(**overrides: object) -> tuple[Settings, int]:
        settings: Settings = settings_factory(node__port=0, **overrides)
        runtime = open_runtime(settings, initialise_empty=True)
        server = start_scp(settings, Receiver(runtime.store, runtime.sessions, settings))
        servers.append(server)
        return settings, server.port("plain")

    start.servers = servers  # type: ignore[attr-defined]
    yield start
    for server in servers:
        server.shutdown()


def _wait_accepted(scp_factory: Any, count: int) -> None:
    """Until the last node started watches ``count`` connections (accepted, their socket
    known): a fixed pause was not always enough on a loaded machine, and a connection not yet
    watched cannot be closed to make room for the sender."""
    guard = scp_factory.servers[-1].guard
    deadline = time.monotonic() + WAIT
    while guard.watched_connections() < count and time.monotonic() < deadline:
        time.sleep(0.02)
    assert guard.watched_connections() >= count


def _connect(port: int, source: str = ATTACKER, first: bytes = HALF_PDU) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=WAIT,
                                    source_address=(source, 0))
    if first:
        sock.sendall(first)
    return sock


def _closed_by_the_node(sock: socket.socket) -> bool:
    """True once the node closed the connection; False if it is still open after WAIT."""
    try:
        while True:
            if not sock.recv(4096):
                return True
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def _association(port: int, source: str) -> Any:
    """An agreed association from ``source`` that then says nothing."""
    ae = AE(ae_title="MOD")
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.network_timeout = 60
    assoc = ae.associate("127.0.0.1", port, ae_title="DENOISER", bind_address=(source, 0))
    assert assoc.is_established
    return assoc


def _echo(port: int) -> int | None:
    ae = AE(ae_title="MOD")
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.network_timeout = WAIT  # a loaded CI machine can be slow to answer
    assoc = ae.associate("127.0.0.1", port, ae_title="DENOISER")
    if not assoc.is_established:
        return None
    status = assoc.send_c_echo()
    assoc.release()
    return int(status.Status) if "Status" in status else None


def test_a_connection_silent_inside_a_pdu_is_dropped_and_logged(scp_factory, caplog) -> None:  # type: ignore[no-untyped-def]
    _, port = scp_factory(node__network_timeout=0.5, node__handshake_timeout=30)
    with caplog.at_level(logging.WARNING, logger="denoised_node"), _connect(port) as sock:
        assert _closed_by_the_node(sock)
    assert any(getattr(r, "peer_address", None) == ATTACKER and "dropped" in r.getMessage()
               for r in caplog.records)


def test_a_connection_dripping_bytes_is_dropped_at_the_association_deadline(scp_factory) -> None:  # type: ignore[no-untyped-def]
    """A header announcing a 64 KiB A-ASSOCIATE-RQ, then one byte every 0.2 s: each read
    ends under network_timeout, the deadline to finish the request (handshake_timeout, not
    the ACSE timeout) still ends the connection."""
    _, port = scp_factory(node__network_timeout=1, node__handshake_timeout=1,
                          node__acse_timeout=60)
    with _connect(port, first=b"\x01\x00\x00\x01\x00\x00") as sock:
        sock.settimeout(0.2)
        started = time.monotonic()
        closed = False
        while not closed and time.monotonic() - started < WAIT:
            try:
                closed = not sock.recv(1)
            except TimeoutError:
                try:
                    sock.sendall(b"\x00")
                except OSError:
                    closed = True
            except OSError:
                closed = True
        assert closed


def test_silent_connections_from_one_address_cannot_lock_out_the_others(  # type: ignore[no-untyped-def]
        scp_factory, caplog) -> None:
    _, port = scp_factory(node__max_associations=4, node__max_associations_per_address=2,
                          node__network_timeout=60, node__handshake_timeout=60)
    with caplog.at_level(logging.WARNING, logger="denoised_node"):
        attackers = [_connect(port) for _ in range(6)]
        try:
            time.sleep(0.3)  # let the node accept them all
            assert _echo(port) == 0  # a sender from another address still gets in
            dropped = [sock for sock in attackers if closed_quickly(sock)]
            assert len(dropped) == 4  # past the per-address limit: closed at once
        finally:
            for sock in attackers:
                sock.close()
    assert any(getattr(r, "peer_address", None) == ATTACKER
               and "max_associations_per_address" in r.getMessage() for r in caplog.records)


def test_an_address_the_allowlist_never_admits_is_closed_at_once(scp_factory, caplog) -> None:  # type: ignore[no-untyped-def]
    _, port = scp_factory(node__allowed_peers='[{ae_title = "MOD", hosts = ["127.0.0.1"]}]',
                          node__network_timeout=60, node__handshake_timeout=60)
    with caplog.at_level(logging.WARNING, logger="denoised_node"), _connect(port) as sock:
        assert _closed_by_the_node(sock)
    assert _echo(port) == 0
    assert any(getattr(r, "peer_address", None) == ATTACKER and "allowed_peers" in r.getMessage()
               for r in caplog.records)


def test_half_sent_requests_from_two_addresses_cannot_lock_out_a_third(  # type: ignore[no-untyped-def]
        scp_factory, caplog) -> None:
    """Each attacker holds max_associations_per_address connections in the handshake, and
    together they hold max_associations: before, a sender from a third address was
    rejected (local limit exceeded) until they went away."""
    _, port = scp_factory(node__max_associations=4, node__max_associations_per_address=2,
                          node__network_timeout=60, node__handshake_timeout=60)
    with caplog.at_level(logging.WARNING, logger="denoised_node"):
        attackers = [_connect(port, source) for source in (ATTACKER, OTHER_ATTACKER)
                     for _ in range(2)]
        try:
            _wait_accepted(scp_factory, 4)
            assert [_echo(port) for _ in range(3)] == [0, 0, 0]
            assert sum(closed_quickly(sock) for sock in attackers) == 1  # made room
        finally:
            for sock in attackers:
                sock.close()
    assert any(getattr(r, "reason", None) == "fair_share" for r in caplog.records)


def test_silent_associations_from_two_addresses_cannot_lock_out_a_third(  # type: ignore[no-untyped-def]
        scp_factory, caplog) -> None:
    """Agreed associations that say nothing, max_associations of them from two addresses:
    the one silent longest of the address holding the most is closed for the newcomer."""
    _, port = scp_factory(node__max_associations=4, node__max_associations_per_address=2,
                          node__network_timeout=60, node__handshake_timeout=60)
    with caplog.at_level(logging.WARNING, logger="denoised_node"):
        silent = [_association(port, source) for source in (ATTACKER, OTHER_ATTACKER)
                  for _ in range(2)]
        try:
            assert [_echo(port) for _ in range(3)] == [0, 0, 0]
            deadline = time.monotonic() + WAIT
            while all(assoc.is_established for assoc in silent) and time.monotonic() < deadline:
                time.sleep(0.05)
            assert sum(not assoc.is_established for assoc in silent) == 1
        finally:
            for assoc in silent:
                assoc.abort()
    assert any(getattr(r, "reason", None) == "fair_share" for r in caplog.records)


def test_a_full_node_rejects_an_address_holding_its_share(scp_factory) -> None:  # type: ignore[no-untyped-def]
    """Fair, not first come: an address that already holds as many as the others is
    rejected (transient, local limit exceeded) rather than closing another's."""
    _, port = scp_factory(node__max_associations=2, node__max_associations_per_address=2,
                          node__network_timeout=60, node__handshake_timeout=60)
    held = [_association(port, ATTACKER), _association(port, OTHER_ATTACKER)]
    try:
        ae = AE(ae_title="MOD")
        ae.add_requested_context(Verification)
        ae.acse_timeout = ae.network_timeout = 5
        third = ae.associate("127.0.0.1", port, ae_title="DENOISER",
                             bind_address=(ATTACKER, 0))
        assert third.is_rejected
        assert all(assoc.is_established for assoc in held)
    finally:
        for assoc in held:
            assoc.abort()
