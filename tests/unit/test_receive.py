from __future__ import annotations

import io
from collections import Counter
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import CTImageStorage
from sqlalchemy import select
from sqlalchemy.exc import OperationalError

from denoised_node.daemon.dicom.dimse_status import (
    InstanceTooLarge,
    SOPClassMismatch,
    Status,
    UnreadableDataset,
    status_for,
)
from denoised_node.daemon.dicom.receive import Receiver, parse_dataset
from denoised_node.storage.files import InvalidUID, OutOfSpace
from denoised_node.storage.images.derive import PRODUCER_MANUFACTURER
from denoised_node.storage.models import Instance, Series
from denoised_node.storage.runtime import Runtime

MR = "1.2.840.10008.5.1.4.1.1.4"


def _bytes(path: Path) -> bytes:
    return path.read_bytes()


def test_receive_keeps_file_and_index_row(runtime: Runtime, mr_series) -> None:  # type: ignore[no-untyped-def]
    receiver = Receiver(runtime.store, runtime.sessions, runtime.settings)
    for path in mr_series.paths:
        result = receiver.receive(_bytes(path), MR, "MODALITY")
        assert not result.duplicate and result.ignored_reason is None
    with runtime.sessions() as session:
        series = session.scalars(select(Series)).one()
        assert series.series_uid == mr_series.series_uid
        assert series.instance_count == len(mr_series.paths) == series.revision
        rows = session.scalars(select(Instance)).all()
    for row in rows:
        kept = runtime.store.path(row.path).read_bytes()
        assert pydicom.dcmread(runtime.store.path(row.path)).SOPInstanceUID == row.sop_instance_uid
        assert len(kept) == row.size_bytes


def test_same_instance_twice_is_stored_once(runtime: Runtime, mr_series) -> None:  # type: ignore[no-untyped-def]
    receiver = Receiver(runtime.store, runtime.sessions, runtime.settings)
    data = _bytes(mr_series.paths[0])
    receiver.receive(data, MR, "A")
    again = receiver.receive(data, MR, "A")
    assert again.duplicate
    with runtime.sessions() as session:
        series = session.scalars(select(Series)).one()
        assert series.instance_count == 1 and series.revision == 1


def test_other_sop_classes_are_recorded_as_ignored(runtime: Runtime, mr_series_factory) -> None:  # type: ignore[no-untyped-def]
    ct = mr_series_factory(slices=1, sop_class_uid=CTImageStorage, modality="CT")
    receiver = Receiver(runtime.store, runtime.sessions, runtime.settings)
    result = receiver.receive(_bytes(ct.paths[0]), CTImageStorage, "A")
    assert result.ignored_reason is not None and "not an MR image" in result.ignored_reason
    with runtime.sessions() as session:
        instance = session.scalars(select(Instance)).one()
        assert instance.path == "" and instance.ignored_reason == result.ignored_reason
        assert session.scalars(select(Series)).one().instance_count == 0


