"""DICOM TLS against real peers: DCMTK storescu +tls into the node's TLS port (mutual TLS),
pynetdicom clients with good and bad certificates, and the node's sends to a DCMTK storescp
that requires TLS. Every certificate is made by the test (tests/fixtures/certificates.py)."""

from __future__ import annotations

import socket
import ssl
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pynetdicom import AE
from pynetdicom.sop_class import MRImageStorage, Verification  # type: ignore[attr-defined]
from sqlalchemy import func, select

from denoised_node.config.settings import ConfigError, Settings, load_settings
from denoised_node.daemon.dicom.receive import Receiver
from denoised_node.daemon.dicom.scp import ScpListeners, start_scp
from denoised_node.daemon.dicom.scu import SendError, echo, send_files
from denoised_node.storage.models import Instance
from denoised_node.storage.runtime import Runtime, open_runtime
from tests.fixtures.certificates import Credentials, TestCA
from tests.integration.peers import StoreSCP, storescu

NODE_AET = "DENOISER"


@dataclass(frozen=True)
class PKI:
    ca: TestCA
    node: Credentials
    modality: Credentials
    rogue_ca: TestCA
    rogue: Credentials


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    directory = tmp_path_factory.mktemp("pki")
    ca = TestCA.create(directory / "ca")
    rogue_ca = TestCA.create(directory / "rogue", name="rogue-ca")
    return PKI(ca, ca.issue("node"), ca.issue("modality", server=False),
               rogue_ca, rogue_ca.issue("rogue"))


def _settings(tmp_path: Path, pki: PKI, **env: str) -> Settings:
    base = {"DENOISED_NODE_NODE__DATA_DIR": str(tmp_path / "data"),
            "DENOISED_NODE_NODE__PORT": "0", "DENOISED_NODE_NODE__MIN_FREE_MB": "0",
            "DENOISED_NODE_NODE__ACSE_TIMEOUT": "5",
            "DENOISED_NODE_TLS__ENABLED": "true", "DENOISED_NODE_TLS__PORT": "0",
            "DENOISED_NODE_TLS__CERTIFICATE": str(pki.node.certificate),
            "DENOISED_NODE_TLS__PRIVATE_KEY": str(pki.node.private_key),
            "DENOISED_NODE_TLS__CA_CERTIFICATES": str(pki.ca.certificate)}
    base.update({f"DENOISED_NODE_{key.upper()}": value for key, value in env.items()})
    return load_settings(None, environ=base)


@dataclass
class RunningSCP:
    runtime: Runtime
    listeners: ScpListeners

    def stored(self) -> int:
        with self.runtime.sessions() as session:
            return int(session.scalar(select(func.count()).select_from(Instance)) or 0)


@pytest.fixture
def scp_factory(tmp_path: Path, pki: PKI) -> Iterator[Callable[..., RunningSCP]]:
    started: list[ScpListeners] = []

    def start(**env: str) -> RunningSCP:
        settings = _settings(tmp_path, pki, **env)
        runtime = open_runtime(settings, initialise_empty=True)
        listeners = start_scp(settings, Receiver(runtime.store, runtime.sessions, settings))
        started.append(listeners)
        return RunningSCP(runtime, listeners)

    yield start
    for listeners in started:
        listeners.shutdown()


def _client_context(pki: PKI, credentials: Credentials | None) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(pki.ca.certificate))
    if credentials is not None:
        context.load_cert_chain(credentials.certificate, credentials.private_key)
    return context


def _associate(port: int, tls: tuple[ssl.SSLContext, str] | None, *contexts: Any) -> Any:
    ae = AE(ae_title="MODALITY")
    ae.acse_timeout = ae.network_timeout = ae.connection_timeout = 10
    for context in contexts or (Verification,):
        ae.add_requested_context(context)
    return ae.associate("127.0.0.1", port, ae_title=NODE_AET, tls_args=tls)


