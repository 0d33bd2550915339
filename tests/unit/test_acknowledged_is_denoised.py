"""Issue 15, item 5: what the node acknowledged is denoised. MR instances arriving in a series
that was ignored make a job; one malformed image is skipped with its reason while the rest of
the series is denoised; a dataset cut short at an element boundary gets a failure status.
Item 6: a job's reason is one line (the traceback stays in the log)."""

from __future__ import annotations

import io
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import CTImageStorage
from sqlalchemy import select

from denoised_node.daemon.dicom.dimse_status import Status, UnreadableDataset, status_for
from denoised_node.daemon.dicom.receive import Receiver
from denoised_node.daemon.dicom.scu import SendResult
from denoised_node.daemon.jobs.completion import complete_idle_series
from denoised_node.daemon.jobs.pipeline import PermanentError
from denoised_node.daemon.jobs.worker import Worker
from denoised_node.storage.models import Job, JobEvent, Series
from denoised_node.storage.runtime import Runtime

MR = "1.2.840.10008.5.1.4.1.1.4"


def _age_and_complete(runtime: Runtime) -> list[int]:
    with runtime.sessions.begin() as session:
        for series in session.scalars(select(Series)):
            series.last_received_at -= timedelta(minutes=5)
    return complete_idle_series(runtime.sessions, runtime.settings.series)


def _run_worker(runtime: Runtime, denoiser, sent: list[list[Path]] | None = None) -> None:  # type: ignore[no-untyped-def]
    def sender(settings, destination, files, progress=None):  # type: ignore[no-untyped-def]
        if sent is not None:
            sent.append(list(files))
        return SendResult(destination.name, len(files))

    Worker(runtime.settings, runtime.sessions, runtime.store, denoiser, worker_id="w",
           sender=sender).run(burst=True)


def _jobs(runtime: Runtime) -> list[Job]:
    with runtime.sessions() as session:
        return list(session.scalars(select(Job).order_by(Job.id)))


def test_mr_instances_after_an_ignored_series_make_a_job(runtime: Runtime, mr_series_factory,  # type: ignore[no-untyped-def]
                                                         fake_denoiser) -> None:
    """A series that went idle with only ignored instances (a CT slice sent first, say) is
    denoised once MR instances of it arrive."""
    mr = mr_series_factory(slices=4)
    ct = pydicom.dcmread(mr.paths[0])
    ct.SOPClassUID = ct.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ct.SOPInstanceUID = ct.file_meta.MediaStorageSOPInstanceUID = ct.SOPInstanceUID + ".9"
    ct.Modality = "CT"
    buffer = io.BytesIO()
    ct.save_as(buffer, enforce_file_format=True)
    receiver = Receiver(runtime.store, runtime.sessions, runtime.settings)
    receiver.receive(buffer.getvalue(), CTImageStorage, "MOD")
    assert len(_age_and_complete(runtime)) == 1
    assert [j.state for j in _jobs(runtime)] == ["ignored"]
    for path in mr.paths:
        receiver.receive(path.read_bytes(), MR, "MOD")
    assert len(_age_and_complete(runtime)) == 1
    sent: list[list[Path]] = []
    _run_worker(runtime, fake_denoiser, sent)
    assert [j.state for j in _jobs(runtime)] == ["ignored", "done"]
    assert len(sent) == 1 and len(sent[0]) == len(mr.paths)
    with runtime.sessions() as session:
        series = session.scalars(select(Series)).one()
        assert series.state == "receiving" and series.ignored_reason is None


def _implicit_bytes_on_an_explicit_syntax(ds: pydicom.Dataset) -> bytes:
    body = DicomBytesIO()
    body.is_little_endian, body.is_implicit_VR = True, True
    write_dataset(body, ds)
    head = DicomBytesIO()
    head.write(b"\x00" * 128 + b"DICM")
    write_file_meta_info(head, ds.file_meta)  # still says Explicit VR Little Endian
    return head.getvalue() + body.getvalue()


def _rows_zero(ds: pydicom.Dataset) -> None:
    ds.Rows = 0


def _columns_zero(ds: pydicom.Dataset) -> None:
    ds.Columns = 0


def _bits_stored_over_allocated(ds: pydicom.Dataset) -> None:
    ds.BitsStored = 17


def _two_frames_on_classic_mr(ds: pydicom.Dataset) -> None:
    ds.NumberOfFrames = 2
    ds.PixelData = ds.PixelData * 2  # whole, so that receipt keeps it


MALFORMED: dict[str, tuple[Callable[[pydicom.Dataset], None] | None, str]] = {
    "implicit VR bytes on an explicit context": (None, "implicit VR"),
    "Rows 0": (_rows_zero, "Rows 0"),
    "Columns 0": (_columns_zero, "Columns 0"),
    "BitsStored > BitsAllocated": (_bits_stored_over_allocated, "BitsStored 17"),
    "NumberOfFrames 2 on classic MR": (_two_frames_on_classic_mr, "NumberOfFrames 2"),
}


