"""Issue 15, item 3: memory bounded by node.max_instance_mb. The SCP writes a dataset to a
file as its fragments arrive and stops keeping bytes past the limit, a PDU longer than the
node accepts ends the connection before it is read, and a deflated dataset is inflated only
up to the limit."""

from __future__ import annotations

import io
import socket
import subprocess
import sys
import textwrap
import tracemalloc
import zlib
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import DeflatedExplicitVRLittleEndian

from denoised_node.config.settings import Settings
from denoised_node.daemon.dicom.dimse_status import InstanceTooLarge, Status, status_for
from denoised_node.daemon.dicom.receive import Receiver
from denoised_node.daemon.dicom.scp import start_scp
from denoised_node.storage.runtime import Runtime, open_runtime

MR = "1.2.840.10008.5.1.4.1.1.4"
MiB = 2**20


@pytest.fixture
def small_limit_node(settings_factory) -> Iterator[tuple[Runtime, int]]:  # type: ignore[no-untyped-def]
    settings: Settings = settings_factory(node__port=0, node__max_instance_mb=2)
    runtime = open_runtime(settings, initialise_empty=True)
    server = start_scp(settings, Receiver(runtime.store, runtime.sessions, settings))
    yield runtime, server.port("plain")
    server.shutdown()


def _big_instance(source: Path, target: Path, side: int) -> Path:
    ds = pydicom.dcmread(source)
    ds.Rows = ds.Columns = side
    ds.PixelData = bytes(side * side * 2)
    ds.save_as(target, enforce_file_format=True)
    return target


_SEND = textwrap.dedent("""
    import sys
    from pynetdicom import AE
    ae = AE(ae_title="MOD")
    ae.add_requested_context("1.2.840.10008.5.1.4.1.1.4")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 60
    assoc = ae.associate("127.0.0.1", int(sys.argv[1]), ae_title="DENOISER")
    status = assoc.send_c_store(sys.argv[2])  # a path: read and sent fragment by fragment
    print(f"{int(status.Status):04X}" if "Status" in status else "none")
    assoc.release()
""")


def test_an_instance_over_the_limit_is_never_held_whole_in_memory(  # type: ignore[no-untyped-def]
        small_limit_node, mr_series, tmp_path: Path) -> None:
    """A 32 MiB instance against a 2 MiB limit: answered 0xA701, nothing kept, and the
    node's Python allocations never held more than a few MiB at once. The sender runs in a
    process of its own so that only the node is measured."""
    runtime, port = small_limit_node
    big = _big_instance(mr_series.paths[0], tmp_path / "big.dcm", 4096)
    tracemalloc.start()
    try:
        sent = subprocess.run([sys.executable, "-c", _SEND, str(port), str(big)],
                              capture_output=True, text=True, timeout=120, check=True)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert sent.stdout.strip() == f"{Status.OUT_OF_RESOURCES_TOO_LARGE:04X}"
    assert peak < 8 * MiB, f"the node held {peak / MiB:.0f} MiB at once"
    assert not list(runtime.store.instances.rglob("*.dcm"))
    assert not list(runtime.store.incoming.iterdir())


def test_a_pdu_longer_than_the_node_accepts_ends_the_connection(small_limit_node) -> None:  # type: ignore[no-untyped-def]
    """A P-DATA-TF header announcing 1 GiB: the node closes the connection instead of
    reading (and holding) what follows."""
    _, port = small_limit_node
    with socket.create_connection(("127.0.0.1", port), timeout=15) as sock:
        sock.sendall(b"\x04\x00" + (2**30).to_bytes(4, "big"))
        try:
            for _ in range(64):  # up to 64 MiB, 1 MiB at a time
                sock.sendall(bytes(MiB))
            closed = not sock.recv(1)
        except (ConnectionResetError, BrokenPipeError):
            closed = True
        except TimeoutError:
            closed = False
    assert closed


