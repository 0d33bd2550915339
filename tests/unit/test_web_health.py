"""The overview's figures without a browser: slow checks, the GPU and model rows, stage times
from job events, the last hour."""

from __future__ import annotations

import json
import subprocess
import threading
import time
from datetime import UTC, datetime, timedelta
from typing import Any

from denoised_node.daemon.jobs.queries import EventRow
from denoised_node.daemon.web import health_rows
from denoised_node.daemon.web.activity import Spread, stage_seconds
from denoised_node.daemon.web.health_rows import SlowChecks, gpu, model_file
from denoised_node.daemon.web.probes import CheckResult
from denoised_node.model.card import read_card, resolve_checkpoint
from denoised_node.storage.queue import JobState, kind_of_move

T0 = datetime(2024, 3, 15, 10, 0, tzinfo=UTC)


def _event(seconds: float, from_state: str | None, to_state: str) -> EventRow:
    kind = kind_of_move(None if from_state is None else JobState(from_state), JobState(to_state))
    return EventRow(T0 + timedelta(seconds=seconds), from_state, to_state, "w", None, kind)


def test_stage_seconds_follow_the_metrics_definitions() -> None:
    events = [_event(10, None, "queued"), _event(12, "queued", "processing"),
              _event(14, "processing", "queued"), _event(20, "queued", "processing"),
              _event(50, "processing", "processed"), _event(51, "processed", "sending"),
              _event(55, "sending", "done")]
    assert stage_seconds(events, T0) == {"receive_to_complete": 10, "queue_wait": 6,
                                         "inference": 30, "send": 4, "end_to_end": 55}


def test_a_replay_starts_a_new_run_without_an_end_to_end_figure() -> None:
    events = [_event(10, None, "queued"), _event(11, "queued", "processing"),
              _event(20, "processing", "failed"), _event(3600, "failed", "queued"),
              _event(3602, "queued", "processing"), _event(3610, "processing", "processed"),
              _event(3611, "processed", "sending"), _event(3612, "sending", "done")]
    assert stage_seconds(events, T0) == {"receive_to_complete": 10, "queue_wait": 2,
                                         "inference": 8, "send": 1}


def test_spread_uses_nearest_ranks() -> None:
    spread = Spread.of([float(v) for v in range(1, 11)])
    assert (spread.count, spread.median, spread.p90, spread.worst) == (10, 5.0, 9.0, 10.0)
    assert Spread.of([3.0]) == Spread(1, 3.0, 3.0, 3.0)


def test_slow_checks_run_in_the_background_and_are_kept() -> None:
    calls = {"n": 0}
    gate = threading.Event()

    def echo() -> CheckResult:
        calls["n"] += 1
        gate.wait(10)
        return CheckResult(True, f"answered {calls['n']}")

    def broken() -> CheckResult:
        raise OSError("no route to host")

    checks = SlowChecks([("echo", echo), ("broken", broken)], refresh=60)
    first = checks.rows()
    assert [(r.name, r.ok, r.detail) for r in first] == [("echo", None, "checking..."),
                                                          ("broken", None, "checking...")]
    checks.rows()  # a second page while the first run is going: no second run
    gate.set()
    rows = checks.rows(wait=5)
    deadline = time.monotonic() + 5
    while rows[1].ok is None and time.monotonic() < deadline:
        time.sleep(0.05)
        rows = checks.rows()
    assert (rows[0].ok, rows[0].detail) == (True, "answered 1")
    assert (rows[1].ok, rows[1].detail) == (False, "OSError: no route to host")
    assert rows[0].age_seconds is not None and calls["n"] == 1


def test_gpu_row_from_nvidia_smi(monkeypatch: Any) -> None:
    assert gpu("cpu").detail == 'not used (model.device = "cpu")'
    monkeypatch.setattr(health_rows.shutil, "which", lambda _: None)
    assert gpu("auto").ok and "workers run on the CPU" in gpu("auto").detail
    assert not gpu("cuda:0").ok and "nvidia-smi not found" in gpu("cuda:0").detail
    monkeypatch.setattr(health_rows.shutil, "which", lambda _: "/usr/bin/nvidia-smi")

    def smi(*args: Any, **kwargs: Any) -> subprocess.CompletedProcess[str]:
        return subprocess.CompletedProcess(args, 0, "NVIDIA H100 80GB HBM3, 3174, 81559, 12\n", "")

    assert gpu("auto", run=smi) == CheckResult(
        True, "NVIDIA H100 80GB HBM3: 3.1 of 79.6 GiB used, 12 % busy")

    def failing(*args: Any, **kwargs: Any) -> subprocess.CompletedProcess[str]:
        return subprocess.CompletedProcess(args, 9, "", "NVIDIA-SMI has failed\n")

    assert gpu("auto", run=failing) == CheckResult(
        False, "nvidia-smi failed: NVIDIA-SMI has failed"
    )


def test_model_row_reads_the_card_without_loading_the_weights() -> None:
    path = resolve_checkpoint("default")
    card = json.loads(path.with_suffix(".json").read_text())["card"]
    result = model_file("default")
    identity = f"dn-{card['name']}-{card['version']}-{card['sha256'][:12]}"
    assert (
        result.ok and identity in result.detail and "sha256 matches default.json" in result.detail
    )
    assert read_card(path).sha256 == card["sha256"]
    assert not model_file("/nonexistent/model.safetensors").ok


def test_model_row_flags_an_altered_file(tmp_path: Any) -> None:
    source = resolve_checkpoint("default")
    copy = tmp_path / "model.safetensors"
    data = bytearray(source.read_bytes())
    data[-1] ^= 0xFF
    copy.write_bytes(bytes(data))
    (tmp_path / "model.json").write_text(source.with_suffix(".json").read_text())
    result = model_file(str(copy))
    assert not result.ok and "the file was altered" in result.detail
