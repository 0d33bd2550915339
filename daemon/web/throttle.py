"""Failed logins per client address: past ``limit`` failures within ``window`` seconds an
address is answered 429 (with the seconds until its oldest failure expires) before any
password check runs, so a flood of wrong passwords cannot keep a core busy with bcrypt.

Only failures count, and a password the node has already verified is checked before the
throttle (passwords.StoredPassword remembers it): the right password is never slowed, even
from an address that is throttled. The table of addresses is bounded; the address seen
longest ago is forgotten first.
"""

from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable

MAX_ADDRESSES = 4096  # addresses remembered at once (a few hundred KiB at most)


class FailureThrottle:
    def __init__(self, limit: int, window: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.limit = limit
        self.window = window
        self._clock = clock
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()
        self._lock = threading.Lock()

    def retry_after(self, address: str) -> int:
        """Seconds ``address`` must wait before its next attempt is checked; 0: go ahead."""
        now = self._clock()
        with self._lock:
            times = self._recent(address, now)
            if times is None or len(times) < self.limit:
                return 0
            return max(1, math.ceil(times[0] + self.window - now))

    def failed(self, address: str) -> None:
        now = self._clock()
        with self._lock:
            times = self._recent(address, now)
            if times is None:
                times = self._failures[address] = deque(maxlen=self.limit)
                while len(self._failures) > MAX_ADDRESSES:
                    self._failures.popitem(last=False)
            times.append(now)
            self._failures.move_to_end(address)

    def _recent(self, address: str, now: float) -> deque[float] | None:
        times = self._failures.get(address)
        if times is None:
            return None
        while times and times[0] <= now - self.window:
            times.popleft()
        if not times:
            del self._failures[address]
            return None
        return times
