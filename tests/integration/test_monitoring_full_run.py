"""A full run watched as an administrator would: storescu -> serve -> Orthanc with JSON logs at
DEBUG and the HTTP endpoint on. /metrics must tell the story of the run, every log line must be
one JSON event, and no patient name, ID or birth date may appear anywhere in the logs (nor in
the node's index database)."""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.fixtures.encoding import truncated_copy
from tests.fixtures.identity import StudyInfo
from tests.integration.node import NODE_AET, Node, node_config, start_node
from tests.integration.peers import Orthanc, free_port, send_files, storescu, wait_until

pytestmark = pytest.mark.slow

PATIENT = StudyInfo(seed=77, patient_name="Quintavius^Zzyzx^Bartholomew",
                    patient_id="PID-86753-XQZ", patient_birth_date="19230417")
# Every form a careless log line could give these values in.
FORBIDDEN = ("Quintavius", "Zzyzx", "Bartholomew", "PID-86753-XQZ", "86753", "19230417",
             "1923-04-17")


@pytest.fixture
def watched_node(tmp_path: Path, orthanc: Orthanc, node_port: int) -> Iterator[tuple[Node, int]]:
    http_port = free_port()
    config = node_config(tmp_path, node_port, orthanc, http={"enabled": True, "port": http_port},
                         logging={"level": "DEBUG", "json": True})
    node = start_node(config, node_port, tmp_path / "node.log")
    yield node, http_port
    node.process.stop(timeout=60)


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
        text = answer.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_full_run_metrics_and_logs_without_patient_data(watched_node: tuple[Node, int],
                                                        orthanc: Orthanc, mr_series_factory: Any,
                                                        tmp_path: Path) -> None:
    node, http_port = watched_node
    source = mr_series_factory(study=PATIENT, slices=10, rows=128, columns=128)
    storescu(source.directory, "127.0.0.1", node.port, "MODALITY", NODE_AET)
    # A damaged instance of the same patient: refused, and logged as such.
    damaged = truncated_copy(source.paths[0], tmp_path / "damaged.dcm")
    assert send_files([damaged], "127.0.0.1", node.port, "MODALITY", NODE_AET) != [0]

    orthanc.wait_for_series(source.study_uid, lambda s: s["MainDicomTags"].get(
        "SeriesDescription", "").endswith("DENOISED"), count=10, timeout=240)
    wait_until(lambda: scrape(http_port).get(
        ("denoised_node_series_outcomes_total", (("outcome", "done"),))) == 1,
        timeout=30, what="the series counted as done")

    found = scrape(http_port)
    received = "denoised_node_received_instances_total"
    assert found[(received, (("outcome", "stored"),))] == 10
    assert found[(received, (("outcome", "refused"),))] == 1
    assert found[("denoised_node_associations_total",
                  (("result", "accepted"), ("transport", "plain")))] >= 2
    assert found[("denoised_node_queue_jobs", (("state", "done"),))] == 1
    assert found[("denoised_node_workers_ready", ())] == 1
    for stage in ("receive_to_complete", "queue_wait", "inference", "send", "end_to_end"):
        assert found[("denoised_node_stage_seconds_count", (("stage", stage),))] == 1, stage
    end_to_end = found[("denoised_node_stage_seconds_sum", (("stage", "end_to_end"),))]
    parts = sum(found[("denoised_node_stage_seconds_sum", (("stage", s),))]
                for s in ("receive_to_complete", "queue_wait", "inference", "send"))
    assert 0 < parts <= end_to_end + 0.01

    assert node.stop() == 0
    lines = node.process.log.read_text(encoding="utf-8").splitlines()
    assert len(lines) > 20
    events = [json.loads(line) for line in lines]  # every line is one JSON event
    assert all({"time", "level", "logger", "message"} <= set(e) for e in events)
    assert any(e.get("level") == "DEBUG" for e in events)
    assert any(e.get("series_uid") == source.series_uid for e in events)
    assert any(str(e["message"]).startswith("instance refused") for e in events)
    text = "\n".join(lines)
    leaks = [value for value in FORBIDDEN if value in text]
    assert leaks == [], f"patient data in the logs: {leaks}"
    database = (tmp_path / "data" / "node.db").read_bytes()
    assert [v for v in FORBIDDEN if v.encode() in database] == []
