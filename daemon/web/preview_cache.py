"""The series page's previews, made off the request threads and kept.

A preview reads a stack's files and runs the safety gate's figures (numpy, and torch once
imported): seconds of a core. Made on the HTTP request threads, a dozen page loads held
every thread and /healthz waited behind them (issue 29, item 9). So one background thread
makes them, one at a time, from a short queue; a request waits for its preview only while it
holds one of MAX_WAITERS places, else it answers at once that the pictures are being made
(the page reloads, a picture answers 503 with Retry-After). However many previews are asked
for, at most MAX_WAITERS request threads wait: the probes always find a free one.

The key is the stack as the job has it, clamped to the stacks the series holds (known after
its first preview, and until then one preview of the job is made at a time), so a `stack`
value of any size cannot make a preview of its own.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections import OrderedDict
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout

from denoised_node.config.settings import GateSettings
from denoised_node.daemon.web.previews import Preview, PreviewInput, make_preview

log = logging.getLogger(__name__)

MAX_WAITERS = 2  # request threads that may wait for a preview at once (of the 8)
MAX_QUEUED = 8  # previews waiting to be made; past it a request is told to come back
WAIT_SECONDS = 30.0  # how long a waiting request waits before answering "being made"
RETRY_SECONDS = 3  # what "come back" says
PENDING = Preview(pending=True, notes=(("The pictures are being made; this page reloads in "
                                        f"{RETRY_SECONDS} s."),))

_Key = tuple[int, str, int | None]  # job, version, stack (None: the series' stacks unknown)


class PreviewCache:
    def __init__(self, gate: GateSettings, size: int = 16) -> None:
        self.gate = gate
        self.size = size
        self._entries: OrderedDict[tuple[int, str, int], Preview] = OrderedDict()
        self._stack_counts: OrderedDict[tuple[int, str], int] = OrderedDict()
        self._in_flight: dict[_Key, Future[Preview]] = {}
        self._lock = threading.Lock()
        self._waiters = threading.BoundedSemaphore(MAX_WAITERS)
        self._queue: queue.Queue[tuple[_Key, PreviewInput, int, Future[Preview]]] = \
            queue.Queue(MAX_QUEUED)
        self._thread: threading.Thread | None = None

    def get(self, source: PreviewInput, stack_index: int) -> Preview:
        """The preview of ``stack_index`` (clamped), or PENDING while it is being made."""
        for _ in range(2):  # a second round when the first made another stack of the job
            _key, found, future = self._lookup(source, stack_index)
            if found is not None:
                return found
            if future is None or not self._waiters.acquire(blocking=False):
                return PENDING
            try:
                future.result(timeout=WAIT_SECONDS)
            except FutureTimeout:
                return PENDING
            finally:
                self._waiters.release()
        return PENDING

    def _lookup(self, source: PreviewInput, stack_index: int
                ) -> tuple[_Key, Preview | None, Future[Preview] | None]:
        with self._lock:
            count = self._stack_counts.get((source.job_id, source.version))
            index = None if count is None else min(max(stack_index, 0), count - 1)
            if index is not None and (entry := self._entries.get(
                    (source.job_id, source.version, index))) is not None:
                self._entries.move_to_end((source.job_id, source.version, index))
                return (source.job_id, source.version, index), entry, None
            key: _Key = (source.job_id, source.version, index)
            future = self._in_flight.get(key)
            if future is None:
                future = Future()
                try:
                    self._queue.put_nowait((key, source, max(stack_index, 0)
                                            if index is None else index, future))
                except queue.Full:
                    return key, None, None
                self._in_flight[key] = future
                self._start()
            return key, None, future

    def _start(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._run, name="previews", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while True:
            key, source, index, future = self._queue.get()
            preview = PENDING
            try:
                preview = make_preview(source, index, self.gate)
                with self._lock:
                    self._keep(source, preview)
            except Exception as exc:  # a page says so; it never fails for this
                log.exception("preview failed", extra={"job_id": source.job_id})
                preview = Preview(notes=(f"The stored files could not be read: "
                                         f"{type(exc).__name__}: {exc}".splitlines()[0],))
            finally:  # not kept when it failed: the next request tries again
                with self._lock:
                    del self._in_flight[key]
                future.set_result(preview)

    def _keep(self, source: PreviewInput, preview: Preview) -> None:
        job = (source.job_id, source.version)
        self._stack_counts[job] = max(1, len(preview.stacks))
        self._stack_counts.move_to_end(job)
        while len(self._stack_counts) > 16 * self.size:
            self._stack_counts.popitem(last=False)
        self._entries[(*job, preview.stack)] = preview
        self._entries.move_to_end((*job, preview.stack))
        while len(self._entries) > self.size:
            self._entries.popitem(last=False)
