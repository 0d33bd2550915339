"""End to end with real peers: DCMTK storescu (the modality) sends a generated MR series to
`denoised-node serve`, which denoises it with the shipped model and sends the derived series
to real Orthanc (the PACS). Everything that comes back is read and checked."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest

from tests.integration.node import NODE_AET, Node, node_config, start_node
from tests.integration.peers import Orthanc, dciodvfy, storescu

pytestmark = pytest.mark.slow


@pytest.fixture
def node(tmp_path: Path, orthanc: Orthanc, node_port: int) -> Iterator[Node]:
    config = node_config(tmp_path, node_port, orthanc)
    running = start_node(config, node_port, tmp_path / "node.log")
    yield running
    running.process.stop(timeout=60)


def _rmse(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.sqrt(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)))


def test_series_comes_back_denoised_beside_the_original(node: Node, orthanc: Orthanc,
                                                         mr_series_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    source = mr_series_factory(slices=16, rows=256, columns=224, noise_sigma=60.0, shuffle=True)
    storescu(source.directory, "127.0.0.1", node.port, "MODALITY", NODE_AET)

    derived = orthanc.wait_for_series(
        source.study_uid, lambda s: s["MainDicomTags"].get("SeriesDescription", "").endswith(
            "DENOISED"), count=16, timeout=240)
    assert derived["MainDicomTags"]["SeriesInstanceUID"] != source.series_uid
    files = orthanc.download_series(derived["MainDicomTags"]["SeriesInstanceUID"],
                                    tmp_path / "derived")
    sources = {pydicom.dcmread(p).SOPInstanceUID: pydicom.dcmread(p) for p in source.paths}
    by_uid = {i.sop_instance_uid: i for i in source.instances}
    referenced = set()
    noisy_error, denoised_error = [], []
    for path in files:
        ds = pydicom.dcmread(path)
        ref = ds.SourceImageSequence[0].ReferencedSOPInstanceUID
        referenced.add(ref)
        src = sources[ref]
        assert ds.SOPClassUID == src.SOPClassUID
        assert ds.StudyInstanceUID == src.StudyInstanceUID
        assert ds.FrameOfReferenceUID == src.FrameOfReferenceUID
        assert list(ds.ImageType[:2]) == ["DERIVED", "SECONDARY"]
        assert ds.ImagePositionPatient == src.ImagePositionPatient
        assert ds.ImageOrientationPatient == src.ImageOrientationPatient
        assert ds.ContributingEquipmentSequence[-1].Manufacturer == "denoised-node"
        assert dciodvfy(path) == [], f"dciodvfy errors in {path.name}"
        generated = by_uid[ref]
        noisy_error.append(_rmse(generated.stored, generated.clean_stored))
        denoised_error.append(_rmse(ds.pixel_array, generated.clean_stored))
    assert referenced == set(source.sop_instance_uids)
    # The shipped model denoises for real: closer to the clean phantom than the input was.
    assert np.mean(denoised_error) < 0.8 * np.mean(noisy_error)

    source_volume = hd.get_volume_from_series(list(sources.values()))
    derived_volume = hd.get_volume_from_series([pydicom.dcmread(p) for p in files])
    assert derived_volume.geometry_equal(source_volume)

    (job,) = node.jobs("done")
    assert job["series_uid"] == source.series_uid and job["derived_count"] == 16


def test_sigterm_stops_the_node_cleanly(node: Node) -> None:
    node.process.popen.send_signal(signal.SIGTERM)
    assert node.process.popen.wait(60) == 0
    assert "node stopped" in node.log()
