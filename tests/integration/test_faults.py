"""Fault injection against real peers: the node is killed with SIGKILL while it receives,
denoises and sends; the PACS goes down; bad data arrives. Whatever happens, every series
that was acknowledged ends up in Orthanc exactly once, with every instance.

Each scenario records (series sent, delivered, duplicates, lost) into FAULT_TABLE, which the
last test prints (docs/reliability.md holds the table from a run).
"""

from __future__ import annotations

import json
import os
import random
import signal
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.node import NODE_AET, Node, node_config, start_node, wait_gone
from tests.integration.peers import ManagedProcess, Orthanc, echoscu, storescu
from tests.integration.peers.pynetdicom_scu import send_files
from tests.integration.peers.tools import wait_until

pytestmark = pytest.mark.slow

FAULT_TABLE: list[dict[str, Any]] = []
# Fault tests care about the queue, not the image: small fast series, gate off.
FAST = {"gate": {"enabled": False}, "worker": {"count": 1, "poll_seconds": 0.2,
                                               "lease_seconds": 6}}
DERIVED = "DENOISED"


class NodeHarness:
    """Starts, kills and restarts `denoised-node serve` on one config and data dir."""

    def __init__(self, workdir: Path, port: int, orthanc: Orthanc, **sections: Any) -> None:
        merged: dict[str, dict[str, Any]] = {k: dict(v) for k, v in FAST.items()}
        for name, values in sections.items():
            merged.setdefault(name, {}).update(values)
        self.workdir = workdir
        self.port = port
        self.config = node_config(workdir, port, orthanc, **merged)
        self.database = workdir / "data" / "node.db"
        self.node: Node | None = None
        self.starts = 0

    def start(self) -> Node:
        self.starts += 1
        self.node = start_node(self.config, self.port, self.workdir / f"node{self.starts}.log")
        return self.node

    def pids(self) -> tuple[int, list[int]]:
        assert self.node is not None
        serve = self.node.process.pid
        children = Path(f"/proc/{serve}/task/{serve}/children")
        workers = [int(p) for p in children.read_text().split()] if children.exists() else []
        return serve, workers

    def kill(self, what: str) -> None:
        """SIGKILL: "all" (power-cut-like: serve and its workers), "serve" (workers get
        SIGTERM from the kernel and finish their job), or "worker" (serve restarts it)."""
        assert self.node is not None
        serve, workers = self.pids()
        if what == "worker":
            for pid in workers:
                os.kill(pid, signal.SIGKILL)
            return
        targets = [serve] + (workers if what == "all" else [])
        for pid in targets:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.node.process.popen.wait(30)
        if what == "all":
            for pid in workers:
                wait_gone(pid)

    def job_states(self) -> list[str]:
        if not self.database.exists():
            return []
        with sqlite3.connect(f"file:{self.database}?mode=ro", uri=True, timeout=5) as db:
            return [row[0] for row in db.execute("SELECT state FROM jobs ORDER BY id")]

    def send_attempts(self) -> list[int]:
        if not self.database.exists():
            return []
        with sqlite3.connect(f"file:{self.database}?mode=ro", uri=True, timeout=5) as db:
            return [row[0] for row in db.execute("SELECT send_attempts FROM jobs ORDER BY id")]

    def stop(self) -> None:
        if self.node is None or self.node.process.popen.poll() is not None:
            return
        _, workers = self.pids()
        self.node.process.stop(timeout=60)
        for pid in workers:
            wait_gone(pid)


@pytest.fixture
def harness(tmp_path: Path, orthanc: Orthanc, node_port: int) -> Iterator[NodeHarness]:
    made: list[NodeHarness] = []

    def make(**sections: Any) -> NodeHarness:
        made.append(NodeHarness(tmp_path, node_port, orthanc, **sections))
        return made[-1]

    yield make  # type: ignore[misc]
    for each in made:
        each.stop()


def _send_until_acknowledged(series_dir: Path, port: int, deadline: float) -> int:
    """Send the series like a PACS does: resend the whole series until one association
    delivers it all. Returns the number of attempts."""
    attempts = 0
    while time.monotonic() < deadline:
        attempts += 1
        done = storescu(series_dir, "127.0.0.1", port, "PACS", NODE_AET, check=False)
        if done.returncode == 0:
            return attempts
        time.sleep(0.5)
    raise AssertionError(f"{series_dir} was never acknowledged")


