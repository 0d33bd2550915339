"""Adversarial: issue 29's attacks against a real `denoised-node serve` (with a worker, the
shipped model on the CPU) that sends to a real Orthanc, each phase bounded in time.

1. Lock-out: 8 connections each from 127.0.0.2 and 127.0.0.3 holding half an A-ASSOCIATE-RQ,
   then 8 agreed but silent associations from each, while a C-ECHO (DCMTK echoscu) from
   127.0.0.1 is tried once a second; with node.receive_processes 1 and 2.
2. P-DATA floods with no C-STORE command (dataset fragments with no command; a command that
   never ends) on several associations at once: serve's RSS (its process tree) before,
   during and after, and the C-ECHOs meanwhile.
3. Stale and duplicate UIDs: a series denoised and sent to Orthanc (overwrite off, the
   common default); one of its instances sent again inside another series; the first
   series sent again with other pixels under the same UIDs; a replay. Then Orthanc's REST
   API is asked how many SOP Instance UIDs name more than one object, and each derived
   image of the current derived series is compared with its source's current content.
4. Wrong passwords on the HTTP endpoint from 16 threads during a 200-image receive: the
   receive time with and without them, and the share answered 429.
5. Overall: instances acknowledged against instances kept, serve's peak RSS.

Loopback only; every attacker loop stops at its phase's deadline.
"""

from __future__ import annotations

import base64
import multiprocessing
import os
import sqlite3
import statistics
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset

from benchmarks.common import Row, fresh_dir, timed
from benchmarks.soak import HALF_PDU, Tally, _hold_connections, _kept, _probe, _rss_mb
from tests.fixtures.mr_series import StudyInfo, generate_series
from tests.integration.node import NODE_AET, Node, node_config, start_node
from tests.integration.peers import (
    Modality,
    Orthanc,
    free_port,
    send_files,
    start_orthanc,
    wait_until,
)

SECTION = "adversarial"
ATTACKERS = ("127.0.0.2", "127.0.0.3")  # phase 1: the two misbehaving hosts
FLOODERS = ("127.0.0.4", "127.0.0.5", "127.0.0.6", "127.0.0.7")  # phase 2
PASSWORD = "correct horse battery staple"
FLOOD_PDU_KIB = 512


@dataclass
class AdversarialPlan:
    attack_seconds: float = 15.0  # phase 1: each attack, per receive_processes value
    per_address: int = 8  # phase 1: connections (then associations) per attacking address
    receive_processes: tuple[int, ...] = (1, 2)
    flood_associations: int = 8  # phase 2: at once
    flood_mib: int = 384  # phase 2: in all, over both kinds
    flood_seconds: float = 40.0  # phase 2: at most, over both kinds
    stale_slices: int = 8  # phase 3: series A; series B has half as many
    password_threads: int = 16  # phase 4
    receive_images: int = 200  # phase 4
    job_timeout: float = 300.0  # phase 3: the longest wait for one job

    @classmethod
    def quick(cls) -> AdversarialPlan:
        """Every phase at tiny sizes, one receiving process: the smoke test's plan."""
        return cls(attack_seconds=3.0, per_address=8, receive_processes=(1,),
                   flood_associations=4, flood_mib=16, flood_seconds=6.0, stale_slices=3,
                   password_threads=4, receive_images=10, job_timeout=120.0)


@dataclass
class Bench:
    """What the phases share: the node, the PACS, serve's memory, what was acknowledged."""

    node: Node
    node_dir: Path
    orthanc: Orthanc
    http_port: int
    memory: RssSampler
    acknowledged: set[str] = field(default_factory=set)
    rows: list[Row] = field(default_factory=list)

    @property
    def database(self) -> Path:
        return self.node_dir / "data" / "node.db"

    def row(self, what: str, value: float, unit: str, note: str = "") -> None:
        self.rows.append(Row(SECTION, what, value, unit, note=note))

    def send(self, paths: list[Path]) -> list[int]:
        statuses = send_files(paths, "127.0.0.1", self.node.port, "MODALITY", NODE_AET,
                              timeout=60)
        for path, status in zip(paths, statuses, strict=True):
            if status == 0:
                self.acknowledged.add(str(pydicom.dcmread(path, stop_before_pixels=True)
                                          .SOPInstanceUID))
        return statuses


