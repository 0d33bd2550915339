"""The SCP in this process on a free port, driven by a pynetdicom SCU."""

from __future__ import annotations

import errno
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage, MRImageStorage, Verification  # type: ignore[attr-defined]
from sqlalchemy import select

from denoised_node.config.settings import Settings
from denoised_node.daemon.dicom.dimse_status import Status
from denoised_node.daemon.dicom.network_options import keep_responses_for_the_caller
from denoised_node.daemon.dicom.receive import Receiver
from denoised_node.daemon.dicom.scp import start_scp
from denoised_node.daemon.dicom.spool import Spool
from denoised_node.storage.models import Instance, Job, JobEvent, Series
from denoised_node.storage.queue import EventKind, enqueue
from denoised_node.storage.runtime import Runtime, open_runtime


@pytest.fixture
def node(settings_factory) -> Iterator[tuple[Runtime, int]]:  # type: ignore[no-untyped-def]
    settings: Settings = settings_factory(
        node__port=0, node__allowed_calling_ae_titles='["MOD", "PACS"]'
    )
    runtime = open_runtime(settings, initialise_empty=True)
    server = start_scp(settings, Receiver(runtime.store, runtime.sessions, settings))
    yield runtime, server.server_address[1]
    server.shutdown()


def _associate(port: int, contexts: list[Any], calling: str = "MOD", called: str = "DENOISER"):  # type: ignore[no-untyped-def]
    ae = AE(ae_title=calling)
    for context in contexts:
        ae.add_requested_context(context)
    assoc = ae.associate("127.0.0.1", port, ae_title=called)
    if assoc.is_established:
        keep_responses_for_the_caller(assoc)  # pynetdicom's response race (see network.py)
    return assoc


def test_echo(node) -> None:  # type: ignore[no-untyped-def]
    _, port = node
    assoc = _associate(port, [Verification])
    assert assoc.is_established
    assert assoc.send_c_echo().Status == 0
    assoc.release()


def test_store_series_over_the_network(node, mr_series) -> None:  # type: ignore[no-untyped-def]
    runtime, port = node
    assoc = _associate(port, [MRImageStorage])
    assert assoc.is_established
    for path in mr_series.paths:
        assert assoc.send_c_store(path).Status == Status.SUCCESS
    assoc.release()
    # The SCP marks the series released in its EVT_RELEASED handler, which may run just after
    # this side's release() returns: wait for it (a few seconds at most), then check.
    deadline = time.monotonic() + 10
    while True:
        with runtime.sessions() as session:
            series = session.scalars(select(Series)).one()
        if series.released_at is not None or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert series.instance_count == len(mr_series.paths)
    assert series.released_at is not None  # whole series in one released association


def test_other_sop_class_is_accepted_and_ignored(node, mr_series_factory) -> None:  # type: ignore[no-untyped-def]
    runtime, port = node
    ct = mr_series_factory(slices=1, sop_class_uid=CTImageStorage, modality="CT")
    assoc = _associate(port, [CTImageStorage])
    assert assoc.send_c_store(ct.paths[0]).Status == Status.SUCCESS
    assoc.release()
    with runtime.sessions() as session:
        assert session.scalars(select(Instance)).one().ignored_reason


def test_corrupt_dataset_gets_a_failure_status(node, mr_series, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    runtime, port = node
    ds = pydicom.dcmread(mr_series.paths[0])
    ds.PixelData = ds.PixelData[:100]  # lengths consistent, image too short
    assoc = _associate(port, [MRImageStorage])
    status = assoc.send_c_store(ds)
    assoc.release()
    assert status.Status == Status.CANNOT_UNDERSTAND
    with runtime.sessions() as session:
        assert session.scalars(select(Instance)).all() == []


def test_wrong_called_ae_title_is_rejected(node) -> None:  # type: ignore[no-untyped-def]
    _, port = node
    assoc = _associate(port, [Verification], called="SOMEONE")
    assert assoc.is_rejected


def test_calling_ae_title_not_allowed_is_rejected(node) -> None:  # type: ignore[no-untyped-def]
    _, port = node
    assoc = _associate(port, [Verification], calling="STRANGER")
    assert assoc.is_rejected


class _FullDisk:
    """A spool's file on a disk that fills after its first 4 KiB."""

    def __init__(self, file: Any) -> None:
        self._file, self._written = file, 0

    def write(self, data: Any) -> int:
        self._written += len(data)
        if self._written > 4096:
            raise OSError(errno.ENOSPC, "No space left on device")
        return int(self._file.write(data))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._file, name)


def test_a_disk_filling_while_receiving_is_answered_out_of_resources(  # type: ignore[no-untyped-def]
        node, mr_series, monkeypatch) -> None:
    """Issue 29, item 10: the write of a received dataset fails with ENOSPC. Answered 0xA700
    on an association that goes on (before: aborted with a traceback), and the temp file is
    gone at once (before: left in incoming/ until a restart)."""
    runtime, port = node
    opened = Spool.__init__

    def on_a_full_disk(self: Spool, *args: Any) -> None:
        opened(self, *args)
        self._file = _FullDisk(self._file)  # type: ignore[assignment]

    monkeypatch.setattr(Spool, "__init__", on_a_full_disk)
    assoc = _associate(port, [MRImageStorage, Verification])
    assert assoc.is_established
    try:
        status = assoc.send_c_store(mr_series.paths[0])
        assert status.get("Status") == Status.OUT_OF_RESOURCES
        assert assoc.send_c_echo().Status == 0  # the association goes on
    finally:
        assoc.release()
    assert not list(runtime.store.incoming.iterdir())
    assert not list(runtime.store.instances.rglob("*.dcm"))


def test_a_series_sent_again_unchanged_is_logged_and_noted_as_a_duplicate_delivery(  # type: ignore[no-untyped-def]
        node, mr_series, caplog) -> None:
    """Issue 30, item 12: a re-push of instances all kept already does nothing; it says so
    (log, and the series' job history that the page and `jobs show` print) and names replay."""
    runtime, port = node
    for _ in range(2):
        assoc = _associate(port, [MRImageStorage])
        for path in mr_series.paths:
            assert assoc.send_c_store(path).Status == Status.SUCCESS
        assoc.release()
        with runtime.sessions.begin() as session:
            series = session.scalars(select(Series)).one()
            if not session.scalars(select(Job)).first():
                enqueue(session, series, reason="series complete")
    deadline = time.monotonic() + 10  # the SCP's release handler runs on its own thread
    while not (notes := _notes(runtime)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(notes) == 1
    assert f"{len(mr_series.paths)} instance(s) sent again by MOD" in notes[0]
    assert f"denoised-node replay --series {series.series_uid}" in notes[0]
    assert any(r.getMessage().startswith("duplicate delivery") for r in caplog.records)


def _notes(runtime: Runtime) -> list[str]:
    with runtime.sessions() as session:
        return [e.reason for e in session.scalars(
            select(JobEvent).where(JobEvent.kind == EventKind.NOTE.value))]
