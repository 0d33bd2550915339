"""Issue 15, item 1: a SOP Instance UID belongs to one series. The same UID arriving in
another series (a PACS that split or merged series does this) moves the instance there: the
index row, the file and both series' counts follow, the move is a note on both series' jobs,
neither series is ever derived from the other's bytes, and purging one never deletes a file
of the other."""

from __future__ import annotations

import io
import tempfile
from datetime import timedelta
from pathlib import Path

import numpy as np
import pydicom
import pytest
from sqlalchemy import select, update

from denoised_node.daemon.dicom.dimse_status import Status, status_for
from denoised_node.daemon.dicom.receive import Receiver
from denoised_node.daemon.dicom.scu import SendResult
from denoised_node.daemon.jobs.completion import complete_idle_series
from denoised_node.daemon.jobs.worker import Worker
from denoised_node.storage.models import Instance, Job, JobEvent, Series
from denoised_node.storage.retention import purge_finished
from denoised_node.storage.runtime import Runtime

MR = "1.2.840.10008.5.1.4.1.1.4"


def _encode(ds: pydicom.Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _complete_and_work(runtime: Runtime, denoiser) -> list[list[Path]]:  # type: ignore[no-untyped-def]
    with runtime.sessions.begin() as session:
        for series in session.scalars(select(Series)):
            series.last_received_at -= timedelta(minutes=5)
    complete_idle_series(runtime.sessions, runtime.settings.series)
    sent: list[list[Path]] = []

    def sender(settings, destination, files, progress=None):  # type: ignore[no-untyped-def]
        (runtime.store.root / "sent").mkdir(exist_ok=True)
        kept = Path(tempfile.mkdtemp(dir=runtime.store.root / "sent"))
        copies = []
        for path in files:  # the derived files are purged later: keep what was sent
            copies.append(kept / path.name)
            copies[-1].write_bytes(path.read_bytes())
        sent.append(copies)
        return SendResult(destination.name, len(files))

    Worker(runtime.settings, runtime.sessions, runtime.store, denoiser, worker_id="w",
           sender=sender).run(burst=True)
    return sent


def _sources(files: list[Path]) -> set[str]:
    return {str(pydicom.dcmread(p).SourceImageSequence[0].ReferencedSOPInstanceUID)
            for p in files}


def _series(runtime: Runtime, uid: str) -> Series:
    with runtime.sessions() as session:
        return session.scalars(select(Series).where(Series.series_uid == uid)).one()


def test_an_instance_sent_again_in_another_series_moves_there(  # type: ignore[no-untyped-def]
        runtime: Runtime, mr_series_factory, fake_denoiser) -> None:
    a = mr_series_factory(slices=3, series_number=3)
    b = mr_series_factory(slices=3, series_number=4)
    receiver = Receiver(runtime.store, runtime.sessions, runtime.settings)
    for path in a.paths:
        receiver.receive(path.read_bytes(), MR, "PACS")
    (first,) = _complete_and_work(runtime, fake_denoiser)
    assert _sources(first) == set(a.sop_instance_uids)
    old_file = runtime.store.path(runtime.store.instance_path(a.study_uid, a.series_uid,
                                                              a.sop_instance_uids[0]))
    assert old_file.is_file()

    # The PACS split the series: A's first image now comes as part of B, with B's pixels.
    moved = a.sop_instance_uids[0]
    ds = pydicom.dcmread(b.paths[0])
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = moved
    ds.PixelData = np.full((ds.Rows, ds.Columns), 1000, dtype=np.uint16).tobytes()
    assert not receiver.receive(_encode(ds), MR, "PACS").duplicate
    for path in b.paths[1:]:
        receiver.receive(path.read_bytes(), MR, "PACS")

    series_a, series_b = _series(runtime, a.series_uid), _series(runtime, b.series_uid)
    assert (series_a.instance_count, series_b.instance_count) == (2, 3)
    with runtime.sessions() as session:
        row = session.scalars(select(Instance).where(Instance.sop_instance_uid == moved)).one()
        notes = session.scalars(select(JobEvent.reason).join(Job).where(
            Job.series_id == series_a.id, JobEvent.from_state == JobEvent.to_state)).all()
    assert row.series_id == series_b.id
    assert row.path == runtime.store.instance_path(b.study_uid, b.series_uid, moved)
    assert pydicom.dcmread(runtime.store.path(row.path)).SeriesInstanceUID == b.series_uid
    assert not old_file.exists()  # nothing of A's copy is left to derive from
    assert any(f"{moved} moved to series {b.series_uid}" in (note or "") for note in notes)

    second = _complete_and_work(runtime, fake_denoiser)
    assert len(second) == 2  # A again (it lost an image), and B
    again_a = next(files for files in second if moved not in _sources(files))
    new_b = next(files for files in second if moved in _sources(files))
    assert _sources(again_a) == set(a.sop_instance_uids[1:])
    assert _sources(new_b) == {moved, *b.sop_instance_uids[1:]}
    derived_moved = next(p for p in new_b if _sources([p]) == {moved})
    assert np.all(pydicom.dcmread(derived_moved).pixel_array == 1000)  # B's bytes, not A's

    # Purging A (its jobs are done) leaves every file of B in place.
    assert purge_finished(runtime.sessions, runtime.store, timedelta(0),
                          series_uid=a.series_uid).series == 1
    with runtime.sessions() as session:
        paths = session.scalars(select(Instance.path).where(
            Instance.series_id == series_b.id)).all()
    assert len(paths) == 3 and all(runtime.store.path(p).is_file() for p in paths)


def test_an_index_row_pointing_into_another_series_is_never_used(  # type: ignore[no-untyped-def]
        runtime: Runtime, mr_series_factory, fake_denoiser) -> None:
    """An index left inconsistent by an older release (A's row naming B's file): A is not
    derived from it, and purging A does not delete it."""
    a = mr_series_factory(slices=3, series_number=3)
    b = mr_series_factory(slices=3, series_number=4)
    receiver = Receiver(runtime.store, runtime.sessions, runtime.settings)
    for path in [*a.paths, *b.paths]:
        receiver.receive(path.read_bytes(), MR, "PACS")
    b_path = runtime.store.instance_path(b.study_uid, b.series_uid, b.sop_instance_uids[0])
    with runtime.sessions.begin() as session:
        session.execute(update(Instance).where(
            Instance.sop_instance_uid == a.sop_instance_uids[0]).values(path=b_path))
    sent = _complete_and_work(runtime, fake_denoiser)
    assert sorted(len(files) for files in sent) == [2, 3]
    for files in sent:
        sources = _sources(files)
        assert sources <= set(a.sop_instance_uids) or sources <= set(b.sop_instance_uids)
    purge_finished(runtime.sessions, runtime.store, timedelta(0), series_uid=a.series_uid)
    assert runtime.store.path(b_path).is_file()


def test_a_series_belongs_to_one_study(runtime: Runtime, mr_series_factory) -> None:  # type: ignore[no-untyped-def]
    from denoised_node.daemon.dicom.dimse_status import SeriesInOtherStudy

    a = mr_series_factory(slices=2)
    receiver = Receiver(runtime.store, runtime.sessions, runtime.settings)
    receiver.receive(a.paths[0].read_bytes(), MR, "PACS")
    ds = pydicom.dcmread(a.paths[1])
    ds.StudyInstanceUID = ds.StudyInstanceUID + ".7"
    with pytest.raises(SeriesInOtherStudy, match=a.series_uid) as refused:
        receiver.receive(_encode(ds), MR, "PACS")
    assert status_for(refused.value) == Status.CANNOT_UNDERSTAND_STUDY
    with runtime.sessions() as session:
        assert session.scalars(select(Instance)).all().__len__() == 1
    assert len(list(runtime.store.instances.rglob("*.dcm"))) == 1


def _sop_uids(files: list[Path]) -> set[str]:
    return {str(pydicom.dcmread(p).SOPInstanceUID) for p in files}


def _series_uid_of(files: list[Path]) -> str:
    (uid,) = {str(pydicom.dcmread(p).SeriesInstanceUID) for p in files}
    return uid


def test_a_moved_instance_never_reuses_a_derived_uid_of_its_first_series(  # type: ignore[no-untyped-def]
        runtime: Runtime, mr_series_factory, fake_denoiser) -> None:
    """Issue 29, item 1: one derived SOP Instance UID is one object. The image moved from A
    to B is derived in B under a UID A's derived series never used."""
    a = mr_series_factory(slices=3, series_number=3)
    b = mr_series_factory(slices=3, series_number=4)
    receiver = Receiver(runtime.store, runtime.sessions, runtime.settings)
    for path in a.paths:
        receiver.receive(path.read_bytes(), MR, "PACS")
    (first_a,) = _complete_and_work(runtime, fake_denoiser)
    moved = a.sop_instance_uids[0]
    ds = pydicom.dcmread(b.paths[0])
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = moved
    receiver.receive(_encode(ds), MR, "PACS")
    for path in b.paths[1:]:
        receiver.receive(path.read_bytes(), MR, "PACS")
    second = _complete_and_work(runtime, fake_denoiser)
    new_b = next(files for files in second if moved in _sources(files))
    assert not _sop_uids(new_b) & _sop_uids(first_a)
    every = [uid for files in [first_a, *second] for uid in _sop_uids(files)]
    assert len(every) == len(set(every))  # no UID names two derived objects


def test_changed_pixels_under_the_same_uids_go_out_as_a_new_derived_series(  # type: ignore[no-untyped-def]
        runtime: Runtime, mr_series_factory, fake_denoiser) -> None:
    """Issue 29, item 2: a finished series sent again with other pixels (same UIDs) is sent
    as a new derived series that a PACS with overwrite off still takes; the old one is named
    superseded in the job history. A replay of the same content keeps the UIDs."""
    from denoised_node.daemon.jobs.queries import replay

    a = mr_series_factory(slices=3, series_number=3)
    receiver = Receiver(runtime.store, runtime.sessions, runtime.settings)
    for path in a.paths:
        receiver.receive(path.read_bytes(), MR, "PACS")
    (first,) = _complete_and_work(runtime, fake_denoiser)
    for path in a.paths:
        ds = pydicom.dcmread(path)
        ds.PixelData = (ds.pixel_array // 2).astype(ds.pixel_array.dtype).tobytes()
        receiver.receive(_encode(ds), MR, "PACS")
    (second,) = _complete_and_work(runtime, fake_denoiser)
    assert _series_uid_of(second) != _series_uid_of(first)
    assert not _sop_uids(second) & _sop_uids(first)
    with runtime.sessions() as session:
        old_job, new_job = session.scalars(select(Job).order_by(Job.id)).all()
        old_notes = session.scalars(select(JobEvent.reason).where(
            JobEvent.job_id == old_job.id, JobEvent.from_state == JobEvent.to_state)).all()
        assert new_job.derived_series_uid == _series_uid_of(second)
        assert f"supersedes derived series {_series_uid_of(first)}" in (new_job.reason or "")
    assert any(f"derived series {_series_uid_of(first)} superseded by "
               f"{_series_uid_of(second)}" in (note or "") for note in old_notes)

    with runtime.sessions.begin() as session:  # the same content again: same UIDs
        replay(session, job_id=new_job.id, who="test")
    (again,) = _complete_and_work(runtime, fake_denoiser)
    assert _sop_uids(again) == _sop_uids(second)
    with runtime.sessions() as session:
        assert session.scalars(select(JobEvent.reason).where(
            JobEvent.job_id == old_job.id, JobEvent.from_state == JobEvent.to_state)
        ).all() == old_notes  # named once, not again at the replay