# --- serve's memory: the sum of VmRSS over its process tree ---------------------------------

def _tree(pid: int) -> list[int]:
    pids, queue = [], [pid]
    while queue:
        current = queue.pop()
        pids.append(current)
        for task in Path(f"/proc/{current}/task").glob("*"):
            try:
                queue += [int(p) for p in (task / "children").read_text().split()]
            except OSError:
                continue
    return pids


def tree_rss_mb(pid: int) -> float:
    total = 0.0
    for member in _tree(pid):
        try:
            total += _rss_mb(member)
        except (OSError, KeyError):
            continue
    return total


class RssSampler:
    """Samples serve's tree RSS every 0.25 s for the whole run; phases read windows of it."""

    def __init__(self) -> None:
        self.samples: list[tuple[float, float]] = []
        self.pid = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.25):
            if self.pid:
                mb = tree_rss_mb(self.pid)
                if mb:
                    self.samples.append((time.monotonic(), mb))

    def now(self, seconds: float = 1.0) -> float:
        """The median over ``seconds`` from now (a quiet reading)."""
        start = time.monotonic()
        time.sleep(seconds)
        return self.median(start, time.monotonic())

    def window(self, start: float, end: float) -> list[float]:
        return [mb for at, mb in self.samples if start <= at <= end]

    def median(self, start: float, end: float) -> float:
        values = self.window(start, end)
        return statistics.median(values) if values else float("nan")

    def peak(self, start: float = 0.0, end: float = float("inf")) -> float:
        return max(self.window(start, end), default=float("nan"))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


@contextmanager
def _probing(bench: Bench) -> Iterator[Tally]:
    """soak's probe (a C-ECHO with DCMTK echoscu and GET /healthz, once a second) for
    the length of the block."""
    tally, stop = Tally(), threading.Event()
    thread = threading.Thread(target=_probe, args=(bench.node.port, bench.http_port, stop,
                                                   tally), daemon=True)
    thread.start()
    try:
        yield tally
    finally:
        stop.set()
        thread.join(timeout=60)


def _echoes(tally: Tally) -> tuple[int, int, str]:
    ok = tally.events.get("probe C-ECHO ok", 0)
    tried = ok + tally.events.get("probe C-ECHO failed", 0)
    latencies = sorted(tally.latencies.get("C-ECHO", [0.0]))
    return ok, tried, (f"median {latencies[len(latencies) // 2]:.2f} s, "
                       f"worst {latencies[-1]:.2f} s")


# --- phase 1: partial requests and silent associations --------------------------------------

def _hold_associations(port: int, source: str, keep: int, stop: threading.Event,
                       tally: Tally, name: str) -> None:
    """Keep ``keep`` agreed associations from ``source`` that say nothing; re-associate
    when the node closes one."""
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

    ae = AE(ae_title="SILENT")
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.network_timeout = 5
    ae.dimse_timeout = 120
    held: list[Any] = []
    while not stop.is_set():
        for assoc in [a for a in held if not a.is_established]:
            held.remove(assoc)
            tally.count(f"{name}: closed by the node")
        while len(held) < keep and not stop.is_set():
            assoc = ae.associate("127.0.0.1", port, ae_title=NODE_AET,
                                 bind_address=(source, 0))
            if assoc.is_established:
                held.append(assoc)
                tally.count(f"{name}: associations agreed")
            else:
                tally.count(f"{name}: rejected or dropped")
                stop.wait(0.2)
                break
        stop.wait(0.2)
    for assoc in held:
        assoc.abort()


