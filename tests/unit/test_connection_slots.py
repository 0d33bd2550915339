"""The fair sharing of connection slots across addresses (daemon/dicom/connection_slots.py)."""

from __future__ import annotations

from denoised_node.daemon.dicom.connection_slots import Connection, FairPool


def _conn(address: str, last_active: float, closed: list[Connection]) -> Connection:
    conn = Connection(address, last_active=last_active)
    conn.close = lambda: closed.append(conn)
    return conn


def test_a_free_slot_is_taken_by_anyone() -> None:
    pool = FairPool(2)
    assert pool.take(Connection("a")).granted
    assert pool.take(Connection("a")).granted
    assert len(pool) == 2


def test_a_newcomer_takes_the_slot_silent_longest_of_the_heaviest_address() -> None:
    closed: list[Connection] = []
    pool = FairPool(4)
    a_old, a_new = _conn("a", 1.0, closed), _conn("a", 5.0, closed)
    b1, b2 = _conn("b", 0.5, closed), _conn("b", 6.0, closed)
    c = _conn("c", 2.0, closed)
    for conn in (a_old, a_new, b1):
        assert pool.take(conn).granted
    assert pool.take(c).granted  # free
    taken = pool.take(b2)  # full: b holds 1, a holds 2 -> 2 < 1 + 2: refused
    assert not taken.granted and taken.evict is None
    newcomer = Connection("d")
    taken = pool.take(newcomer)
    assert taken.granted and taken.evict is a_old and a_old.ended
    assert pool.held_by("a") == 1 and pool.held_by("d") == 1


def test_slots_given_back_or_ended_are_free_again() -> None:
    pool = FairPool(2)
    first, second = Connection("a"), Connection("a")
    pool.take(first)
    pool.take(second)
    pool.give_back(first)
    second.ended = True
    assert len(pool) == 0


def test_a_connection_not_yet_closable_is_never_taken_from() -> None:
    """Between its accept and its socket being known, a connection cannot be closed."""
    pool = FairPool(2)
    pool.take(Connection("a"))
    pool.take(Connection("a"))
    assert not pool.take(Connection("b")).granted
