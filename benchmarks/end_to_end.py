"""End to end: seconds from the last instance received to the derived series stored in
Orthanc, for 32, 128 and 512-slice series, split by stage from the node's own job events;
and the peak memory (RSS high-water mark) of `serve` and of the worker."""

from __future__ import annotations

import re
import sqlite3
import time
from datetime import datetime
from pathlib import Path

from benchmarks.common import Row, fresh_dir, series_folder
from tests.integration.node import NODE_AET, Node, node_config, start_node
from tests.integration.peers import Orthanc, free_port, start_orthanc, storescu
from tests.integration.peers.tools import wait_until

SECTION = "end to end"
_STAGES = re.compile(r"load ([\d.]+), model ([\d.]+), gate ([\d.]+), write ([\d.]+)")


def _at(text: str) -> float:
    return datetime.fromisoformat(text).timestamp()


def _stages(database: Path, series_uid: str) -> dict[str, float]:
    with sqlite3.connect(database) as db:
        (series_id, last_received) = db.execute(
            "SELECT id, last_received_at FROM series WHERE series_uid = ?", (series_uid,)
        ).fetchone()
        (job_id, created) = db.execute(
            "SELECT id, created_at FROM jobs WHERE series_id = ? ORDER BY id DESC LIMIT 1",
            (series_id,)).fetchone()
        events = db.execute("SELECT to_state, at, reason FROM job_events WHERE job_id = ? "
                            "ORDER BY id", (job_id,)).fetchall()
    at = {state: _at(when) for state, when, _ in events}
    reason = next(r for state, _, r in events if state == "processed")
    load, model, gate, write = (float(v) for v in _STAGES.search(reason).groups())  # type: ignore[union-attr]
    return {
        "completion wait": _at(created) - _at(last_received),
        "queue": at["processing"] - _at(created),
        "load": load, "inference": model, "gate": gate, "write": write,
        "send": at["done"] - at["sending"],
        "received": _at(last_received),
    }


def _job_done(database: Path, series_uid: str) -> bool:
    with sqlite3.connect(database) as db:
        row = db.execute("SELECT j.state FROM jobs j JOIN series s ON s.id = j.series_id "
                         "WHERE s.series_uid = ? ORDER BY j.id DESC LIMIT 1",
                         (series_uid,)).fetchone()
    return row is not None and row[0] == "done"


def _peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _worker_pids(node: Node) -> list[int]:
    pid = node.process.pid
    children = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in children.read_text().split()] if children.exists() else []


def _worker_peak_mb(node: Node) -> float:
    return max((_peak_rss_mb(p) for p in _worker_pids(node)), default=float("nan"))


def _one_series(node: Node, orthanc: Orthanc, folder: Path, database: Path) -> dict[str, float]:
    import pydicom

    first = next(folder.glob("*.dcm"))
    source = pydicom.dcmread(first, stop_before_pixels=True)
    count = len(list(folder.glob("*.dcm")))
    storescu(folder, "127.0.0.1", node.port, "BENCH", NODE_AET)
    wait_until(lambda: any(len(s["Instances"]) == count
                           for s in orthanc.find_series(str(source.StudyInstanceUID))),
               timeout=1800, interval=0.05, what="the derived series in Orthanc")
    stored = time.time()
    wait_until(lambda: _job_done(database, str(source.SeriesInstanceUID)), timeout=120,
               interval=0.1, what="the job to be recorded done")
    stages = _stages(database, str(source.SeriesInstanceUID))
    stages["end to end"] = stored - stages.pop("received")
    return stages


def end_to_end_rows(workdir: Path, sizes: tuple[int, ...] = (32, 128, 512)) -> list[Row]:
    orthanc = start_orthanc(fresh_dir(workdir / "orthanc-e2e"))
    port = free_port()
    node_dir = fresh_dir(workdir / "node-e2e")
    config = node_config(node_dir, port, orthanc, model={"device": "auto", "threads": 0},
                         series={"idle_seconds": 10}, http={"enabled": False})
    node = start_node(config, port, node_dir / "node.log")
    wait_until(lambda: "worker started" in node.process.log.read_text(), timeout=120,
               what="the worker's model")
    rows = []
    # VmHWM only grows: read after the model loads and after each (larger) series, it shows
    # what each series size adds to the worker's peak.
    peaks = [("model loaded, idle", _peak_rss_mb(node.process.pid), _worker_peak_mb(node))]
    try:
        for seed, slices in enumerate(sizes, start=20):
            folder = series_folder(workdir, slices, seed=seed)
            stages = _one_series(node, orthanc, folder, node_dir / "data" / "node.db")
            own = stages["end to end"] - stages["inference"] - stages["completion wait"]
            detail = ", ".join(f"{k} {v:.2f}" for k, v in stages.items() if k != "end to end")
            rows.append(Row(SECTION, f"{slices} slices 256x256: last instance in -> "
                            "derived series stored in Orthanc", stages["end to end"], "s",
                            note=f"node's own overhead {own:.2f} s; {detail}"))
            peaks.append((f"after {slices} slices", _peak_rss_mb(node.process.pid),
                          _worker_peak_mb(node)))
        for label, serve_mb, worker_mb in peaks:
            rows.append(Row("memory", f"peak RSS, {label}: serve", serve_mb, "MiB"))
            rows.append(Row("memory", f"peak RSS, {label}: worker", worker_mb, "MiB"))
    finally:
        node.process.stop(timeout=60)
        orthanc.stop()
    return rows
