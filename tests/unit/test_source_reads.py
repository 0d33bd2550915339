"""The worker reads each source file at most twice per job: its header when the series is
planned, its pixel data when its stack is loaded. What the later steps need (the rules' facts,
the pixel format, the header a derived object is made from) is carried in a SourceImage."""

from __future__ import annotations

import sys
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Self

import numpy as np
import pydicom
import pytest
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.uid import ImplicitVRLittleEndian

from denoised_node.config.settings import Settings
from denoised_node.daemon.dicom.receive import Receiver
from denoised_node.daemon.dicom.scu import SendResult
from denoised_node.daemon.jobs.completion import complete_idle_series
from denoised_node.daemon.jobs.pipeline import denoise_series
from denoised_node.daemon.jobs.worker import Worker
from denoised_node.storage.images.series import PIXEL_DATA, PixelFormat, plan_stacks, read_header
from denoised_node.storage.models import Series
from denoised_node.storage.runtime import Runtime
from tests.fixtures.mr_series import GeneratedSeries

Factory = Callable[..., GeneratedSeries]
NOW = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)


class _Opens:
    """Counts the opens of files under a folder (a Python audit hook sees every reader's)."""

    counting: _Opens | None = None  # audit hooks cannot be removed: one, switched per test

    def __init__(self, folder: Path) -> None:
        self.folder = str(folder)
        self.counts: Counter[str] = Counter()

    def __enter__(self) -> Self:
        _Opens.counting = self
        return self

    def __exit__(self, *exc: object) -> None:
        _Opens.counting = None

    @staticmethod
    def hook(event: str, args: tuple[Any, ...]) -> None:
        counting = _Opens.counting
        if counting is not None and event == "open" and isinstance(args[0], (str, Path)) \
                and str(args[0]).startswith(counting.folder):
            counting.counts[str(args[0])] += 1


sys.addaudithook(_Opens.hook)


def _discard(settings: Settings, destination: object, files: list[Path],
             progress: object = None) -> SendResult:
    return SendResult("pacs", len(files))


def test_one_job_reads_each_source_file_at_most_twice(runtime: Runtime, mr_series: GeneratedSeries,
                                                      fake_denoiser: Any) -> None:
    receiver = Receiver(runtime.store, runtime.sessions, runtime.settings)
    for path in mr_series.paths:
        receiver.receive(path.read_bytes(), None, "MOD")
    with runtime.sessions.begin() as session:
        for series in session.query(Series):
            series.last_received_at -= timedelta(minutes=5)
    assert complete_idle_series(runtime.sessions, runtime.settings.series)
    worker = Worker(runtime.settings, runtime.sessions, runtime.store, fake_denoiser,
                    worker_id="test-worker", sender=_discard)
    with _Opens(runtime.store.instances) as opens:
        assert worker.run(burst=True) == 1
    assert len(opens.counts) == len(mr_series.paths)
    assert max(opens.counts.values()) <= 2, opens.counts  # header, then pixel data


def test_the_header_holds_every_value_but_the_pixel_data(mr_series_factory: Factory,
                                                         settings: Settings,
                                                         tmp_path: Path) -> None:
    """A vendor's large private value (no VR, implicit VR) is read with the header and
    written into the derived object as it came, without the file being opened for it."""
    series = mr_series_factory(slices=2, transfer_syntax=ImplicitVRLittleEndian)
    value = bytes(range(256)) * 20  # longer than the values left on disk
    for path in series.paths:
        ds = pydicom.dcmread(path)
        block = ds.private_block(0x0029, "SIEMENS CSA HEADER", create=True)
        ds[block.get_tag(0x20)] = DataElement(block.get_tag(0x20), "UN", value)
        ds.save_as(path, implicit_vr=True)
    header = read_header(series.paths[0])
    pixels = header.get_item(PIXEL_DATA, keep_deferred=True)
    assert isinstance(pixels, RawDataElement) and pixels.value is None  # left on disk
    tag = header.private_block(0x0029, "SIEMENS CSA HEADER").get_tag(0x20)
    assert header.get_item(tag, keep_deferred=True).value == value
    with _Opens(tmp_path) as opens:
        outcome = denoise_series(series.paths, series.series_uid, _Identity(), settings,
                                 tmp_path / "out", NOW)
    assert {path: opens.counts[str(path)] for path in series.paths} == dict.fromkeys(
        series.paths, 2)
    for path in outcome.files:
        derived = pydicom.dcmread(path)
        element = derived.get_item(derived.private_block(0x0029, "SIEMENS CSA HEADER")
                                   .get_tag(0x20))
        assert element.VR == "UN" and element.value == value


class _Identity:
    identity = "identity-1"

    class card:  # noqa: N801 - mimics the model card's attributes
        name = "identity"
        version = "1"

    def denoise(self, volume: np.ndarray, progress: Any = None, spacing: Any = None) -> np.ndarray:
        return volume


@pytest.mark.parametrize(("allocated", "stored"), [(12, 12), (16, 17), (8, 0)])
def test_a_pixel_format_is_valid_on_construction(allocated: int, stored: int) -> None:
    with pytest.raises(ValueError, match="Bits"):
        PixelFormat(allocated, stored, signed=False)


def test_the_pixel_format_gives_the_decoders_dtype_and_the_stored_range() -> None:
    assert PixelFormat(16, 12, signed=False).dtype == np.uint16
    assert PixelFormat(16, 12, signed=False).stored_range == (0, 4095)
    assert PixelFormat(8, 8, signed=True).dtype == np.int8
    assert PixelFormat(16, 16, signed=True).stored_range == (-32768, 32767)


def test_an_image_without_its_pixel_representation_is_skipped_with_the_reason(
        mr_series_factory: Factory) -> None:
    series = mr_series_factory(slices=2)
    ds = pydicom.dcmread(series.paths[0])
    del ds.PixelRepresentation
    ds.save_as(series.paths[0])
    plan = plan_stacks(series.paths)
    assert [stack.depth for stack in plan.stacks] == [1]
    (skipped,) = plan.skipped
    assert skipped[0] == str(ds.SOPInstanceUID)
    assert skipped[1].startswith("image pixel attributes missing or invalid")
