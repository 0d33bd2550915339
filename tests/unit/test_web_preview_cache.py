"""Previews are made off the HTTP request threads, and their key is clamped (issue 29, item
9: twelve preview requests held every request thread and /healthz waited 28 s; a `stack`
value of any size made a preview of its own)."""

from __future__ import annotations

import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from denoised_node.config.settings import GateSettings, HttpSettings
from denoised_node.daemon.web.endpoint import StatusServer
from denoised_node.daemon.web.pages import PreviewCache
from denoised_node.daemon.web.previews import Preview, PreviewInput
from denoised_node.daemon.web.probes import Readiness
from denoised_node.daemon.web.request import Request, Response

SOURCE = PreviewInput(7, "v1", (Path("/nowhere/a.dcm"),), None)


class _SlowPreviews:
    """make_preview stand-in: counts its calls and, when told to, waits for ``go``."""

    def __init__(self, block: bool) -> None:
        self.calls: list[int] = []
        self.started = threading.Event()
        self.go = threading.Event()
        self.block = block

    def __call__(self, source: PreviewInput, stack_index: int, gate: GateSettings) -> Preview:
        self.calls.append(stack_index)
        self.started.set()
        if self.block:
            self.go.wait(60)
        return Preview(stacks=("one stack",), stack=0, depth=1, images={"before": b"png"})


@pytest.fixture
def slow(monkeypatch: pytest.MonkeyPatch) -> _SlowPreviews:
    fake = _SlowPreviews(block=True)
    monkeypatch.setattr(sys.modules[PreviewCache.__module__], "make_preview", fake)
    return fake


class _PreviewPages:
    def __init__(self, cache: PreviewCache) -> None:
        self.cache = cache

    def handle(self, request: Request) -> Response:
        preview = self.cache.get(SOURCE, int(request.arg("stack") or 0))
        return Response.text(503 if getattr(preview, "pending", False) else 200, "preview")


def _get(port: int, path: str, timeout: float) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout) as answer:
            return int(answer.status)
    except urllib.error.HTTPError as exc:
        return exc.code


def test_the_probes_answer_while_previews_are_being_made(slow: _SlowPreviews) -> None:
    server = StatusServer(HttpSettings(port=0), CollectorRegistry(), Readiness([]),
                          _PreviewPages(PreviewCache(GateSettings()))).start()
    statuses: list[int] = []
    askers = [threading.Thread(target=lambda n=n: statuses.append(
        _get(server.port, f"/series?stack={n}", 90))) for n in range(12)]
    try:
        for asker in askers:
            asker.start()
        assert slow.started.wait(30)
        started = time.monotonic()
        assert _get(server.port, "/healthz", 10) == 200  # before: every request thread held
        assert time.monotonic() - started < 10
    finally:
        slow.go.set()
        for asker in askers:
            asker.join(90)
        server.shutdown()
    assert len(statuses) == 12 and set(statuses) <= {200, 503}


def test_the_stack_in_the_key_is_clamped_to_the_series_stacks(
        monkeypatch: pytest.MonkeyPatch) -> None:
    fake = _SlowPreviews(block=False)
    monkeypatch.setattr(sys.modules[PreviewCache.__module__], "make_preview", fake)
    cache = PreviewCache(GateSettings())
    for stack in (0, 7, 10**9, -3, 0):
        assert cache.get(SOURCE, stack).images == {"before": b"png"}
    assert len(fake.calls) == 1  # before: one preview made per distinct stack value
