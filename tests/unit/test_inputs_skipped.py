"""Inputs the network must not touch are skipped with a reason, never an error: phase and
other non-magnitude images, quantitative maps, projections, localizers, images without
pixels or geometry. A series of nothing else ends 'ignored' with that reason."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from sqlalchemy import select

from denoised_node.config.settings import Settings
from denoised_node.daemon.dicom.receive import Receiver
from denoised_node.daemon.dicom.scu import SendResult
from denoised_node.daemon.jobs.completion import complete_idle_series
from denoised_node.daemon.jobs.pipeline import denoise_series
from denoised_node.daemon.jobs.worker import Worker
from denoised_node.storage.images.series import NothingToDenoise, plan_stacks, unusable_reason
from denoised_node.storage.models import Job, Series
from denoised_node.storage.runtime import Runtime
from tests.fixtures.mr_series import GeneratedSeries

Factory = Callable[..., GeneratedSeries]
NOW = datetime(2026, 11, 25, 10, 0, 0, tzinfo=UTC)

SKIPPED_KINDS: dict[str, tuple[dict[str, Any], str]] = {
    "siemens-phase": ({"ImageType": ["ORIGINAL", "PRIMARY", "P", "ND"]},
                      "not a magnitude image (phase)"),
    "philips-real": ({"ImageType": ["ORIGINAL", "PRIMARY", "R_FFE", "R", "FFE"]},
                     "not a magnitude image (real)"),
    "imaginary": ({"ImageType": ["ORIGINAL", "PRIMARY", "I"]},
                  "not a magnitude image (imaginary)"),
    "adc-map": ({"ImageType": ["DERIVED", "PRIMARY", "DIFFUSION", "ADC"]},
                "quantitative map (ADC)"),
    "fa-map": ({"ImageType": ["DERIVED", "PRIMARY", "DIFFUSION", "FA"]},
               "quantitative map (FA)"),
    "t2-map": ({"ImageType": ["DERIVED", "PRIMARY", "T2 MAP"]}, "quantitative map (T2)"),
    "mip": ({"ImageType": ["DERIVED", "SECONDARY", "MIP"]}, "projection (MIP)"),
    "localizer": ({"ImageType": ["ORIGINAL", "PRIMARY", "LOCALIZER"]}, "localizer"),
}


@pytest.mark.parametrize("extra,reason", SKIPPED_KINDS.values(), ids=SKIPPED_KINDS.keys())
def test_kinds_the_network_must_not_touch(mr_series_factory: Factory, extra: dict[str, Any],
                                          reason: str) -> None:
    series = mr_series_factory(slices=2, extra=extra)
    plan = plan_stacks(series.paths)
    assert plan.stacks == []
    assert plan.skipped == [(uid, reason) for uid in series.sop_instance_uids]


@pytest.mark.parametrize("component", ["PHASE", "REAL", "IMAGINARY", "MIXED"])
def test_enhanced_non_magnitude_objects_are_skipped(mr_series_factory: Factory,
                                                    component: str) -> None:
    series = mr_series_factory(slices=2, enhanced=True,
                               extra={"ComplexImageComponent": component})
    assert plan_stacks(series.paths).skipped[0][1].startswith("not a magnitude image")


def test_damaged_or_incomplete_images_are_skipped(mr_series_factory: Factory,
                                                  tmp_path: Path) -> None:
    series = mr_series_factory(slices=5)
    no_pixels, no_position, garbage = series.paths[:3]
    ds = pydicom.dcmread(no_pixels)
    del ds.PixelData
    ds.save_as(no_pixels)
    ds = pydicom.dcmread(no_position)
    del ds.ImagePositionPatient
    ds.save_as(no_position)
    garbage.write_bytes(b"not DICOM at all")
    plan = plan_stacks(series.paths)
    reasons = dict(plan.skipped)
    assert reasons[str(pydicom.dcmread(no_pixels).SOPInstanceUID)] == "no pixel data"
    assert reasons[str(pydicom.dcmread(no_position).SOPInstanceUID)].startswith(
        "no usable geometry")
    assert reasons[garbage.stem].startswith("unreadable")
    assert plan.slice_count == 2


@pytest.mark.parametrize("image_type", ["DERIVED", ["ORIGINAL", "PRIMARY", "M", "ND"],
                                        ["DERIVED", "SECONDARY", "OTHER"], []])
def test_magnitude_images_are_denoised(image_type: Any) -> None:
    ds = Dataset()
    ds.PixelData = b"\0" * 8
    ds.ImageType = image_type  # a single value reads back as a str: not its letters
    assert unusable_reason(ds) is None


def test_colour_and_unusual_bit_depths() -> None:
    ds = Dataset()
    ds.PixelData = b"\0" * 12
    ds.SamplesPerPixel = 3
    assert unusable_reason(ds) == "not a grayscale image"
    ds.SamplesPerPixel, ds.BitsAllocated = 1, 32
    assert unusable_reason(ds) == "BitsAllocated 32 is not supported"


class _NoNetwork:
    identity = "never-called"
    card = None

    def denoise(self, volume: np.ndarray, progress: Any = None, spacing: Any = None) -> np.ndarray:
        raise AssertionError("nothing in this series may reach the network")


def test_a_mixed_series_denoises_the_magnitude_images_only(
        mr_series_factory: Factory, settings: Settings, tmp_path: Path) -> None:
    magnitude = mr_series_factory(slices=3)
    phase = mr_series_factory(slices=3, seed=5, study=magnitude.spec.effective_study,
                              extra={"SeriesInstanceUID": magnitude.series_uid,
                                     "ImageType": ["ORIGINAL", "PRIMARY", "P", "ND"]})

    class Identity(_NoNetwork):
        def denoise(
            self, volume: np.ndarray, progress: Any = None, spacing: Any = None
        ) -> np.ndarray:
            return volume

    outcome = denoise_series(magnitude.paths + phase.paths, magnitude.series_uid, Identity(),
                             settings, tmp_path / "out", NOW)
    assert len(outcome.files) == 3
    assert sorted(uid for uid, _ in outcome.skipped) == sorted(phase.sop_instance_uids)
    with pytest.raises(NothingToDenoise, match=r"not a magnitude image \(phase\)"):
        denoise_series(phase.paths, magnitude.series_uid, _NoNetwork(), settings,
                       tmp_path / "none", NOW)


def test_worker_records_a_phase_only_series_as_ignored(runtime: Runtime,
                                                       mr_series_factory: Factory) -> None:
    phase = mr_series_factory(slices=3, extra={"ImageType": ["ORIGINAL", "PRIMARY", "P"]})
    receiver = Receiver(runtime.store, runtime.sessions, runtime.settings)
    for path in phase.paths:
        assert receiver.receive(path.read_bytes(), str(pydicom.dcmread(path).SOPClassUID),
                                "MOD").ignored_reason is None  # kept: decided at denoising
    with runtime.sessions.begin() as session:
        for series in session.scalars(select(Series)):
            series.last_received_at -= timedelta(minutes=5)
    assert complete_idle_series(runtime.sessions, runtime.settings.series)

    def never_send(*args: Any, **kwargs: Any) -> SendResult:
        raise AssertionError("an ignored series is not sent")

    worker = Worker(runtime.settings, runtime.sessions, runtime.store, _NoNetwork(),
                    worker_id="test-worker", sender=never_send)
    assert worker.run(burst=True) == 1
    with runtime.sessions() as session:
        job = session.scalars(select(Job)).one()
        assert job.state == "ignored"
        assert "not a magnitude image (phase)" in (job.reason or "")


def _nested_sequences(depth: int) -> bytes:
    """(FFFA,FFFA) sequences nested ``depth`` deep, each of one item, all of defined length
    (read one level at a time, as they are used)."""
    import struct

    element = b""
    for _ in range(depth):
        item = struct.pack("<HHI", 0xFFFE, 0xE000, len(element)) + element
        element = struct.pack("<HH2s2xI", 0xFFFA, 0xFFFA, b"SQ", len(item)) + item
    return element


def test_one_malformed_image_is_left_out_and_the_rest_denoised(mr_series_factory: Factory,
                                                                settings: Settings,
                                                                tmp_path: Path) -> None:
    """Issue 29, item 7: a 3000-deep nested sequence, or Pixel Data beside Float Pixel Data,
    leaves that image out with its reason; the series' other images are denoised."""
    series = mr_series_factory(slices=4)
    deep, two_pixel_data = series.paths[:2]
    with deep.open("ab") as stream:  # (FFFA,FFFA) sorts after Pixel Data: appended
        stream.write(_nested_sequences(3000))
    ds = pydicom.dcmread(two_pixel_data)
    ds.FloatPixelData = np.zeros(int(ds.Rows) * int(ds.Columns), "<f4").tobytes()
    ds.save_as(two_pixel_data)

    class Identity(_NoNetwork):
        def denoise(
            self, volume: np.ndarray, progress: Any = None, spacing: Any = None
        ) -> np.ndarray:
            return volume

    outcome = denoise_series(series.paths, series.series_uid, Identity(), settings,
                             tmp_path / "out", NOW)
    derived_sources = {str(pydicom.dcmread(p).SourceImageSequence[0].ReferencedSOPInstanceUID)
                       for p in outcome.files}
    assert derived_sources == set(series.sop_instance_uids[2:])
    reasons = dict(outcome.skipped)
    assert reasons[series.sop_instance_uids[0]].startswith("sequences nested deeper than")
    assert reasons[series.sop_instance_uids[1]] == (
        "more than one pixel data element (Pixel Data, Float Pixel Data)")
