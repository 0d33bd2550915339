"""One event a line: a browser that goes away, pynetdicom's own lines, accepted
associations."""

from __future__ import annotations

import io
import logging
import socket
import time
from collections.abc import Iterator

import pytest
from prometheus_client import CollectorRegistry
from pynetdicom import AE, debug_logger
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from denoised_node.config.settings import HttpSettings
from denoised_node.daemon.dicom.receive import Receiver
from denoised_node.daemon.dicom.scp import start_scp
from denoised_node.daemon.process.logs import TextFormatter, setup_logging
from denoised_node.daemon.web.endpoint import StatusServer
from denoised_node.daemon.web.probes import CheckResult, Readiness
from denoised_node.storage.runtime import open_runtime


@pytest.fixture
def root_log() -> Iterator[io.StringIO]:
    """What the node's handler writes, as the node sets it up."""
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    setup_logging("DEBUG")
    stream = io.StringIO()
    root.handlers[0].setStream(stream)  # type: ignore[attr-defined]
    yield stream
    root.handlers[:], _ = saved
    root.setLevel(saved[1])


class _SlowPages:
    def handle(self, request):  # type: ignore[no-untyped-def]
        from denoised_node.daemon.web.request import Response

        time.sleep(0.3)  # the browser has gone by the time the answer is written
        return Response(200, b"x" * 4_000_000)


def test_a_browser_that_disconnects_leaves_no_traceback(root_log: io.StringIO, capfd) -> None:  # type: ignore[no-untyped-def]
    server = StatusServer(HttpSettings(port=0), CollectorRegistry(),
                          Readiness([("x", lambda: CheckResult(True, "ok"))]),
                          pages=_SlowPages()).start()
    try:
        for _ in range(3):
            client = socket.create_connection(("127.0.0.1", server.port))
            client.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            client.setsockopt(
                socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00"
            )
            client.close()  # a reset, as a browser tab closed mid-page
        time.sleep(1.0)
    finally:
        server.shutdown()
    err = capfd.readouterr().err
    assert "Traceback" not in err and "Traceback" not in root_log.getvalue()
    for line in root_log.getvalue().splitlines():
        assert line.startswith("20")  # each line an event of the node's format


def test_pynetdicom_lines_go_through_the_node_format(root_log: io.StringIO, capfd) -> None:  # type: ignore[no-untyped-def]
    debug_logger()  # pynetdicom's own handler and format, as a library user might add
    setup_logging("DEBUG")
    logging.getLogger().handlers[0].setStream(root_log)  # type: ignore[attr-defined]
    logging.getLogger("pynetdicom.assoc").error("Association Rejected")
    assert capfd.readouterr().err == ""
    (line,) = root_log.getvalue().splitlines()
    assert " ERROR pynetdicom.assoc Association Rejected" in line


def test_an_accepted_association_is_logged_at_info(settings_factory, caplog) -> None:  # type: ignore[no-untyped-def]
    settings = settings_factory(node__port=0)
    runtime = open_runtime(settings, initialise_empty=True)
    server = start_scp(settings, Receiver(runtime.store, runtime.sessions, settings))
    try:
        ae = AE(ae_title="MODALITY")
        ae.add_requested_context(Verification)
        with caplog.at_level(logging.INFO, logger="denoised_node.daemon.dicom.scp"):
            assoc = ae.associate("127.0.0.1", server.server_address[1], ae_title="DENOISER")
            assert assoc.is_established
            assoc.release()
            time.sleep(0.2)
    finally:
        server.shutdown()
    (record,) = [r for r in caplog.records if r.getMessage() == "association accepted"]
    assert record.levelno == logging.INFO
    assert (record.calling_ae, record.called_ae) == ("MODALITY", "DENOISER")  # type: ignore[attr-defined]
    assert "patient" not in TextFormatter().format(record).lower()
