"""daemon/dicom/receiver_events.py: receiving processes' counts and pokes reach serve; a full
pipe drops an event, never blocks a receiver."""

from __future__ import annotations

import os
import time

from denoised_node.daemon.dicom.receiver_events import EventReader, EventWriter


class _Counts:
    def __init__(self) -> None:
        self.instances: list[tuple[str, int]] = []
        self.associations: list[tuple[str, str]] = []

    def instance(self, outcome: str, size: int = 0) -> None:
        self.instances.append((outcome, size))

    def association(self, result: str, transport: str) -> None:
        self.associations.append((result, transport))


def _wait(condition, seconds: float = 5.0) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.01)
    return False


def test_counts_and_pokes_cross_the_pipe() -> None:
    counts, pokes = _Counts(), []
    reader = EventReader(counts, lambda: pokes.append(1)).start()
    try:
        writer = EventWriter(os.dup(reader.write_fd))
        writer.association("accepted", "plain")
        writer.instance("stored", 131072)
        writer.instance("duplicate", 0)
        writer.activity()
        assert _wait(lambda: len(counts.instances) == 2 and pokes)
        assert counts.instances == [("stored", 131072), ("duplicate", 0)]
        assert counts.associations == [("accepted", "plain")]
    finally:
        reader.stop()


def test_a_garbled_line_is_skipped_not_fatal() -> None:
    counts = _Counts()
    reader = EventReader(counts, lambda: None)
    assert reader.apply([b"i stored", b"x", b"i stored 10"])
    assert counts.instances == [("stored", 10)]
    assert not reader.apply([b"q"])


def test_a_full_pipe_drops_events_instead_of_blocking() -> None:
    read_fd, write_fd = os.pipe()
    try:
        writer = EventWriter(write_fd)
        started = time.monotonic()
        for _ in range(20000):  # far more than a pipe holds, nobody reading
            writer.instance("stored", 131072)
        assert time.monotonic() - started < 5
        assert writer.dropped > 0
    finally:
        os.close(read_fd)
        os.close(write_fd)