def _attack(bench: Bench, plan: AdversarialPlan, kind: str, processes: int) -> None:
    stop, tally = threading.Event(), Tally()
    name = "partial A-ASSOCIATE-RQ" if kind == "partial" else "silent association"
    threads = []
    for source in ATTACKERS:
        if kind == "partial":
            args: tuple[Any, ...] = (("127.0.0.1", bench.node.port), source, plan.per_address,
                                     HALF_PDU, stop, tally, name)
            target: Callable[..., None] = _hold_connections
        else:
            args = (bench.node.port, source, plan.per_address, stop, tally, name)
            target = _hold_associations
        threads.append(threading.Thread(target=target, args=args, daemon=True))
    for thread in threads:
        thread.start()
    stop.wait(1.0)  # let the attackers take their slots first
    started = time.monotonic()
    with _probing(bench) as probes:
        stop.wait(plan.attack_seconds)
    stop.set()
    for thread in threads:
        thread.join(timeout=30)
    ok, tried, latency = _echoes(probes)
    attack = "; ".join(f"{key.split(': ', 1)[1]} {n}" for key, n in sorted(tally.events.items()))
    bench.row(f"receive_processes {processes}: {plan.per_address} {name}s each from "
              f"{' and '.join(ATTACKERS)}, {plan.attack_seconds:.0f} s: C-ECHOs from "
              "127.0.0.1 answered", ok, f"of {tried}",
              note=f"{latency}; attackers: {attack}; serve peak RSS "
                   f"{bench.memory.peak(started, time.monotonic()):.0f} MiB")


def lockout_phase(bench: Bench, plan: AdversarialPlan, processes: int) -> None:
    # Silent associations first: the attacker's A-ABORTs free their slots at once, while a
    # connection closed in the middle of its request keeps its slot a while (the report).
    for kind in ("silent", "partial"):
        _attack(bench, plan, kind, processes)


# --- phase 2: P-DATA with no C-STORE command ------------------------------------------------

@dataclass
class FloodTally:
    lock: threading.Lock = field(default_factory=threading.Lock)
    sent: int = 0
    associations: int = 0
    ended_by_node: int = 0
    refused: int = 0

    def add(self, **counts: int) -> None:
        with self.lock:
            for key, value in counts.items():
                setattr(self, key, getattr(self, key) + value)


def _flooder(port: int, source: str, control: int, budget: int, deadline: float,
             tally: FloodTally) -> None:
    """Associate, then P-DATA-TF PDUs of one PDV each (context 1, ``control`` header: 0x00 a
    dataset fragment with no command before it, 0x01 a command fragment never the last),
    raw on the socket, until the node ends the association; again, until ``budget`` bytes
    are sent (by all flooders) or the deadline."""
    from pynetdicom import AE

    fragment = bytes(FLOOD_PDU_KIB * 1024)
    item = (2 + len(fragment)).to_bytes(4, "big") + bytes([1, control]) + fragment
    pdu = b"\x04\x00" + len(item).to_bytes(4, "big") + item
    ae = AE(ae_title="FLOOD")
    ae.add_requested_context("1.2.840.10008.1.1")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    while time.monotonic() < deadline and tally.sent < budget:
        assoc = ae.associate("127.0.0.1", port, ae_title=NODE_AET, bind_address=(source, 0))
        if not assoc.is_established:
            tally.add(refused=1)
            time.sleep(0.2)
            continue
        tally.add(associations=1)
        raw = assoc.dul.socket.socket  # taken once: pynetdicom drops it when the node aborts
        raw.settimeout(10)
        try:
            while time.monotonic() < deadline and tally.sent < budget:
                raw.sendall(pdu)
                tally.add(sent=len(pdu))
        except OSError:
            tally.add(ended_by_node=1)
        finally:
            assoc.abort()