def test_storescu_sends_a_series_over_mutual_tls(scp_factory: Callable[..., RunningSCP],
                                                 pki: PKI, mr_series: Any) -> None:
    scp = scp_factory()
    done = storescu(mr_series.directory, "127.0.0.1", scp.listeners.port("tls"), "MODALITY",
                    NODE_AET, ["+tls", str(pki.modality.private_key),
                               str(pki.modality.certificate), "+cf", str(pki.ca.certificate)])
    assert done.returncode == 0
    assert scp.stored() == len(mr_series.paths)
    # The plain port is still there beside it.
    assert scp.listeners.port("plain") != scp.listeners.port("tls")


def test_storescu_without_a_client_certificate_is_refused(
        scp_factory: Callable[..., RunningSCP], pki: PKI, mr_series: Any) -> None:
    scp = scp_factory()
    port = scp.listeners.port("tls")
    anonymous = storescu(mr_series.directory, "127.0.0.1", port, "MODALITY", NODE_AET,
                         ["+tla", "+cf", str(pki.ca.certificate)], check=False)
    plain = storescu(mr_series.directory, "127.0.0.1", port, "MODALITY", NODE_AET, check=False,
                     timeout=60)
    assert anonymous.returncode != 0 and plain.returncode != 0
    assert scp.stored() == 0


def test_storescu_that_does_not_trust_the_node_stops(
        scp_factory: Callable[..., RunningSCP], pki: PKI, mr_series: Any) -> None:
    scp = scp_factory()
    done = storescu(mr_series.directory, "127.0.0.1", scp.listeners.port("tls"), "MODALITY",
                    NODE_AET, ["+tls", str(pki.modality.private_key),
                               str(pki.modality.certificate), "+cf",
                               str(pki.rogue_ca.certificate)], check=False)
    assert done.returncode != 0
    assert scp.stored() == 0


def test_pynetdicom_client_certificates(scp_factory: Callable[..., RunningSCP], pki: PKI,
                                       mr_series: Any) -> None:
    scp = scp_factory()
    port = scp.listeners.port("tls")
    good = _associate(port, (_client_context(pki, pki.modality), "127.0.0.1"), MRImageStorage)
    assert good.is_established
    assert good.send_c_store(mr_series.paths[0]).Status == 0
    assert isinstance(good.dul.socket.socket, ssl.SSLSocket)
    good.release()
    for credentials in (None, pki.rogue):  # no certificate, or one from another CA
        bad = _associate(port, (_client_context(pki, credentials), "127.0.0.1"))
        assert not bad.is_established
    assert scp.stored() == 1


def test_handshake_failures_and_tls_associations_are_counted(tmp_path: Path, pki: PKI) -> None:
    from prometheus_client import generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from denoised_node.daemon.web.metrics import node_registry

    settings = _settings(tmp_path, pki)
    runtime = open_runtime(settings, initialise_empty=True)
    registry, counts = node_registry(runtime.sessions, postgres=False)
    listeners = start_scp(settings, Receiver(runtime.store, runtime.sessions, settings), counts)
    try:
        port = listeners.port("tls")
        assert not _associate(port, (_client_context(pki, pki.rogue), "127.0.0.1")).is_established
        good = _associate(port, (_client_context(pki, pki.modality), "127.0.0.1"))
        good.release()
    finally:
        listeners.shutdown()
    found = {(s.name, tuple(sorted(s.labels.items()))): s.value
             for f in text_string_to_metric_families(generate_latest(registry).decode())
             for s in f.samples}
    name = "denoised_node_associations_total"
    assert found[(name, (("result", "handshake_failed"), ("transport", "tls")))] == 1
    assert found[(name, (("result", "accepted"), ("transport", "tls")))] == 1


