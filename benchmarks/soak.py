"""Soak: `denoised-node serve` under honest load and two attacks at once, for a bounded time.

- senders: pynetdicom SCUs on several associations from 127.0.0.1, each sending new MR
  instances (fresh Series and SOP Instance UIDs every round) as fast as the node answers;
- a slow-loris attacker on 127.0.0.2 keeping many connections open, each holding the first
  bytes of a PDU and then silent, reconnecting as soon as the node drops one;
- an HTTP flood: many idle connections to the status port, reconnecting when closed;
- probes once a second: a C-ECHO and GET /healthz, as a monitoring system would.

Reported: instances acknowledged (0x0000) against instances kept (indexed, file on disk),
every other status, associations refused, what the attackers got, the probes, and serve's
peak memory (RSS) and descriptors.
"""

from __future__ import annotations

import copy
import select
import socket
import sqlite3
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import UID

from benchmarks.common import Row, fresh_dir, series_folder
from tests.integration.node import NODE_AET, Node, node_config, start_node
from tests.integration.peers import free_port

SECTION = "soak"
ATTACKER = "127.0.0.2"  # another loopback address: the attacker is not the senders' host
HALF_PDU = b"\x01\x00\x00"  # the start of an A-ASSOCIATE-RQ header, then silence


@dataclass
class SoakPlan:
    seconds: float = 60.0
    senders: int = 4
    slices: int = 32  # instances per round (one series)
    slow_loris: int = 64  # connections the attacker keeps open
    http_flood: int = 256  # idle HTTP connections kept open
    timeout: float = 5.0  # node.network_timeout / acse_timeout and http.request_timeout


@dataclass
class Tally:
    lock: threading.Lock = field(default_factory=threading.Lock)
    statuses: Counter[str] = field(default_factory=Counter)
    acknowledged: list[str] = field(default_factory=list)
    events: Counter[str] = field(default_factory=Counter)
    latencies: dict[str, list[float]] = field(default_factory=dict)

    def count(self, what: str, n: int = 1) -> None:
        with self.lock:
            self.events[what] += n

    def status(self, sop_uid: str, code: int | None) -> None:
        with self.lock:
            self.statuses["none (association lost)" if code is None else f"0x{code:04X}"] += 1
            if code == 0:
                self.acknowledged.append(sop_uid)

    def latency(self, what: str, seconds: float) -> None:
        with self.lock:
            self.latencies.setdefault(what, []).append(seconds)


def _templates(folder: Path, count: int) -> list[Dataset]:
    return [pydicom.dcmread(p) for p in sorted(folder.glob("*.dcm"))[:count]]


def _sender(index: int, port: int, templates: list[Dataset], stop: threading.Event,
            tally: Tally) -> None:
    from pynetdicom import AE
    from pynetdicom.sop_class import MRImageStorage  # type: ignore[attr-defined]

    from denoised_node.daemon.dicom.network_options import keep_responses_for_the_caller

    ae = AE(ae_title=f"SOAK{index}")
    ae.add_requested_context(MRImageStorage)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    own = [copy.deepcopy(ds) for ds in templates]
    while not stop.is_set():
        assoc = ae.associate("127.0.0.1", port, ae_title=NODE_AET)
        if not assoc.is_established:
            tally.count("sender association refused")
            stop.wait(0.5)
            continue
        keep_responses_for_the_caller(assoc)
        series_uid = f"2.25.{uuid.uuid4().int}"
        for number, ds in enumerate(own, start=1):
            if stop.is_set():
                break
            sop_uid = f"{series_uid}.{number}"
            ds.SeriesInstanceUID = series_uid
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = UID(sop_uid)
            try:
                answer = assoc.send_c_store(ds)
            except (RuntimeError, OSError):
                answer = Dataset()
            tally.status(sop_uid, int(answer.Status) if "Status" in answer else None)
            if not assoc.is_established:
                break
        if assoc.is_established:
            assoc.release()