@pytest.mark.parametrize("kind", list(MALFORMED))
def test_one_malformed_image_is_skipped_and_the_rest_denoised(  # type: ignore[no-untyped-def]
        kind: str, runtime: Runtime, mr_series_factory, fake_denoiser) -> None:
    mr = mr_series_factory(slices=5)
    change, reason = MALFORMED[kind]
    receiver = Receiver(runtime.store, runtime.sessions, runtime.settings)
    for index, path in enumerate(mr.paths):
        data = path.read_bytes()
        if index == 2:
            ds = pydicom.dcmread(path)
            if change is None:
                data = _implicit_bytes_on_an_explicit_syntax(ds)
            else:
                change(ds)
                buffer = io.BytesIO()
                ds.save_as(buffer, enforce_file_format=True)
                data = buffer.getvalue()
            bad_uid = str(ds.SOPInstanceUID)
        assert receiver.receive(data, MR, "MOD").ignored_reason is None
    _age_and_complete(runtime)
    sent: list[list[Path]] = []
    _run_worker(runtime, fake_denoiser, sent)
    (job,) = _jobs(runtime)
    assert job.state == "done", job.reason
    assert job.derived_count == len(mr.paths) - 1 and job.processing_attempts == 0
    sources = {pydicom.dcmread(p).SourceImageSequence[0].ReferencedSOPInstanceUID
               for p in sent[0]}
    assert sources == set(mr.sop_instance_uids) - {bad_uid}
    with runtime.sessions() as session:
        processed = session.scalars(select(JobEvent.reason).where(
            JobEvent.to_state == "processed")).one()
    assert "1 image(s) skipped" in (processed or "") and reason in (processed or "")


def test_a_dataset_cut_at_an_element_boundary_is_refused(runtime: Runtime, mr_series) -> None:  # type: ignore[no-untyped-def]
    """Cut just before Rows (every element before it whole): no Pixel Data, so not the image
    the sender meant to store; a failure status makes it resend."""
    data = mr_series.paths[0].read_bytes()
    cut = data.find(b"\x28\x00\x10\x00US")  # (0028,0010) Rows, explicit VR
    assert cut > 0
    receiver = Receiver(runtime.store, runtime.sessions, runtime.settings)
    for length in (cut, cut + 10):  # before Rows, and after it (before Columns)
        with pytest.raises(UnreadableDataset, match="Pixel Data") as refused:
            receiver.receive(data[:length], MR, "MOD")
        assert status_for(refused.value) == Status.CANNOT_UNDERSTAND
    with runtime.sessions() as session:
        assert session.scalars(select(Series)).all() == []
    assert not list(runtime.store.instances.rglob("*.dcm"))


class _FailingDenoiser:
    """Fails as pydicom does inside tag_in_exception: the message carries a traceback."""

    identity = "unit-test-model-1"

    class card:  # noqa: N801 - mimics the model card's attributes
        name = "unit-test"
        version = "1.0"

    def denoise(self, volume: np.ndarray, progress=None, spacing=None) -> np.ndarray:  # type: ignore[no-untyped-def]
        raise TypeError(
            "With tag (0008,0020) got exception: encoding without a string argument\n"
            "Traceback (most recent call last):\n"
            '  File "/opt/denoised-node/lib/python3.11/site-packages/pydicom/tag.py", '
            "line 29, in tag_in_exception\n    yield\n")


def test_a_job_reason_is_one_line_without_the_traceback(runtime: Runtime, mr_series,  # type: ignore[no-untyped-def]
                                                        caplog) -> None:
    receiver = Receiver(runtime.store, runtime.sessions, runtime.settings)
    for path in mr_series.paths:
        receiver.receive(path.read_bytes(), MR, "MOD")
    _age_and_complete(runtime)
    _run_worker(runtime, _FailingDenoiser())
    (job,) = _jobs(runtime)
    with runtime.sessions() as session:
        reasons = [job.reason or ""] + [r or "" for r in session.scalars(
            select(JobEvent.reason).where(JobEvent.job_id == job.id))]
    for reason in reasons:
        assert "\n" not in reason and "Traceback" not in reason
        assert "site-packages" not in reason
    assert "encoding without a string argument" in (job.reason or "")
    assert "site-packages/pydicom/tag.py" in caplog.text  # the log keeps it all


class _RefusingDenoiser(_FailingDenoiser):
    REASON = "; ".join(f"check {n}: the figure is 0.{n:03d}, above its threshold, where a region "
                       "of the image changed" for n in range(12))

    def denoise(self, volume: np.ndarray, progress=None, spacing=None) -> np.ndarray:  # type: ignore[no-untyped-def]
        raise PermanentError(self.REASON)


def test_a_long_reason_is_kept_whole_in_the_job_and_in_jobs_show_json(runtime: Runtime,  # type: ignore[no-untyped-def]
                                                                     mr_series) -> None:
    """Reasons were cut at 300 characters where they were stored ("... a regio...")."""
    from click.testing import CliRunner

    from denoised_node.daemon.cli.main import main

    assert len(_RefusingDenoiser.REASON) > 900
    receiver = Receiver(runtime.store, runtime.sessions, runtime.settings)
    for path in mr_series.paths:
        receiver.receive(path.read_bytes(), MR, "MOD")
    _age_and_complete(runtime)
    _run_worker(runtime, _RefusingDenoiser())
    (job,) = _jobs(runtime)
    assert job.state == "failed" and job.reason == _RefusingDenoiser.REASON
    url = runtime.settings.database.url
    result = CliRunner().invoke(
        main,
        ["jobs", "show", str(job.id), "--json"],
        env={
            "DENOISED_NODE_DATABASE__URL": url,
            "DENOISED_NODE_NODE__DATA_DIR": str(runtime.settings.node.data_dir),
        },
    )
    assert result.exit_code == 0, result.output
    assert _RefusingDenoiser.REASON in result.stdout