def _delivery(orthanc: Orthanc, sources: list[Any]) -> dict[str, int]:
    """Count delivered, duplicated and lost series: exactly one derived series per source
    with every instance is a delivery; a second derived series or a short one is a fault."""
    delivered = duplicates = lost = 0
    for source in sources:
        derived = [s for s in orthanc.find_series(source.study_uid)
                   if s["MainDicomTags"].get("SeriesDescription", "").endswith(DERIVED)]
        complete = [s for s in derived if len(s["Instances"]) == len(source.paths)]
        duplicates += max(0, len(derived) - 1)
        if len(complete) == 1 and len(derived) == 1:
            delivered += 1
        else:
            lost += 1
    return {"sent": len(sources), "delivered": delivered, "duplicates": duplicates, "lost": lost}


def _wait_delivered(orthanc: Orthanc, sources: list[Any], timeout: float) -> dict[str, int]:
    result: dict[str, int] = {}

    def all_in() -> bool:
        nonlocal result
        result = _delivery(orthanc, sources)
        return result["delivered"] == len(sources)

    try:
        wait_until(all_in, timeout=timeout, interval=1.0, what="every series in Orthanc")
    except TimeoutError:
        pass
    return result


def _record(fault: str, result: dict[str, int], **extra: Any) -> None:
    FAULT_TABLE.append({"fault": fault, **result, **extra})


def _series(factory: Any, count: int, slices: int, **spec: Any) -> list[Any]:
    return [factory(seed=100 + n, slices=slices, rows=64, columns=64, **spec)
            for n in range(count)]


def test_kill_during_receive(harness, orthanc: Orthanc, mr_series_factory) -> None:  # type: ignore[no-untyped-def]
    node = harness()
    node.start()
    (source,) = _series(mr_series_factory, 1, 120)
    sender = threading.Thread(target=storescu, args=(source.directory, "127.0.0.1", node.port,
                                                      "PACS", NODE_AET), kwargs={"check": False})
    sender.start()
    store = node.workdir / "data" / "instances"
    wait_until(lambda: len(list(store.rglob("*.dcm"))) >= 20, timeout=60, interval=0.05,
               what="part of the series to arrive")
    node.kill("all")
    sender.join(60)
    kept = len(list(store.rglob("*.dcm")))
    assert 20 <= kept < 120
    node.start()
    assert not list((node.workdir / "data" / "incoming").glob("*.part"))
    _send_until_acknowledged(source.directory, node.port, time.monotonic() + 120)
    result = _wait_delivered(orthanc, [source], 180)
    _record("SIGKILL of serve and workers while receiving a 120-image series", result,
            note=f"{kept} images were kept before the kill")
    assert result["delivered"] == 1 and result["duplicates"] == 0


def _kill_in_state(node: NodeHarness, state: str, what: str, orthanc: Orthanc,
                   study_uid: str, timeout: float = 120) -> None:
    wait_until(lambda: state in node.job_states(), timeout=timeout, interval=0.01,
               what=f"a job in state {state}")
    if state == "sending":  # kill in the middle of the association, not before it
        wait_until(lambda: any(s["Instances"] for s in orthanc.find_series(study_uid)),
                   timeout=timeout, interval=0.02, what="the first derived images in Orthanc")
    node.kill(what)


@pytest.mark.parametrize("state, what", [("processing", "all"), ("processing", "worker"),
                                         ("sending", "all"), ("sending", "serve")])
def test_kill_during_a_stage(harness, orthanc: Orthanc, mr_series_factory,  # type: ignore[no-untyped-def]
                             state: str, what: str) -> None:
    node = harness()
    node.start()
    (source,) = _series(mr_series_factory, 1, 150)
    storescu(source.directory, "127.0.0.1", node.port, "PACS", NODE_AET)
    _kill_in_state(node, state, what, orthanc, source.study_uid)
    at_kill = sum(len(s["Instances"]) for s in orthanc.find_series(source.study_uid))
    if what != "worker":
        node.start()
    result = _wait_delivered(orthanc, [source], 240)
    _record(f"SIGKILL of {'serve and workers' if what == 'all' else what} while {state}",
            result, note=f"{at_kill} of 150 derived images were in Orthanc at the kill")
    assert result["delivered"] == 1 and result["duplicates"] == 0
    wait_until(lambda: node.job_states()[-1:] == ["done"], timeout=60, what="the job done")


