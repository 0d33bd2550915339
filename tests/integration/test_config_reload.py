"""`systemctl reload` without systemd: SIGHUP to a real `denoised-node serve`. A changed
allowlist and rule take effect (the worker restarts with the new rule), an association open
across the reload keeps working, and a config that does not validate is refused with its
reason while the old one keeps serving. systemd's RELOADING=1 / READY=1 are read on the
NOTIFY_SOCKET the test gives the node."""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from tests.integration.node import NODE_AET, Node, node_config
from tests.integration.peers import ManagedProcess, echoscu, free_port, wait_until
from tests.integration.peers.dcmtk import storescu
from tests.integration.test_monitoring_service import Notifications, http_get

pytestmark = pytest.mark.slow

RULE = """
[[rules]]
name = "first"
match = {}
ignore = true
"""


@pytest.fixture
def node(tmp_path: Path, notifications: Notifications) -> Iterator[tuple[Node, int]]:
    node_port, http_port = free_port(), free_port()
    config = node_config(tmp_path, node_port, None,
                         node={"allowed_calling_ae_titles": ["ECHOSCU", "STORESCU", "OLDMOD"]},
                         http={"enabled": True, "port": http_port})
    config.write_text(config.read_text() + RULE)
    env = {key: value for key, value in os.environ.items() if not key.startswith("DENOISED_NODE")}
    env.update(NOTIFY_SOCKET=notifications.listener.name)
    process = ManagedProcess.start(
        [sys.executable, "-m", "denoised_node.daemon.cli.main", "serve", "--config", str(config)],
        log=tmp_path / "node.log", env=env, cwd=tmp_path)
    yield Node(config, node_port, process), http_port
    process.stop(timeout=90)


def _metric(http_port: int, name: str) -> float:
    status, body = http_get(http_port, "/metrics")
    assert status == 200, body
    line = next(line for line in body.splitlines() if line.startswith(f"denoised_node_{name} "))
    return float(line.split()[1])


def _reload(node: Node, notifications: Notifications, reloads: int) -> None:
    """SIGHUP, then wait for the READY=1 that ends the reload (as `systemctl reload` does)."""
    pid = node.process.pid
    node.process.popen.send_signal(signal.SIGHUP)
    wait_until(lambda: node.process.check_alive() and notifications.count("RELOADING", pid)
               == reloads and notifications.count("READY", pid) == reloads + 1,
               timeout=60, what=f"reload {reloads} done")


def _ignored_by(node: Node, count: int) -> list[str | None]:
    def ignored() -> list[dict[str, Any]] | None:
        jobs = node.jobs("ignored")
        return jobs if len(jobs) == count else None

    jobs = wait_until(ignored, timeout=120, what=f"{count} ignored job(s)")
    return sorted(job["rule_name"] for job in jobs)


def test_sighup_applies_a_config_keeps_associations_and_refuses_a_bad_one(
        node: tuple[Node, int], notifications: Notifications,
        mr_series_factory: Any, tmp_path: Path) -> None:
    running, http_port = node
    pid, port = running.process.pid, running.port
    wait_until(lambda: running.process.check_alive() and notifications.count("READY", pid) == 1,
               timeout=180, what="READY=1 from serve")
    assert not echoscu("127.0.0.1", port, NODE_AET, calling="NEWMOD")
    storescu(mr_series_factory(seed=1, slices=2).directory, "127.0.0.1", port, "STORESCU",
             NODE_AET)
    assert _ignored_by(running, 1) == ["first"]
    loaded = _metric(http_port, "config_loaded_timestamp_seconds")

    ae = AE("OLDMOD")
    ae.add_requested_context(Verification)
    open_association = ae.associate("127.0.0.1", port, ae_title=NODE_AET)
    assert open_association.is_established
    try:
        good = (running.config.read_text().replace('"OLDMOD"', '"NEWMOD"')
                .replace('name = "first"', 'name = "second"'))
        running.config.write_text(good)
        _reload(running, notifications, 1)
        assert "config reloaded" in running.log()
        assert _metric(http_port, "config_loaded_timestamp_seconds") > loaded
        assert _metric(http_port, "config_last_reload_successful") == 1
        # The association requested before the reload goes on; new ones meet the new list.
        assert open_association.is_established
        assert open_association.send_c_echo().Status == 0
        assert echoscu("127.0.0.1", port, NODE_AET, calling="NEWMOD")
        assert not echoscu("127.0.0.1", port, NODE_AET, calling="OLDMOD")
        # The worker finished, restarted and reads the new rule.
        storescu(mr_series_factory(seed=2, slices=2).directory, "127.0.0.1", port,
                 "STORESCU", NODE_AET)
        assert _ignored_by(running, 2) == ["first", "second"]
        assert "finished for the reload" in running.log()
    finally:
        open_association.release()

    # A key the schema does not know: refused with its name, the running config stays.
    running.config.write_text(good.replace("[series]", "[series]\nidle_secs = 1"))
    _reload(running, notifications, 2)
    log = running.log()
    assert "config reload refused" in log and "idle_secs" in log
    assert _metric(http_port, "config_last_reload_successful") == 0
    assert echoscu("127.0.0.1", port, NODE_AET, calling="NEWMOD")
    assert running.process.check_alive()
