"""End to end on PostgreSQL: two `denoised-node serve` instances behind one AE title (each on
its own port here, as two hosts would be behind one address) share the database and the
store, with no workers of their own; separate `denoised-node worker` processes (the shipped
model, on CPU) do the work and send to DCMTK's storescp. A series sent half to one instance
and half to the other, a worker added and one removed while the nodes run, and one instance
stopped: every series is denoised and sent exactly once.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from tests.integration.node import NODE_AET, Node, start_node, write_config
from tests.integration.peers import ManagedProcess, StoreSCP, free_port, storescu, wait_until
from tests.integration.postgres import postgres_server, postgres_url  # noqa: F401

pytestmark = pytest.mark.slow

SLICES = 4


def _config(workdir: Path, port: int, url: str, store: Path, scp: StoreSCP) -> Path:
    workdir.mkdir(parents=True, exist_ok=True)
    return write_config(workdir / "node.toml", {
        "node": {"ae_title": NODE_AET, "host": "127.0.0.1", "port": port,
                 "data_dir": str(store), "min_free_mb": 0},
        "database": {"url": url},
        # No early completion: the halves of one series come over two associations.
        "series": {"idle_seconds": 3, "released_grace_seconds": 600},
        "model": {"device": "cpu", "threads": 1},
        # Tiny phantoms, to keep this test short: the gate is not what it is about.
        "gate": {"enabled": False},
        "worker": {"count": 0, "poll_seconds": 0.2, "lease_seconds": 30},
        "send": {"backoff_base_seconds": 0.5, "backoff_max_seconds": 5},
        "http": {"enabled": False},
    }, [{"name": "scp", "ae_title": scp.aet, "host": "127.0.0.1", "port": scp.port}])


@pytest.fixture
def cluster(tmp_path: Path, postgres_url: str,  # noqa: F811
            storescp: StoreSCP) -> Iterator[dict[str, Any]]:
    store = tmp_path / "shared-store"
    ports = [free_port(), free_port()]
    configs = [_config(tmp_path / name, port, postgres_url, store, storescp)
               for name, port in zip(("a", "b"), ports)]
    # Started together on an empty database: both create the schema (advisory lock).
    with ThreadPoolExecutor(2) as pool:
        nodes = list(pool.map(lambda c: start_node(c[0], c[1], c[0].parent / "serve.log",
                                                   timeout=240), zip(configs, ports)))
    workers: list[ManagedProcess] = []

    def add_worker(name: str) -> ManagedProcess:
        env = dict(os.environ)
        env.pop("DENOISED_NODE_CONFIG", None)
        worker = ManagedProcess.start(
            [sys.executable, "-m", "denoised_node.daemon.cli.main", "worker", "--config",
             str(configs[0])], log=tmp_path / f"worker-{name}.log", env=env, cwd=tmp_path)
        workers.append(worker)
        return worker

    yield {"nodes": nodes, "add_worker": add_worker, "store": store}
    for process in [*workers, *(n.process for n in nodes)]:
        process.stop(timeout=60)


def _wait_done(node: Node, count: int, workers: list[ManagedProcess]) -> list[dict[str, Any]]:
    def ready() -> list[dict[str, Any]] | None:
        for worker in workers:
            worker.check_alive()
        jobs = node.jobs()
        failed = [job for job in jobs if job["state"] == "failed"]
        assert not failed, f"jobs failed: {failed}"
        done = [job for job in jobs if job["state"] == "done"]
        return done if len(done) >= count else None

    return wait_until(ready, timeout=300, interval=2.0, what=f"{count} done jobs")


def test_two_nodes_and_separate_workers_process_each_series_once(
        cluster: dict[str, Any], storescp: StoreSCP,
        mr_series_factory: Callable[..., Any]) -> None:
    node_a, node_b = cluster["nodes"]
    series = [mr_series_factory(seed=200 + n, slices=SLICES, rows=48, columns=48)
              for n in range(4)]

    first = cluster["add_worker"]("first")
    storescu(series[0].directory, "127.0.0.1", node_a.port, "MODALITY", NODE_AET)
    _wait_done(node_b, 1, [first])  # sent to A, visible through B: one database

    # A worker joins, the first one leaves (SIGTERM: it finishes what it holds and exits).
    second = cluster["add_worker"]("second")
    first.popen.send_signal(signal.SIGTERM)
    assert first.popen.wait(120) == 0
    storescu(series[1].directory, "127.0.0.1", node_b.port, "MODALITY", NODE_AET)
    half = sorted(series[2].paths)[: SLICES // 2]
    rest = sorted(series[2].paths)[SLICES // 2:]
    for paths, node in ((half, node_a), (rest, node_b)):  # a failover mid-series
        folder = paths[0].parent / f"part-{node.port}"
        folder.mkdir()
        for path in paths:
            os.link(path, folder / path.name)
        storescu(folder, "127.0.0.1", node.port, "MODALITY", NODE_AET)
    _wait_done(node_a, 3, [second])

    # Instance A goes away; B alone keeps receiving and completing.
    assert node_a.stop() == 0
    storescu(series[3].directory, "127.0.0.1", node_b.port, "MODALITY", NODE_AET)
    jobs = _wait_done(node_b, 4, [second])

    everything = node_b.jobs()
    assert len(everything) == 4 and all(job["state"] == "done" for job in everything)
    assert sorted(job["series_uid"] for job in jobs) == sorted(s.series_uid for s in series)
    assert all(job["derived_count"] == SLICES for job in jobs)
    for job in jobs:
        history = node_b.cli("jobs", "show", str(job["id"]), "--json").stdout
        assert history.count('"to_state": "done"') == 1
        assert history.count('"to_state": "processing"') == 1
    # Every derived instance arrived once (storescp names its files by SOP Instance UID).
    received = storescp.wait_for_files(4 * SLICES, timeout=60)
    assert len(received) == 4 * SLICES