def test_random_kills_many_series(harness, orthanc: Orthanc, mr_series_factory) -> None:  # type: ignore[no-untyped-def]
    rng = random.Random(20261125)
    node = harness(series={"idle_seconds": 2})
    node.start()
    sources = _series(mr_series_factory, 10, 30)
    deadline = time.monotonic() + 600
    sent: list[int] = []

    def send_all() -> None:
        for source in sources:
            sent.append(_send_until_acknowledged(source.directory, node.port, deadline))

    sender = threading.Thread(target=send_all)
    sender.start()
    kills = []
    for _ in range(6):
        time.sleep(rng.uniform(1.0, 6.0))
        what = rng.choice(["all", "serve", "worker"])
        kills.append(what)
        node.kill(what)
        if what != "worker":
            node.start()
    sender.join(600)
    result = _wait_delivered(orthanc, sources, 300)
    _record("6 SIGKILLs at random moments (serve and workers, serve, a worker) during 10 "
            "series", result, note=f"kills: {', '.join(kills)}; resends: {sum(sent) - len(sent)}")
    assert result == {"sent": 10, "delivered": 10, "duplicates": 0, "lost": 0}
    wait_until(lambda: set(node.job_states()) <= {"done", "ignored"}, timeout=60,
               what="every job finished")


def _restart(orthanc: Orthanc) -> None:
    args = list(orthanc.process.popen.args)  # type: ignore[arg-type]
    orthanc.process = ManagedProcess.start(args, log=orthanc.process.log,
                                           env=dict(os.environ, TCP_NODELAY="1"),
                                           cwd=orthanc.workdir)
    wait_until(lambda: orthanc.process.check_alive() and echoscu(
        "127.0.0.1", orthanc.dicom_port, orthanc.aet), timeout=60, what="Orthanc back")


def test_pacs_down_then_back(harness, orthanc: Orthanc, mr_series_factory) -> None:  # type: ignore[no-untyped-def]
    node = harness(send={"backoff_base_seconds": 1, "backoff_max_seconds": 4,
                         "max_attempts": 40})
    node.start()
    orthanc.process.stop()
    down = time.monotonic()
    sources = _series(mr_series_factory, 3, 10)
    for source in sources:
        storescu(source.directory, "127.0.0.1", node.port, "PACS", NODE_AET)
    wait_until(lambda: node.job_states().count("processed") == 3, timeout=120,
               what="every series waiting to be sent")
    # Down across several backed-off attempts of every series, not one refusal.
    wait_until(lambda: min(node.send_attempts() or [0]) >= 3, timeout=120, interval=0.5,
               what="a third send attempt of every series")
    attempts = node.send_attempts()
    assert set(node.job_states()) <= {"processed", "sending"}  # retrying, none given up
    down_seconds = time.monotonic() - down
    _restart(orthanc)
    result = _wait_delivered(orthanc, sources, 120)
    _record("PACS down (Orthanc stopped) while 3 series are processed and their sends fail",
            result, note=f"down {down_seconds:.0f} s; {min(attempts)}-"
                         f"{max(attempts)} send attempts per series before it was back")
    assert result["delivered"] == 3 and result["duplicates"] == 0


def test_aborted_association_keeps_what_was_acknowledged(harness, orthanc: Orthanc,  # type: ignore[no-untyped-def]
                                                         mr_series_factory, tmp_path: Path) -> None:
    from tests.fixtures.encoding import truncated_copy

    node = harness()
    node.start()
    (source,) = _series(mr_series_factory, 1, 8)
    broken = truncated_copy(source.paths[5], tmp_path / "broken.dcm", keep=0.5)
    statuses = send_files(source.paths[:5] + [broken], "127.0.0.1", node.port, "PACS",
                          NODE_AET)
    assert statuses[:5] == [0] * 5 and statuses[5] != 0
    store = node.workdir / "data" / "instances"
    assert len(list(store.rglob("*.dcm"))) == 5
    assert echoscu("127.0.0.1", node.port, NODE_AET)  # still serving
    send_files(source.paths[5:], "127.0.0.1", node.port, "PACS", NODE_AET)
    result = _wait_delivered(orthanc, [source], 120)
    _record("a truncated instance in the middle of a series (answered 0xC000), rest resent",
            result)
    assert result["delivered"] == 1


def test_print_fault_table(tmp_path: Path) -> None:
    """Print (and save) what the fault tests above measured."""
    lines = ["| fault | series sent | delivered | duplicates | lost | note |",
             "|---|---|---|---|---|---|"]
    for row in FAULT_TABLE:
        lines.append(f"| {row['fault']} | {row['sent']} | {row['delivered']} | "
                     f"{row['duplicates']} | {row['lost']} | {row.get('note', '')} |")
    table = "\n".join(lines)
    print("\n" + table)
    out = os.environ.get("FAULT_TABLE_PATH")
    if out:
        Path(out).write_text(table + "\n")
    (tmp_path / "faults.json").write_text(json.dumps(FAULT_TABLE))
