"""Bad input over the network: every one gets a clear status, nothing half-kept, the SCP
keeps serving. Includes a hypothesis fuzzer of mutated datasets."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pydicom
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pynetdicom import AE
from pynetdicom.sop_class import MRImageStorage, Verification  # type: ignore[attr-defined]
from sqlalchemy import select

from denoised_node.config.settings import Settings
from denoised_node.daemon.dicom.dimse_status import Status
from denoised_node.daemon.dicom.network_options import keep_responses_for_the_caller
from denoised_node.daemon.dicom.receive import Receiver
from denoised_node.daemon.dicom.scp import start_scp
from denoised_node.daemon.jobs.completion import complete_idle_series
from denoised_node.daemon.jobs.worker import Worker
from denoised_node.storage.models import Instance, Job, Series
from denoised_node.storage.runtime import Runtime, open_runtime
from denoised_node.storage.schema import SchemaOutOfDate


@pytest.fixture
def scp(settings_factory) -> Iterator[tuple[Runtime, int]]:  # type: ignore[no-untyped-def]
    settings: Settings = settings_factory(node__port=0)
    runtime = open_runtime(settings, initialise_empty=True)
    server = start_scp(settings, Receiver(runtime.store, runtime.sessions, settings))
    yield runtime, server.server_address[1]
    server.shutdown()


def _assoc(port: int):  # type: ignore[no-untyped-def]
    ae = AE(ae_title="FUZZER")
    ae.add_requested_context(MRImageStorage)
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title="DENOISER")
    assert assoc.is_established
    keep_responses_for_the_caller(assoc)  # pynetdicom's response race (see network.py)
    return assoc


def test_free_space_under_watermark_refuses_then_resumes(scp, mr_series, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    runtime, port = scp
    monkeypatch.setattr(runtime.store, "free_bytes", lambda: 0)
    store = runtime.store
    store.min_free_bytes = 1
    assoc = _assoc(port)
    assert assoc.send_c_store(mr_series.paths[0]).Status == Status.OUT_OF_RESOURCES
    assert not list(store.instances.rglob("*.dcm")) and not list(store.incoming.iterdir())
    monkeypatch.setattr(runtime.store, "free_bytes", lambda: 10**12)
    assert assoc.send_c_store(mr_series.paths[0]).Status == Status.SUCCESS
    assoc.release()


def test_instance_without_pixel_data_or_geometry_is_ignored_with_the_reason(  # type: ignore[no-untyped-def]
        scp, mr_series_factory, tmp_path: Path, fake_denoiser) -> None:
    """An MR image without Pixel Data is refused (it is how a dataset cut at an element
    boundary looks); one without geometry is kept, then left out with the reason."""
    runtime, port = scp
    source = mr_series_factory(slices=3)
    assoc = _assoc(port)
    for index, path in enumerate(source.paths):
        ds = pydicom.dcmread(path)
        if index == 0:
            del ds.PixelData
            assert assoc.send_c_store(ds).Status == Status.CANNOT_UNDERSTAND
            continue
        del ds.ImagePositionPatient
        assert assoc.send_c_store(ds).Status == Status.SUCCESS
    assoc.release()
    with runtime.sessions.begin() as session:
        session.scalars(select(Series)).one().last_received_at -= timedelta(minutes=1)
    complete_idle_series(runtime.sessions, runtime.settings.series)
    Worker(runtime.settings, runtime.sessions, runtime.store, fake_denoiser,
           sender=lambda *a, **k: None).run(burst=True)  # type: ignore[arg-type, return-value]
    with runtime.sessions() as session:
        job = session.scalars(select(Job)).one()
    assert job.state == "ignored"
    assert "geometry" in (job.reason or "")


def test_serve_refuses_an_old_schema(settings_factory) -> None:  # type: ignore[no-untyped-def]
    from sqlalchemy import text

    from denoised_node.storage.db import make_engine

    settings = settings_factory()
    engine = make_engine(settings.database_url)
    with engine.begin() as connection:  # a database of some older release: tables, no version
        connection.execute(text("CREATE TABLE series (id INTEGER PRIMARY KEY)"))
    with pytest.raises(SchemaOutOfDate, match="denoised-node db upgrade"):
        open_runtime(settings, initialise_empty=True)


def _mutations() -> st.SearchStrategy[tuple[str, int, int]]:
    return st.tuples(st.sampled_from(["flip", "cut", "insert", "zero"]),
                     st.integers(0, 10**6), st.integers(1, 64))


def _mutate(data: bytes, kind: str, where: int, size: int) -> bytes:
    at = 132 + where % max(1, len(data) - 132)  # keep preamble and magic: reach the parser
    if kind == "flip":
        return data[:at] + bytes(b ^ 0xFF for b in data[at:at + size]) + data[at + size:]
    if kind == "cut":
        return data[:at]
    if kind == "insert":
        return data[:at] + bytes(range(size)) + data[at:]
    return data[:at] + b"\x00" * size + data[at + size:]


@settings(max_examples=80, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(mutation=_mutations())
def test_fuzzed_datasets_never_break_the_scp(scp, mr_series, tmp_path: Path,  # type: ignore[no-untyped-def]
                                             mutation) -> None:
    runtime, port = scp
    mutant = tmp_path / "mutant.dcm"
    mutant.write_bytes(_mutate(mr_series.paths[0].read_bytes(), *mutation))
    assoc = _assoc(port)
    try:
        # Given a path, pynetdicom sends the bytes after the file meta as they are.
        assoc.send_c_store(mutant)
    except Exception:  # noqa: BLE001, S110 - the mutant's file meta is unreadable: nothing sent
        pass
    if assoc.is_established:
        assoc.release()
    assert _assoc_echo_ok(port)  # the node keeps serving
    with runtime.sessions() as session:
        rows = session.scalars(select(Instance)).all()
    for row in rows:  # whatever was kept is whole and readable
        if not row.path:
            continue  # an ignored instance (a mutant of another modality) is indexed, not kept
        pydicom.dcmread(runtime.store.path(row.path)).SOPInstanceUID  # noqa: B018
    assert not list(runtime.store.incoming.iterdir())


def _assoc_echo_ok(port: int) -> bool:
    assoc = _assoc(port)
    ok = assoc.send_c_echo().Status == 0
    assoc.release()
    return ok