def flood_phase(bench: Bench, plan: AdversarialPlan) -> None:
    kinds = ((0x00, "dataset fragments with no command"),
             (0x01, "a command that never ends"))
    for control, what in kinds:
        budget = plan.flood_mib * 2**20 // len(kinds)
        before = bench.memory.now(2.0)
        started = time.monotonic()
        deadline = started + plan.flood_seconds / len(kinds)
        tally = FloodTally()
        threads = [threading.Thread(target=_flooder, args=(
            bench.node.port, FLOODERS[index % len(FLOODERS)], control, budget, deadline,
            tally), daemon=True) for index in range(plan.flood_associations)]
        with _probing(bench) as probes:
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(timeout=plan.flood_seconds + 60)
            seconds = time.monotonic() - started
        ended = time.monotonic()
        after = bench.memory.now(3.0)
        ok, tried, latency = _echoes(probes)
        peak = bench.memory.peak(started, ended)
        bench.row(f"P-DATA flood, {what}: {plan.flood_associations} associations at once, "
                  f"{tally.sent / 2**20:.0f} MiB in {seconds:.0f} s: serve's peak RSS",
                  peak, "MiB",
                  note=f"before {before:.0f}, after {after:.0f} MiB (grew {peak - before:.0f} "
                       f"MiB); {tally.associations} associations, {tally.ended_by_node} "
                       f"ended by the node, {tally.refused} refused; C-ECHOs answered "
                       f"{ok} of {tried} ({latency})")


# --- phase 3: stale and duplicate UIDs ------------------------------------------------------

def _latest_job(database: Path, series_uid: str) -> tuple[int, str, str | None, int | None]:
    with sqlite3.connect(database) as db:
        row = db.execute("SELECT j.id, j.state, j.derived_series_uid, j.derived_count "
                         "FROM jobs j JOIN series s ON s.id = j.series_id "
                         "WHERE s.series_uid = ? ORDER BY j.id DESC LIMIT 1",
                         (series_uid,)).fetchone()
    return row or (0, "", None, None)


_FINAL = ("done", "failed", "ignored")


def _last_final_event(database: Path, series_uid: str) -> int:
    """The id of the series' latest job event into a final state (0: none yet)."""
    with sqlite3.connect(database) as db:
        (event,) = db.execute(
            "SELECT coalesce(max(e.id), 0) FROM job_events e JOIN jobs j ON j.id = e.job_id "
            "JOIN series s ON s.id = j.series_id WHERE s.series_uid = ? AND e.to_state IN "
            "(?, ?, ?) AND e.from_state != e.to_state", (series_uid, *_FINAL)).fetchone()
    return int(event)


def _wait_until_finished(bench: Bench, series_uid: str, after: int, timeout: float) -> None:
    """Until the series' latest job reached a final state after event ``after`` (a new
    job, or a replayed one: a replay queues the same job again)."""
    def finished() -> bool:
        return (_last_final_event(bench.database, series_uid) > after
                and _latest_job(bench.database, series_uid)[1] in _FINAL)

    wait_until(finished, timeout=timeout, interval=0.5,
               what=f"a job of series {series_uid} to finish again")


def _pixels(ds: Dataset) -> np.ndarray:
    return np.asarray(ds.pixel_array, dtype=np.float64)


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


@dataclass
class Sources:
    """What the benchmark sent under each SOP Instance UID, oldest first, and where it is now."""

    versions: dict[str, list[np.ndarray]] = field(default_factory=dict)
    series_of: dict[str, str] = field(default_factory=dict)

    def sent(self, paths: list[Path], statuses: list[int]) -> None:
        for path, status in zip(paths, statuses, strict=True):
            ds = pydicom.dcmread(path)
            if status == 0:
                self.versions.setdefault(str(ds.SOPInstanceUID), []).append(_pixels(ds))
                self.series_of[str(ds.SOPInstanceUID)] = str(ds.SeriesInstanceUID)


def _rewrite(paths: list[Path], target: Path, edit: Callable[[Dataset, int], None]) -> list[Path]:
    target.mkdir(parents=True, exist_ok=True)
    written = []
    for index, path in enumerate(paths):
        ds = pydicom.dcmread(path)
        edit(ds, index)
        out = target / path.name
        ds.save_as(out, enforce_file_format=True)
        written.append(out)
    return written


def _send_and_wait(bench: Bench, sources: Sources, paths: list[Path],
                   series_uids: list[str], timeout: float) -> str:
    before = {uid: _last_final_event(bench.database, uid) for uid in series_uids}
    statuses = bench.send(paths)
    sources.sent(paths, statuses)
    for uid in series_uids:
        _wait_until_finished(bench, uid, before[uid], timeout)
    return ", ".join(f"0x{s:04X}: {n}" for s, n in sorted(Counter(statuses).items()))