def _hold_connections(target: tuple[str, int], source: str, keep: int, first: bytes,
                      stop: threading.Event, tally: Tally, name: str) -> None:
    """Keep ``keep`` connections open (each sends ``first`` and then nothing); count how
    many were opened, refused and closed by the node, and what it answered."""
    held: list[socket.socket] = []
    while not stop.is_set():
        while len(held) < keep and not stop.is_set():
            try:
                sock = socket.create_connection(target, timeout=2, source_address=(source, 0))
                if first:
                    sock.sendall(first)
                sock.setblocking(False)
                held.append(sock)
                tally.count(f"{name}: connections opened")
            except OSError:
                tally.count(f"{name}: connections refused by the kernel")
                stop.wait(0.1)
                break
        if not held:
            stop.wait(0.2)
            continue
        readable, _, _ = select.select(held, [], [], 0.2)
        for sock in readable:
            try:
                data = sock.recv(4096)
            except OSError:
                data = b""
            if data.startswith(b"HTTP/1.1 503"):
                tally.count(f"{name}: answered 503 at once")
            elif data:
                continue  # e.g. an HTTP 408 before the close
            else:
                tally.count(f"{name}: closed by the node")
            sock.close()
            held.remove(sock)
    for sock in held:
        sock.close()


def _probe(node_port: int, http_port: int, stop: threading.Event, tally: Tally) -> None:
    from tests.integration.peers.dcmtk import echoscu

    while not stop.wait(1.0):
        started = time.monotonic()
        ok = echoscu("127.0.0.1", node_port, NODE_AET)
        tally.latency("C-ECHO", time.monotonic() - started)
        tally.count(f"probe C-ECHO {'ok' if ok else 'failed'}")
        started = time.monotonic()
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/healthz",
                                        timeout=10) as answer:
                code = answer.status
        except urllib.error.HTTPError as error:
            code = error.code
        except OSError:
            code = 0
        tally.latency("/healthz", time.monotonic() - started)
        tally.count(f"probe /healthz {code or 'no answer'}")


@dataclass
class Peaks:
    rss_mb: float = 0.0
    descriptors: int = 0
    threads: int = 0


def _sample(pid: int, stop: threading.Event, peaks: Peaks) -> None:
    while not stop.wait(0.25):
        try:
            status = Path(f"/proc/{pid}/status").read_text()
            descriptors = len(list(Path(f"/proc/{pid}/fd").iterdir()))
        except OSError:
            return
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        peaks.rss_mb = max(peaks.rss_mb, int(fields["VmRSS"].split()[0]) / 1024)
        peaks.threads = max(peaks.threads, int(fields["Threads"]))
        peaks.descriptors = max(peaks.descriptors, descriptors)


def _kept(database: Path, data_dir: Path, acknowledged: list[str]) -> int:
    kept = 0
    with sqlite3.connect(database) as db:
        for start in range(0, len(acknowledged), 500):
            chunk = acknowledged[start:start + 500]
            marks = ",".join("?" * len(chunk))
            for (path,) in db.execute(f"SELECT path FROM instances WHERE sop_instance_uid "
                                      f"IN ({marks})", chunk):
                kept += (data_dir / path).is_file()
    return kept


def _run(node: Node, http_port: int, plan: SoakPlan, templates: list[Dataset],
         tally: Tally) -> None:
    stop = threading.Event()
    threads: list[threading.Thread] = []

    def start(target: Callable[..., None], *args: object) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        thread.start()
        threads.append(thread)

    for index in range(plan.senders):
        start(_sender, index, node.port, templates, stop, tally)
    start(_hold_connections, ("127.0.0.1", node.port), ATTACKER, plan.slow_loris, HALF_PDU,
          stop, tally, "slow loris")
    start(_hold_connections, ("127.0.0.1", http_port), "127.0.0.1", plan.http_flood, b"",
          stop, tally, "HTTP flood")
    start(_probe, node.port, http_port, stop, tally)
    stop.wait(plan.seconds)
    stop.set()
    for thread in threads:
        thread.join(timeout=60)


