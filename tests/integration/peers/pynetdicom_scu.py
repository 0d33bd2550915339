"""A pynetdicom sender for what storescu refuses to send (truncated or odd files)."""

from __future__ import annotations

import socket
from pathlib import Path

from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, build_context

from denoised_node.daemon.dicom.network_options import keep_responses_for_the_caller

NO_ANSWER = -1  # the association was aborted or the peer did not answer


def send_files(
    paths: list[Path], host: str, port: int, calling: str, called: str, *, timeout: float = 30.0
) -> list[int]:
    """C-STORE each file's bytes as they are, in one association, with TCP_NODELAY.

    pynetdicom sends a file given by path without decoding it, so a truncated file goes out
    truncated. Returns the DIMSE status of each file (NO_ANSWER once the peer aborted).
    """
    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    contexts: dict[str, set[str]] = {}
    for path in paths:
        meta = dcmread(path, stop_before_pixels=True, force=True).file_meta
        syntaxes = contexts.setdefault(str(meta.MediaStorageSOPClassUID), set())
        syntaxes.update(
            {str(meta.TransferSyntaxUID), ExplicitVRLittleEndian, ImplicitVRLittleEndian}
        )
    ae.requested_contexts = [build_context(sop, sorted(ts)) for sop, ts in contexts.items()]
    assoc = ae.associate(host, port, ae_title=called)
    if not assoc.is_established:
        raise ConnectionError(f"association to {called}@{host}:{port} was not established")
    # The node's own workaround for pynetdicom's reactor taking C-STORE responses.
    keep_responses_for_the_caller(assoc)
    if assoc.dul.socket is not None and assoc.dul.socket.socket is not None:
        assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    statuses: list[int] = []
    try:
        for path in paths:
            if not assoc.is_established:
                statuses.append(NO_ANSWER)
                continue
            status = assoc.send_c_store(Path(path))
            statuses.append(int(status.Status) if status and "Status" in status else NO_ANSWER)
    finally:
        if assoc.is_established:
            assoc.release()
    return statuses