def stale_phase(bench: Bench, plan: AdversarialPlan) -> None:
    work = fresh_dir(bench.node_dir.parent / "stale")
    study = StudyInfo(seed=290)
    a = generate_series(work / "a", seed=291, study=study, slices=plan.stale_slices,
                        series_number=3)
    b = generate_series(work / "b", seed=292, study=study, slices=max(2, plan.stale_slices // 2),
                        series_number=4, orientation="coronal")
    other = generate_series(work / "other", seed=293, slices=plan.stale_slices,
                            orientation="sagittal")  # pixels for A's second version
    a_paths = [i.path for i in a.instances]
    b_paths = [i.path for i in b.instances]
    a_uid = str(pydicom.dcmread(a_paths[0], stop_before_pixels=True).SeriesInstanceUID)
    b_uid = str(pydicom.dcmread(b_paths[0], stop_before_pixels=True).SeriesInstanceUID)
    moved = str(pydicom.dcmread(a_paths[1], stop_before_pixels=True).SOPInstanceUID)
    sources = Sources()
    started = time.monotonic()
    steps = []
    # 1. A, denoised and sent.
    steps.append("A sent: " + _send_and_wait(bench, sources, a_paths, [a_uid],
                                              plan.job_timeout))
    # 2. B, one of whose instances carries the SOP Instance UID of A's second (B's pixels):
    #    the instance moves from A to B, both are denoised again.
    def take_moved(ds: Dataset, index: int) -> None:
        if index == 1:
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = moved

    b_sent = _rewrite(b_paths, work / "b-moved", take_moved)
    steps.append("B with A's instance sent: " + _send_and_wait(
        bench, sources, b_sent, [a_uid, b_uid], plan.job_timeout))
    # 3. A again, every instance with other pixels under the same UIDs (the moved one too:
    #    it moves back into A, and B is denoised again without it).
    others = [pydicom.dcmread(i.path) for i in other.instances]

    def new_pixels(ds: Dataset, index: int) -> None:
        ds.PixelData = others[index].PixelData

    a_changed = _rewrite(a_paths, work / "a-changed", new_pixels)
    steps.append("A with other pixels sent: " + _send_and_wait(
        bench, sources, a_changed, [a_uid, b_uid], plan.job_timeout))
    # 4. A replay of A's last job (same content: the same derived UIDs, a PACS keeps one).
    job = _latest_job(bench.database, a_uid)[0]
    before = _last_final_event(bench.database, a_uid)
    bench.node.cli("replay", "--job", str(job))
    _wait_until_finished(bench, a_uid, before, plan.job_timeout)
    steps.append(f"job {job} replayed")
    seconds = time.monotonic() - started
    _count_in_orthanc(bench, sources, [a_uid, b_uid], str(study.study_uid), seconds, steps)


def _count_in_orthanc(bench: Bench, sources: Sources, series_uids: list[str], study_uid: str,
                      seconds: float, steps: list[str]) -> None:
    orthanc = bench.orthanc
    instances = orthanc.get("/instances?expand")
    held = Counter(str(i["MainDicomTags"]["SOPInstanceUID"]) for i in instances)
    twice = sum(1 for n in held.values() if n > 1)
    derived_series = [s for s in orthanc.find_series(study_uid)]
    current = {}
    for uid in series_uids:
        job, state, derived_uid, count = _latest_job(bench.database, uid)
        current[uid] = (job, state, derived_uid, count)
    stale, checked, incomplete, lowest = 0, 0, 0, 1.0
    for uid, (_, state, derived_uid, count) in current.items():
        found = orthanc.series_instances(derived_uid) if derived_uid else []
        if state != "done" or len(found) != count:
            incomplete += 1
        for instance in found:
            ds = orthanc.instance_dataset(instance["ID"])
            source = str(ds.SourceImageSequence[0].ReferencedSOPInstanceUID)
            versions = sources.versions[source]
            score = [_corr(_pixels(ds), v) for v in versions]
            checked += 1
            lowest = min(lowest, score[-1])
            # Stale: closer to an older content of its source than to the current one.
            if sources.series_of[source] != uid or max(score) > score[-1] or score[-1] < 0.5:
                stale += 1
    superseded = len(derived_series) - len(current)
    what = "; ".join(steps)
    bench.row("stale/duplicate UIDs: SOP UIDs held twice in Orthanc", twice, "UIDs",
              note=f"{len(instances)} derived objects, {len(held)} SOP Instance UIDs "
                   f"(overwrite off); {what}; {seconds:.0f} s")
    bench.row("stale/duplicate UIDs: stale derived images (current derived series)", stale,
              "images",
              note=f"{checked} derived images checked against their source's current pixels "
                   f"(lowest correlation {lowest:.3f}); current derived series incomplete or "
                   f"not done: {incomplete}; {superseded} superseded derived series left in "
                   "Orthanc (by design: the node deletes nothing there; `jobs show` names them)")


# --- phase 4: wrong passwords during a receive ----------------------------------------------

def _wrong_passwords(http_port: int, stop: threading.Event, codes: Counter[int],
                     lock: threading.Lock) -> None:
    token = base64.b64encode(b"admin:not-the-password").decode()
    while not stop.is_set():
        request = urllib.request.Request(f"http://127.0.0.1:{http_port}/",
                                         headers={"Authorization": f"Basic {token}"})
        try:
            with urllib.request.urlopen(request, timeout=30) as answer:
                code = answer.status
        except urllib.error.HTTPError as error:
            code = error.code
        except OSError:
            code = 0
        with lock:
            codes[code] += 1


def _password_flood(http_port: int, threads: int, stop: Any, answers: Any) -> None:
    """In a process of its own (the attacker's threads must not share the sender's GIL):
    ``threads`` threads of wrong passwords until ``stop``; the answers' codes counted."""
    halt, lock, codes = threading.Event(), threading.Lock(), Counter[int]()
    workers = [threading.Thread(target=_wrong_passwords, args=(http_port, halt, codes, lock),
                                daemon=True) for _ in range(threads)]
    for worker in workers:
        worker.start()
    stop.wait(600)
    halt.set()
    for worker in workers:
        worker.join(timeout=60)
    answers.put(dict(codes))


def password_phase(bench: Bench, plan: AdversarialPlan) -> None:
    work = fresh_dir(bench.node_dir.parent / "receive")
    # MR images of a knee: received, checked, written and indexed like any, then ignored
    # (outside the model's intended use) rather than denoised, so that the worker does not
    # compete with the second receive for the two cores.
    knee = {"BodyPartExamined": "KNEE"}
    quiet = generate_series(work / "quiet", seed=294, slices=plan.receive_images, rows=256,
                            columns=256, extra=knee)
    flooded = generate_series(work / "flooded", seed=295, slices=plan.receive_images,
                              rows=256, columns=256, extra=knee)
    quiet_paths = [i.path for i in quiet.instances]
    flooded_paths = [i.path for i in flooded.instances]
    statuses: list[int] = []
    without = timed(lambda: statuses.extend(bench.send(quiet_paths)))
    spawn = multiprocessing.get_context("spawn")
    stop, answers = spawn.Event(), spawn.Queue()
    attacker = spawn.Process(target=_password_flood, args=(bench.http_port,
                                                           plan.password_threads, stop, answers))
    attacker.start()
    time.sleep(3.0)  # the attacker's interpreter started and its threads running
    try:
        with _probing(bench) as probes:
            with_flood = timed(lambda: statuses.extend(bench.send(flooded_paths)))
    finally:
        stop.set()
        codes = Counter[int](answers.get(timeout=120))
        attacker.join(timeout=60)
    total = sum(codes.values())
    ok, tried, _ = _echoes(probes)
    answers = ", ".join(f"{code or 'no answer'}: {n}" for code, n in sorted(codes.items()))
    bench.row(f"{plan.receive_images}-image receive (256x256): time without wrong passwords",
              without, "s")
    bench.row(f"{plan.receive_images}-image receive: time with wrong passwords from "
              f"{plan.password_threads} threads", with_flood, "s",
              note=f"{without and with_flood / without:.2f}x; statuses "
                   f"{dict(Counter(f'0x{s:04X}' for s in statuses))}; C-ECHOs answered "
                   f"{ok} of {tried}")
    bench.row("wrong passwords answered 429", 100 * codes[429] / total if total else 0.0, "%",
              note=f"{total} requests: {answers}")


# --- the run --------------------------------------------------------------------------------

def _phase(bench: Bench, phase: Callable[..., None], *args: Any) -> None:
    """Run a phase; one that cannot finish is a row that says why (the others still run)."""
    try:
        phase(bench, *args)
    except Exception as exc:  # noqa: BLE001 - reported as a figure, never hidden
        bench.row(f"{phase.__name__} STOPPED", float("nan"), "",
                  note=f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")


def _start(node_dir: Path, port: int, http_port: int, orthanc: Orthanc, processes: int,
           secret: Path) -> Node:
    config = node_config(node_dir, port, orthanc,
                         node={"receive_processes": processes},
                         series={"idle_seconds": 2, "released_grace_seconds": 0.5},
                         model={"device": "cpu", "threads": 1},
                         # Small fast phantoms: the UIDs are what phase 3 is about, not the
                         # image (the gate rightly refuses tiny coarse images).
                         gate={"enabled": False},
                         worker={"count": 1, "poll_seconds": 0.2, "idle_poll_seconds": 1},
                         http={"enabled": True, "port": http_port, "username": "admin",
                               "password_file": str(secret)})
    node = start_node(config, port, node_dir / f"node-{processes}.log")
    wait_until(lambda: "worker started" in node.process.log.read_text(), timeout=300,
               what="the worker's model")
    return node


def adversarial_rows(workdir: Path, plan: AdversarialPlan | None = None) -> list[Row]:
    from denoised_node.daemon.web.passwords import htpasswd_line

    plan = plan or AdversarialPlan()
    base = fresh_dir(workdir / "adversarial")
    node_dir = fresh_dir(base / "node")
    port, http_port = free_port(), free_port()
    secret = node_dir / "http-password"
    secret.write_text(htpasswd_line("admin", PASSWORD))
    os.chmod(secret, 0o600)
    orthanc = start_orthanc(base / "orthanc", modalities={NODE_AET: Modality(NODE_AET, port)},
                            overwrite_instances=False)
    memory = RssSampler()
    node: Node | None = None
    bench: Bench | None = None
    alive = True
    try:
        for processes in plan.receive_processes:
            node = _start(node_dir, port, http_port, orthanc, processes, secret)
            memory.pid = node.process.pid
            if bench is None:
                bench = Bench(node, node_dir, orthanc, http_port, memory)
                bench.row("serve at rest, model loaded: RSS (process tree)",
                          memory.now(2.0), "MiB", note=f"receive_processes {processes}")
            bench.node = node
            _phase(bench, lockout_phase, plan, processes)
            if processes == plan.receive_processes[0]:
                _phase(bench, flood_phase, plan)
                _phase(bench, stale_phase, plan)
                _phase(bench, password_phase, plan)
            alive = alive and node.process.check_alive()
            node.process.stop(timeout=60)
            node = None
    finally:
        if node is not None:
            node.process.stop(timeout=60)
        memory.stop()
        orthanc.stop()
    assert bench is not None
    acknowledged = sorted(bench.acknowledged)
    kept = _kept(bench.database, node_dir / "data", acknowledged)
    bench.row("overall: instances acknowledged (0x0000)", len(acknowledged), "instances",
              note="distinct SOP Instance UIDs, phases 3 and 4")
    bench.row("overall: instances kept of those (indexed, file on disk)", kept, "instances",
              note="every acknowledged one" if kept == len(acknowledged)
              else f"{len(acknowledged) - kept} LOST")
    bench.row("overall: serve's peak RSS (process tree: serve, receivers, worker)",
              memory.peak(), "MiB", note="" if alive else "serve DIED")
    return bench.rows