def soak_rows(workdir: Path, plan: SoakPlan | None = None) -> list[Row]:
    plan = plan or SoakPlan()
    folder = series_folder(workdir, plan.slices, seed=31)
    templates = _templates(folder, plan.slices)
    port, http_port = free_port(), free_port()
    node_dir = fresh_dir(workdir / "node-soak")
    config = node_config(node_dir, port, None, worker={"count": 0},
                         series={"idle_seconds": 3600},
                         node={"network_timeout": plan.timeout, "acse_timeout": plan.timeout},
                         http={"enabled": True, "port": http_port,
                               "request_timeout": plan.timeout})
    node = start_node(config, port, node_dir / "node.log")
    tally, peaks = Tally(), Peaks()
    sampler_stop = threading.Event()
    sampler = threading.Thread(target=_sample, args=(node.process.pid, sampler_stop, peaks),
                               daemon=True)
    sampler.start()
    baseline_rss = _rss_mb(node.process.pid)
    try:
        _run(node, http_port, plan, templates, tally)
        alive = node.process.check_alive()
    finally:
        sampler_stop.set()
        sampler.join()
        node.process.stop(timeout=60)
    kept = _kept(node_dir / "data" / "node.db", node_dir / "data", tally.acknowledged)
    return _rows(plan, tally, peaks, kept, baseline_rss, alive)


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _rows(plan: SoakPlan, tally: Tally, peaks: Peaks, kept: int, baseline_rss: float,
          alive: bool) -> list[Row]:
    what = (f"{plan.seconds:.0f} s, {plan.senders} senders, {plan.slow_loris} slow-loris and "
            f"{plan.http_flood} idle HTTP connections held")
    acknowledged = len(tally.acknowledged)
    statuses = ", ".join(f"{code}: {n}" for code, n in sorted(tally.statuses.items()))
    events = dict(tally.events)
    rows = [
        Row(SECTION, f"{what}: instances acknowledged (0x0000)", acknowledged, "instances",
            note=f"statuses {statuses}; associations refused to senders "
                 f"{events.get('sender association refused', 0)}"),
        Row(SECTION, "instances kept of those acknowledged (indexed, file on disk)", kept,
            "instances", note="every acknowledged one" if kept == acknowledged
            else f"{acknowledged - kept} MISSING"),
        Row(SECTION, "receive rate", acknowledged / plan.seconds, "img/s",
            note="under attack" if plan.slow_loris or plan.http_flood else "no attack"),
    ]
    for name in ("slow loris", "HTTP flood"):
        parts = [f"{key.split(': ', 1)[1]} {n}" for key, n in sorted(events.items())
                 if key.startswith(name + ":") and "opened" not in key]
        rows.append(Row(SECTION, f"{name}: connections opened",
                        events.get(f"{name}: connections opened", 0), "connections",
                        note="; ".join(parts)))
    for probe in ("C-ECHO", "/healthz"):
        answers = {key.removeprefix(f"probe {probe} "): n for key, n in events.items()
                   if key.startswith(f"probe {probe} ")}
        latencies = sorted(tally.latencies.get(probe, [0.0]))
        rows.append(Row(SECTION, f"probe {probe} once a second: worst latency", latencies[-1],
                        "s", note=", ".join(f"{k}: {n}" for k, n in sorted(answers.items()))
                        + f"; median {latencies[len(latencies) // 2]:.3f} s"))
    rows += [
        Row(SECTION, "serve: peak RSS", peaks.rss_mb, "MiB",
            note=f"{baseline_rss:.0f} MiB before the soak"
                 + ("" if alive else "; serve DIED")),
        Row(SECTION, "serve: peak open descriptors", peaks.descriptors, "descriptors",
            note=f"peak threads {peaks.threads}"),
    ]
    return rows
