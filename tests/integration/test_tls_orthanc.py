"""A PACS over DICOM TLS, both ways: Orthanc (DicomTlsEnabled, client certificates required)
and `denoised-node serve` with its TLS port. A modality sends over TLS (DCMTK storescu +tls),
the node sends the derived series to Orthanc over TLS, and Orthanc pushes a series to the
node's TLS port. Certificates are made by the test."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.fixtures.certificates import Credentials, TestCA
from tests.integration.node import NODE_AET, Node, node_config, start_node
from tests.integration.peers import ManagedProcess, free_port, nodelay_env, storescu, wait_until
from tests.integration.peers.orthanc import Modality, Orthanc, orthanc_config
from tests.integration.peers.tools import require_tool

pytestmark = pytest.mark.slow


@dataclass(frozen=True)
class PKI:
    ca: TestCA
    node: Credentials
    orthanc: Credentials
    modality: Credentials


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    ca = TestCA.create(tmp_path_factory.mktemp("orthanc-pki"))
    return PKI(ca, ca.issue("node"), ca.issue("orthanc"), ca.issue("modality", server=False))


def start_tls_orthanc(workdir: Path, pki: PKI, node_tls_port: int) -> Orthanc:
    """Orthanc whose DICOM port speaks TLS only (start_orthanc checks it with a plain C-ECHO,
    so this one waits for its REST API)."""
    workdir.mkdir(parents=True, exist_ok=True)
    dicom_port, http_port = free_port(), free_port()
    config = orthanc_config(
        workdir, aet="ORTHANC", dicom_port=dicom_port, http_port=http_port,
        modalities={}, overwrite_instances=False, stable_age=2,
        extra={"DicomTlsEnabled": True,
               "DicomTlsCertificate": str(pki.orthanc.certificate),
               "DicomTlsPrivateKey": str(pki.orthanc.private_key),
               "DicomTlsTrustedCertificates": str(pki.ca.certificate),
               "DicomTlsRemoteCertificateRequired": True,
               "DicomModalities": {NODE_AET: {**Modality(NODE_AET, node_tls_port).as_config(),
                                              "UseDicomTls": True}}})
    (workdir / "orthanc.json").write_text(json.dumps(config, indent=2))
    process = ManagedProcess.start(
        [require_tool("Orthanc"), f"--logfile={workdir / 'orthanc.log'}",
         str(workdir / "orthanc.json")], log=workdir / "orthanc.stdout", env=nodelay_env(),
        cwd=workdir)
    orthanc = Orthanc("ORTHANC", dicom_port, http_port, workdir, process)

    def answers() -> bool:
        try:
            return process.check_alive() and requests.get(orthanc.url + "/system",
                                                          timeout=2).status_code == 200
        except requests.RequestException:
            return False

    wait_until(answers, timeout=60, what="Orthanc's REST API")
    return orthanc


@pytest.fixture
def tls_pair(tmp_path: Path, pki: PKI) -> Iterator[tuple[Node, Orthanc, int]]:
    node_port, node_tls_port = free_port(), free_port()
    orthanc = start_tls_orthanc(tmp_path / "orthanc", pki, node_tls_port)
    config = node_config(
        tmp_path, node_port, None,
        node={"allowed_calling_ae_titles": ["MODALITY", "ORTHANC", "ECHOSCU"]},
        gate={"enabled": False},  # this test is about the transport, not the model
        tls={"enabled": True, "port": node_tls_port,
             "certificate": str(pki.node.certificate),
             "private_key": str(pki.node.private_key),
             "ca_certificates": str(pki.ca.certificate)})
    with config.open("a") as out:
        out.write(f'\n[[destinations]]\nname = "orthanc"\nae_title = "ORTHANC"\n'
                  f'host = "127.0.0.1"\nport = {orthanc.dicom_port}\ntls = true\n')
    node = start_node(config, node_port, tmp_path / "node.log")
    yield node, orthanc, node_tls_port
    node.process.stop(timeout=60)
    orthanc.process.stop()


def test_pacs_over_tls_both_ways(tls_pair: tuple[Node, Orthanc, int], pki: PKI,
                                 mr_series_factory: Any) -> None:
    node, orthanc, tls_port = tls_pair
    assert "destination orthanc: ok: C-ECHO status 0x0000" in node.cli(
        "doctor", check=False).stdout

    # A modality sends over TLS; the derived series reaches Orthanc over TLS.
    source = mr_series_factory(slices=8, rows=96, columns=96)
    storescu(source.directory, "127.0.0.1", tls_port, "MODALITY", NODE_AET,
             ["+tls", str(pki.modality.private_key), str(pki.modality.certificate),
              "+cf", str(pki.ca.certificate)])
    orthanc.wait_for_series(source.study_uid, lambda s: s["MainDicomTags"].get(
        "SeriesDescription", "").endswith("DENOISED"), count=8, timeout=240)

    # Orthanc pushes a series (the derived one, which the node recognises and ignores) to the
    # node's TLS port: accepted over mutual TLS.
    derived = orthanc.find_series(source.study_uid)
    answer = orthanc.post(f"/modalities/{NODE_AET}/store",
                          {"Resources": [derived[0]["ID"]], "Synchronous": True})
    assert answer["FailedInstancesCount"] == 0 and answer["InstancesCount"] >= 1
    log = node.log()
    assert "transport=tls" in log and "TLS handshake failed" not in log