def test_own_output_is_ignored(runtime: Runtime, mr_series, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    ds = pydicom.dcmread(mr_series.paths[0])
    item = pydicom.Dataset()
    item.Manufacturer = PRODUCER_MANUFACTURER
    ds.ContributingEquipmentSequence = [item]
    ours = tmp_path / "ours.dcm"
    ds.save_as(ours)
    receiver = Receiver(runtime.store, runtime.sessions, runtime.settings)
    result = receiver.receive(ours.read_bytes(), MR, "PACS")
    assert result.ignored_reason is not None and "denoised-node" in result.ignored_reason


@pytest.mark.parametrize("cut", [0.1, 0.5, 0.97])
def test_truncated_data_is_refused_and_nothing_is_kept(runtime: Runtime, mr_series,  # type: ignore[no-untyped-def]
                                                       cut: float) -> None:
    data = _bytes(mr_series.paths[0])
    receiver = Receiver(runtime.store, runtime.sessions, runtime.settings)
    with pytest.raises(UnreadableDataset) as info:
        receiver.receive(data[: int(len(data) * cut)], MR, "A")
    assert status_for(info.value) == Status.CANNOT_UNDERSTAND
    assert not list(runtime.store.instances.rglob("*.dcm"))
    with runtime.sessions() as session:
        assert session.scalars(select(Instance)).all() == []


def test_garbage_is_refused() -> None:
    with pytest.raises(UnreadableDataset):
        parse_dataset(b"\x00" * 10 + b"not dicom at all")


def test_sop_class_must_match_the_context(runtime: Runtime, mr_series) -> None:  # type: ignore[no-untyped-def]
    receiver = Receiver(runtime.store, runtime.sessions, runtime.settings)
    with pytest.raises(SOPClassMismatch) as info:
        receiver.receive(_bytes(mr_series.paths[0]), CTImageStorage, "A")
    assert status_for(info.value) == Status.DATASET_DOES_NOT_MATCH


def test_too_large_instance_is_refused(settings_factory, mr_series) -> None:  # type: ignore[no-untyped-def]
    from denoised_node.storage.runtime import open_runtime

    settings = settings_factory(node__max_instance_mb=1)
    rt = open_runtime(settings, initialise_empty=True)
    receiver = Receiver(rt.store, rt.sessions, settings)
    with pytest.raises(InstanceTooLarge) as info:
        receiver.receive(b"\x00" * (2**20 + 1), MR, "A")
    assert status_for(info.value) == Status.OUT_OF_RESOURCES_TOO_LARGE


def test_malformed_uid_is_refused(runtime: Runtime, mr_series, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    ds = pydicom.dcmread(mr_series.paths[0])
    ds.SeriesInstanceUID = "1.2.3/../../x"
    bad = tmp_path / "bad.dcm"
    ds.save_as(bad)
    receiver = Receiver(runtime.store, runtime.sessions, runtime.settings)
    with pytest.raises(InvalidUID) as info:
        receiver.receive(bad.read_bytes(), MR, "A")
    assert status_for(info.value) == Status.CANNOT_UNDERSTAND_UID


def test_status_table() -> None:
    assert status_for(OutOfSpace("x")) == Status.OUT_OF_RESOURCES == 0xA700
    assert status_for(OperationalError("s", {}, Exception())) == Status.OUT_OF_RESOURCES_INDEX
    assert status_for(OSError(28, "No space left on device")) == Status.OUT_OF_RESOURCES
    assert status_for(RuntimeError("?")) == Status.PROCESSING_FAILURE
    assert all(status != Status.SUCCESS for status in map(status_for, [Exception(), KeyError()]))


def test_index_failure_removes_the_new_file(runtime: Runtime, mr_series, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    receiver = Receiver(runtime.store, runtime.sessions, runtime.settings)

    def broken(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise OperationalError("INSERT", {}, Exception("database is locked"))

    monkeypatch.setattr(receiver, "_index", broken)
    with pytest.raises(OperationalError):
        receiver.receive(_bytes(mr_series.paths[0]), MR, "A")
    assert not list(runtime.store.instances.rglob("*.dcm"))


def test_release_marks_series_delivered_whole(runtime: Runtime, mr_series) -> None:  # type: ignore[no-untyped-def]
    receiver = Receiver(runtime.store, runtime.sessions, runtime.settings)
    ids = Counter(receiver.receive(_bytes(p), MR, "A").series_id for p in mr_series.paths)
    receiver.mark_released(Counter({k: v - 1 for k, v in ids.items()}))
    with runtime.sessions() as session:
        assert session.scalars(select(Series)).one().released_at is None
    receiver.mark_released(ids)
    with runtime.sessions() as session:
        assert session.scalars(select(Series)).one().released_at is not None


def test_zero_length_pixel_data_is_refused_as_unreadable(runtime: Runtime, mr_series) -> None:  # type: ignore[no-untyped-def]
    """Issue 29, item 11: 0xC000 (cannot understand), not a processing failure."""
    ds = pydicom.dcmread(mr_series.paths[0])
    ds.PixelData = b""
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    receiver = Receiver(runtime.store, runtime.sessions, runtime.settings)
    with pytest.raises(UnreadableDataset, match="pixel data holds 0 bytes") as info:
        receiver.receive(buffer.getvalue(), MR, "A")
    assert status_for(info.value) == Status.CANNOT_UNDERSTAND
