"""daemon/dicom/scu.py against a pynetdicom SCP in this process: a file whose transfer syntax the
destination accepted goes as it is on disk (never decoded and encoded again); one it did
not accept is converted; the switch is off again after the send."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pydicom
import pynetdicom.association
import pytest
from pydicom.uid import ImplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom import _config as pynetdicom_config
from pynetdicom.sop_class import MRImageStorage  # type: ignore[attr-defined]

from denoised_node.config.settings import Destination, Settings
from denoised_node.daemon.dicom.scu import SendError, send_files
from tests.integration.peers import free_port


@pytest.fixture
def pacs() -> Iterator[tuple[int, list[Any]]]:
    """An SCP that accepts MR in Implicit VR Little Endian only; keeps what it gets."""
    received: list[Any] = []

    def keep(event: Any) -> int:
        received.append(event.dataset)
        return 0

    ae = AE(ae_title="PACS")
    ae.add_supported_context(MRImageStorage, ImplicitVRLittleEndian)
    port = free_port()
    server = ae.start_server(("127.0.0.1", port), block=False,
                             evt_handlers=[(evt.EVT_C_STORE, keep)])
    yield port, received
    server.shutdown()


def test_files_go_as_they_are_and_others_are_converted(
        pacs, settings: Settings, mr_series_factory,  # type: ignore[no-untyped-def]
        monkeypatch: pytest.MonkeyPatch) -> None:
    port, received = pacs
    implicit = mr_series_factory(transfer_syntax=str(ImplicitVRLittleEndian), slices=3, seed=5)
    explicit = mr_series_factory(slices=2, seed=6)  # Explicit VR LE: not accepted
    decoded: list[str] = []
    real_dcmread = pydicom.dcmread

    def counting_dcmread(path: Any, *args: Any, **kwargs: Any) -> Any:
        decoded.append(str(path))
        return real_dcmread(path, *args, **kwargs)

    monkeypatch.setattr(pynetdicom.association, "dcmread", counting_dcmread)
    monkeypatch.setattr("denoised_node.daemon.dicom.scu.pydicom.dcmread", counting_dcmread)
    destination = Destination(name="pacs", ae_title="PACS", host="127.0.0.1", port=port)
    result = send_files(settings, destination, implicit.paths + explicit.paths)
    assert result.sent == 5 and len(received) == 5
    assert sorted(decoded) == sorted(str(p) for p in explicit.paths)  # converted ones only
    sent_uids = {str(ds.SOPInstanceUID) for ds in received}
    assert sent_uids == {i.sop_instance_uid for i in implicit.instances + explicit.instances}
    assert pynetdicom_config.STORE_SEND_CHUNKED_DATASET is False


def test_several_associations_share_a_series(pacs, settings_factory,  # type: ignore[no-untyped-def]
                                             mr_series_factory) -> None:
    port, received = pacs
    series = mr_series_factory(transfer_syntax=str(ImplicitVRLittleEndian), slices=7, seed=8)
    settings = settings_factory(send__associations=3)
    seen: list[tuple[int, int]] = []
    destination = Destination(name="pacs", ae_title="PACS", host="127.0.0.1", port=port)
    result = send_files(settings, destination, series.paths,
                        progress=lambda sent, total: seen.append((sent, total)))
    assert result.sent == 7
    assert sorted(str(ds.SOPInstanceUID) for ds in received) == sorted(
        i.sop_instance_uid for i in series.instances)
    assert [sent for sent, _ in seen] == list(range(1, 8)) and {t for _, t in seen} == {7}


def test_a_refusal_on_one_association_fails_the_send(settings_factory,  # type: ignore[no-untyped-def]
                                                     mr_series_factory) -> None:
    series = mr_series_factory(transfer_syntax=str(ImplicitVRLittleEndian), slices=8, seed=9)
    refused = series.instances[5].sop_instance_uid

    def keep_but_one(event: Any) -> int:
        return 0xA700 if str(event.request.AffectedSOPInstanceUID) == refused else 0

    ae = AE(ae_title="PACS")
    ae.add_supported_context(MRImageStorage, ImplicitVRLittleEndian)
    port = free_port()
    server = ae.start_server(("127.0.0.1", port), block=False,
                             evt_handlers=[(evt.EVT_C_STORE, keep_but_one)])
    try:
        destination = Destination(name="pacs", ae_title="PACS", host="127.0.0.1", port=port)
        with pytest.raises(SendError, match="0xA700"):
            send_files(settings_factory(send__associations=2), destination, series.paths)
    finally:
        server.shutdown()


# -- why an association failed: the cause, and what to fix ----------------------------------

def _echo_error(settings_factory, port: int) -> SendError:  # type: ignore[no-untyped-def]
    from denoised_node.daemon.dicom.scu import echo

    settings = settings_factory(node__acse_timeout=2)
    destination = Destination(name="pacs", ae_title="PACS", host="127.0.0.1", port=port)
    with pytest.raises(SendError) as raised:
        echo(settings, destination)
    return raised.value


def test_a_refused_connection_says_so(settings_factory) -> None:  # type: ignore[no-untyped-def]
    port = free_port()
    error = _echo_error(settings_factory, port)
    assert str(error) == f"pacs (PACS@127.0.0.1:{port}): association failed: connection refused"
    assert error.fix.startswith(f"nothing listens on 127.0.0.1:{port}") and not error.permanent


def test_a_connection_that_times_out_says_so(settings_factory, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import socket

    def silent(address: object, timeout: float) -> socket.socket:
        raise TimeoutError("timed out")  # a host that drops the SYN, as a firewall does

    monkeypatch.setattr(socket, "create_connection", silent)
    monkeypatch.setattr(socket.socket, "connect", lambda self, address: silent(address, 2))
    error = _echo_error(settings_factory, free_port())
    assert "association failed: timed out: no answer within 2 s" in str(error)
    assert "is reachable from this host" in error.fix and not error.permanent


def test_a_port_that_does_not_speak_dicom_says_so(settings_factory) -> None:  # type: ignore[no-untyped-def]
    import socket
    import threading

    listener = socket.create_server(("127.0.0.1", 0))

    def web_server() -> None:
        connection, _ = listener.accept()
        with connection:
            connection.recv(65536)
            connection.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
            connection.recv(1)  # until the node gives up

    thread = threading.Thread(target=web_server, daemon=True)
    thread.start()
    try:
        error = _echo_error(settings_factory, listener.getsockname()[1])
    finally:
        listener.close()
    assert "association failed: the peer does not speak DICOM" in str(error)
    assert "is not a DICOM port" in error.fix and "port of destination pacs" in error.fix