def test_without_client_verification_any_tls_client_may_associate(
        scp_factory: Callable[..., RunningSCP], pki: PKI) -> None:
    scp = scp_factory(tls__require_client_certificate="false", tls__plain_port="false")
    assert list(scp.listeners.servers) == ["tls"]
    assoc = _associate(scp.listeners.port("tls"), (_client_context(pki, None), "localhost"))
    assert assoc.is_established
    assert assoc.send_c_echo().Status == 0
    assoc.release()


def test_a_silent_client_does_not_stall_the_tls_port(scp_factory: Callable[..., RunningSCP],
                                                     pki: PKI) -> None:
    scp = scp_factory()
    port = scp.listeners.port("tls")
    with socket.create_connection(("127.0.0.1", port)):  # connects, never says hello
        assoc = _associate(port, (_client_context(pki, pki.modality), "127.0.0.1"))
        assert assoc.is_established
        assoc.release()


def test_tls_files_that_do_not_load_are_a_clear_error(tmp_path: Path, pki: PKI) -> None:
    missing = _settings(tmp_path, pki, tls__private_key=str(tmp_path / "nope.key"))
    runtime = open_runtime(missing, initialise_empty=True)
    with pytest.raises(ConfigError, match=r"tls\.private_key .*nope\.key cannot be read"):
        start_scp(missing, Receiver(runtime.store, runtime.sessions, missing))
    mismatched = _settings(tmp_path, pki, tls__private_key=str(pki.modality.private_key))
    with pytest.raises(ConfigError, match=r"do not load as a PEM certificate and its"):
        start_scp(mismatched, Receiver(runtime.store, runtime.sessions, mismatched))
    with pytest.raises(ConfigError, match=r"tls\.enabled needs certificate, private_key"):
        load_settings(None, environ={"DENOISED_NODE_TLS__ENABLED": "true"})


@pytest.fixture
def tls_storescp(storescp_factory: Callable[..., StoreSCP], pki: PKI) -> StoreSCP:
    """DCMTK storescp that speaks TLS only and requires a client certificate from the CA."""
    return storescp_factory(extra_args=("+tls", str(pki.node.private_key),
                                        str(pki.node.certificate), "+cf",
                                        str(pki.ca.certificate), "-rc"))


def _destination_env(scp: StoreSCP, **extra: Any) -> str:
    import json

    return json.dumps([{"name": "dcmtk", "ae_title": scp.aet, "host": "127.0.0.1",
                        "port": scp.port, "tls": True, **extra}])


def test_node_sends_over_mutual_tls(tmp_path: Path, pki: PKI, tls_storescp: StoreSCP,
                                    mr_series: Any) -> None:
    settings = _settings(tmp_path, pki, destinations=_destination_env(tls_storescp))
    destination = settings.destination("dcmtk")
    assert echo(settings, destination) == 0
    result = send_files(settings, destination, mr_series.paths)
    assert result.sent == len(mr_series.paths)
    received = sorted(tls_storescp.directory.rglob("*"))
    uids = {pydicom.dcmread(p).SOPInstanceUID for p in received if p.is_file()}
    assert uids == set(mr_series.sop_instance_uids)


def test_node_refuses_a_destination_it_cannot_verify(tmp_path: Path, pki: PKI,
                                                     tls_storescp: StoreSCP) -> None:
    # Trusting only the rogue CA, the node must not talk to the real storescp...
    distrust = _settings(tmp_path, pki, destinations=_destination_env(tls_storescp),
                         tls__ca_certificates=str(pki.rogue_ca.certificate))
    with pytest.raises(SendError, match=r"dcmtk \(STORESCP@127\.0\.0\.1:\d+, TLS\): association "
                                        r"failed: TLS handshake failed"):
        echo(distrust, distrust.destination("dcmtk"))
    # ...nor to a server whose certificate does not name the host it dialled.
    misnamed = _settings(tmp_path, pki, destinations=_destination_env(tls_storescp).replace(
        "127.0.0.1", "127.0.0.2"))
    with pytest.raises(SendError, match="association failed"):
        echo(misnamed, misnamed.destination("dcmtk"))