def _deflate_bomb(source: Path, inflated_mib: int) -> bytes:
    """A valid deflated MR dataset whose Pixel Data inflates to ``inflated_mib`` MiB of
    zeros; the deflated bytes are about a thousandth of that."""
    ds = pydicom.dcmread(source)
    side = int((inflated_mib * MiB // 2) ** 0.5)
    ds.Rows = ds.Columns = side
    del ds.PixelData
    head = io.BytesIO()
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    pydicom.dcmwrite(head, ds, enforce_file_format=True)  # meta + deflated dataset (no pixels)
    meta_end = 132 + 12 + int.from_bytes(head.getvalue()[140:144], "little")
    plain = pydicom.filebase.DicomBytesIO()
    plain.is_little_endian, plain.is_implicit_VR = True, False
    pydicom.filewriter.write_dataset(plain, ds)
    pixel_bytes = side * side * 2
    compressor = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    body = [compressor.compress(plain.getvalue()),
            compressor.compress(b"\xe0\x7f\x10\x00OW\x00\x00" + pixel_bytes.to_bytes(4, "little"))]
    chunk = bytes(MiB)
    for _ in range(pixel_bytes // MiB):
        body.append(compressor.compress(chunk))
    body.append(compressor.compress(bytes(pixel_bytes % MiB)))
    body.append(compressor.flush())
    return head.getvalue()[:meta_end] + b"".join(body)


def test_a_deflated_dataset_inflating_past_the_limit_is_refused(settings_factory,  # type: ignore[no-untyped-def]
                                                                mr_series) -> None:
    settings: Settings = settings_factory(node__max_instance_mb=4)
    runtime = open_runtime(settings, initialise_empty=True)
    bomb = _deflate_bomb(mr_series.paths[0], 256)
    assert len(bomb) < MiB
    receiver = Receiver(runtime.store, runtime.sessions, settings)
    tracemalloc.start()
    try:
        with pytest.raises(InstanceTooLarge, match="inflate") as refused:
            receiver.receive(bomb, MR, "MOD")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert status_for(refused.value) == Status.OUT_OF_RESOURCES_TOO_LARGE
    assert peak < 16 * MiB, f"the node held {peak / MiB:.0f} MiB at once"
    assert not list(runtime.store.instances.rglob("*.dcm"))
    # Under the limit, a deflated dataset is kept as it came.
    small = _deflate_bomb(mr_series.paths[0], 1)
    assert receiver.receive(small, MR, "MOD").ignored_reason is None


_ABORT_MIDWAY = textwrap.dedent("""
    import sys, threading
    from pynetdicom import AE
    from pynetdicom.dimse_messages import DIMSEMessage

    whole = DIMSEMessage.encode_msg

    def first_fragments(self, context_id, max_pdu):  # the command and two dataset fragments
        for number, primitive in enumerate(whole(self, context_id, max_pdu)):
            if number == 3:
                return
            yield primitive

    DIMSEMessage.encode_msg = first_fragments
    ae = AE(ae_title="MOD")
    ae.add_requested_context("1.2.840.10008.5.1.4.1.1.4")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 60
    assoc = ae.associate("127.0.0.1", int(sys.argv[1]), ae_title="DENOISER")
    sender = threading.Thread(target=assoc.send_c_store, args=(sys.argv[2],), daemon=True)
    sender.start()
    sender.join(2)  # waits for an answer that cannot come: the dataset is not whole
    assoc.abort()
""")


def test_a_dataset_cut_off_by_an_abort_leaves_no_temp_file(small_limit_node, mr_series,  # type: ignore[no-untyped-def]
                                                           tmp_path: Path) -> None:
    import time

    runtime, port = small_limit_node
    big = _big_instance(mr_series.paths[0], tmp_path / "big.dcm", 4096)
    subprocess.run([sys.executable, "-c", _ABORT_MIDWAY, str(port), str(big)],
                   capture_output=True, text=True, timeout=120, check=True)
    deadline = time.monotonic() + 15
    while list(runtime.store.incoming.iterdir()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not list(runtime.store.incoming.iterdir())
    assert not list(runtime.store.instances.rglob("*.dcm"))


# Issue 29, item 4: P-DATA that never makes a command. Sent raw on an agreed association:
# P-DATA-TF PDUs of 512 KiB, each one PDV (item length, context ID, control header, bytes).
_FLOOD = textwrap.dedent("""
    import sys
    from pynetdicom import AE
    ae = AE(ae_title="MOD")
    ae.add_requested_context("1.2.840.10008.1.1")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 60
    assoc = ae.associate("127.0.0.1", int(sys.argv[1]), ae_title="DENOISER")
    control, fragment = int(sys.argv[2]), bytes(512 * 1024)
    item = (2 + len(fragment)).to_bytes(4, "big") + bytes([1, control]) + fragment
    pdu = b"\\x04\\x00" + len(item).to_bytes(4, "big") + item
    raw = assoc.dul.socket.socket  # taken once: pynetdicom drops it when the node aborts
    try:
        for _ in range(int(sys.argv[3]) * 2):
            raw.sendall(pdu)
    except OSError:
        pass
    assoc.join(30)  # the node's A-ABORT (or its closing the connection) ends the association
    print("open" if assoc.is_alive() or assoc.is_established else "ended")
""")


@pytest.mark.parametrize("control", [0x00, 0x01], ids=["dataset_without_command",
                                                         "command_that_never_ends"])
def test_p_data_that_never_makes_a_command_is_not_held(small_limit_node, control: int) -> None:  # type: ignore[no-untyped-def]
    """24 MiB of dataset fragments with no command before them, or of command fragments
    none of them the last: the node aborts the association having held a few MiB (before:
    all of it, in pynetdicom's buffers)."""
    _, port = small_limit_node
    tracemalloc.start()
    try:
        sent = subprocess.run([sys.executable, "-c", _FLOOD, str(port), str(control), "24"],
                              capture_output=True, text=True, timeout=120, check=True)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 * MiB, f"the node held {peak / MiB:.0f} MiB at once"
    assert sent.stdout.strip() == "ended"
