"""Slots for the SCP's connections, shared fairly across the addresses that hold them.

A pool has a fixed number of slots. While one is free, anyone takes it. When all are held,
a newcomer may still take one from the address holding the most, if that address holds at
least two more than the newcomer would (max-min fairness): its connection silent longest
is closed to make room. So a few addresses that fill the pool (with half-sent requests or
with silent associations) cannot keep out another address; only as many misbehaving
addresses as there are slots could.

The SCP keeps two pools (connection_guard.py): connections still in the association
handshake, and agreed associations, so that handshakes never take an association's slot.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass(eq=False)
class Connection:
    """One accepted connection, from its accept to its end."""

    address: str
    opened_at: float = field(default_factory=time.monotonic)
    last_active: float = field(default_factory=time.monotonic)  # the last bytes read
    # Ends the connection from another thread; None until its socket is known.
    close: Callable[[], None] | None = None
    ended: bool = False

    def touched(self) -> None:
        self.last_active = time.monotonic()


@dataclass(frozen=True)
class Taken:
    """The outcome of FairPool.take: granted or not, and the connection (if any) that must
    be closed to make room."""

    granted: bool
    evict: Connection | None = None


class FairPool:
    """``capacity`` slots shared by max-min fairness across addresses. Not thread-safe:
    the caller holds a lock."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._held: list[Connection] = []

    def __len__(self) -> int:
        self._prune()
        return len(self._held)

    def held_by(self, address: str) -> int:
        self._prune()
        return sum(1 for conn in self._held if conn.address == address)

    def take(self, conn: Connection) -> Taken:
        self._prune()
        if len(self._held) < self.capacity:
            self._held.append(conn)
            return Taken(True)
        counts = Counter(held.address for held in self._held)
        evictable = [held for held in self._held if held.close is not None]
        if not evictable:
            return Taken(False)
        # The heaviest address; among equals, the one with the connection silent longest.
        victim = max(evictable, key=lambda held: (counts[held.address], -held.last_active))
        if counts[victim.address] < counts[conn.address] + 2:
            return Taken(False)
        self._held.remove(victim)
        victim.ended = True
        self._held.append(conn)
        return Taken(True, victim)

    def give_back(self, conn: Connection) -> None:
        if conn in self._held:
            self._held.remove(conn)

    def _prune(self) -> None:
        self._held = [conn for conn in self._held if not conn.ended]
