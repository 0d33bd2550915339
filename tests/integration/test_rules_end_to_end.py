"""Rules end to end: DCMTK storescu sends two series of one study to `denoised-node serve`;
two rules give them two real models (the shipped default and the shipped 1.0); one goes to
the production Orthanc, the other to a shadow Orthanc after it was held and approved from the
CLI. Each Orthanc receives only what its rule names."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest

from denoised_node.model.card import read_card
from tests.fixtures.identity import StudyInfo
from tests.integration.node import NODE_AET, Node, node_config, start_node
from tests.integration.peers import Orthanc
from tests.integration.peers.dcmtk import storescu
from tests.integration.peers.orthanc import Modality
from tests.integration.peers.tools import wait_until

pytestmark = pytest.mark.slow

RULES = """
[models]
previous = "unet25d-1.0"

[[rules]]
name = "brain-t1"
match = { Modality = "MR", SeriesDescription = "(?i)\\\\bt1\\\\b" }
model = "default"
destinations = ["pacs"]

[[rules]]
name = "t2-trial"
match = { SeriesDescription = "(?i)\\\\bt2\\\\b" }
model = "previous"
destinations = ["test-pacs"]
review = true
"""


@pytest.fixture
def shadow(orthanc_factory: Callable[..., Orthanc], node_port: int) -> Orthanc:
    return orthanc_factory(aet="TESTPACS", modalities={NODE_AET: Modality(NODE_AET, node_port)})


@pytest.fixture
def node(tmp_path: Path, orthanc: Orthanc, shadow: Orthanc, node_port: int) -> Iterator[Node]:
    config = node_config(tmp_path, node_port, None)
    config.write_text(config.read_text() + f"""
[[destinations]]
name = "pacs"
ae_title = "{orthanc.aet}"
host = "127.0.0.1"
port = {orthanc.dicom_port}

[[destinations]]
name = "test-pacs"
ae_title = "{shadow.aet}"
host = "127.0.0.1"
port = {shadow.dicom_port}
shadow = true
""" + RULES)
    running = start_node(config, node_port, tmp_path / "node.log")
    yield running
    running.process.stop(timeout=60)


def _derived(series: dict[str, Any]) -> bool:
    return str(series["MainDicomTags"].get("SeriesDescription", "")).endswith("DENOISED")


def test_two_rules_two_models_a_shadow_and_a_held_series(node: Node, orthanc: Orthanc,
                                                        shadow: Orthanc, mr_series_factory,
                                                        tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    study = StudyInfo(seed=21)
    t1 = mr_series_factory(study=study, seed=1, series_number=3, series_description="T1 AX",
                           slices=6, rows=256, columns=224, noise_sigma=60.0)
    t2 = mr_series_factory(study=study, seed=2, series_number=4, series_description="T2 AX",
                           slices=5, rows=256, columns=224, noise_sigma=60.0)
    assert t1.study_uid == t2.study_uid
    for series in (t1, t2):
        storescu(series.directory, "127.0.0.1", node.port, "MODALITY", NODE_AET)

    derived_t1 = orthanc.wait_for_series(t1.study_uid, _derived, count=6, timeout=240)
    held = wait_until(lambda: node.jobs("held"), timeout=240, what="the T2 series held")
    (job,) = held
    assert job["series_uid"] == t2.series_uid and job["rule_name"] == "t2-trial"
    assert job["model_identity"] == read_card("unet25d-1.0").identity
    assert job["destinations"] == ["test-pacs"]
    time.sleep(2)  # nothing may reach the shadow before approval
    assert not [s for s in shadow.find_series(t2.study_uid) if _derived(s)]

    approved = node.cli("jobs", "approve", str(job["id"]))
    assert "approved" in approved.stdout
    derived_t2 = shadow.wait_for_series(t2.study_uid, _derived, count=5, timeout=120)

    # each PACS got only its rule's series
    assert [s["MainDicomTags"]["SeriesInstanceUID"] for s in orthanc.find_series(t1.study_uid)
            if _derived(s)] == [derived_t1["MainDicomTags"]["SeriesInstanceUID"]]
    assert [s["MainDicomTags"]["SeriesInstanceUID"] for s in shadow.find_series(t2.study_uid)
            if _derived(s)] == [derived_t2["MainDicomTags"]["SeriesInstanceUID"]]
    # and names the model that made it
    for pacs, derived, card in ((orthanc, derived_t1, read_card("default")),
                                (shadow, derived_t2, read_card("unet25d-1.0"))):
        (first,) = pacs.series_datasets(derived["MainDicomTags"]["SeriesInstanceUID"])[:1]
        assert card.identity in str(first.DerivationDescription)
    jobs = {j["series_uid"]: j for j in node.jobs()}
    assert jobs[t1.series_uid]["state"] == "done"
    assert jobs[t1.series_uid]["model_identity"] == read_card("default").identity
    assert jobs[t2.series_uid]["state"] == "done"
    assert pydicom.dcmread(t1.paths[0]).StudyInstanceUID == t2.study_uid
