"""The derived series (storage/images/derive.py): pixels back in the stored range and
representation, derived attributes, deterministic UIDs, compressed input, own output."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import RLELossless

from denoised_node.storage.images.derive import DerivationInfo, DerivedSeriesWriter, is_own_output
from denoised_node.storage.images.derived_uids import DerivedUIDs, derived_uid
from denoised_node.storage.images.series import load_volume, plan_stacks

NOW = datetime(2026, 11, 25, 10, 0, 0, tzinfo=UTC)
INFO = DerivationInfo(model_identity="model-a", model_name="unet", model_version="1.0",
                      software_version="0.1.0")


def _write_identity(series, tmp_path: Path, info: DerivationInfo = INFO) -> list[Path]:  # type: ignore[no-untyped-def]
    plan = plan_stacks(series.paths)
    uids = DerivedUIDs.for_plan(info.model_identity, series.series_uid, plan)
    writer = DerivedSeriesWriter(tmp_path / "out", info, NOW, uids)
    for stack in plan.stacks:
        writer.add_stack(stack, load_volume(stack))
    return writer.close()


@pytest.mark.parametrize("overrides", [
    {},
    {"signed": True, "bits_stored": 16},
    {"rescale_slope": 0.5, "rescale_intercept": 10.0},
    {"bits_stored": 12, "rows": 27, "columns": 31},
])
def test_identity_denoise_gives_the_source_pixels_back(mr_series_factory, tmp_path: Path,  # type: ignore[no-untyped-def]
                                                      overrides: dict) -> None:
    series = mr_series_factory(slices=3, **overrides)
    files = _write_identity(series, tmp_path)
    assert len(files) == 3
    by_uid = series.pixels_by_uid
    for path in files:
        derived = pydicom.dcmread(path)
        source_uid = derived.SourceImageSequence[0].ReferencedSOPInstanceUID
        np.testing.assert_array_equal(derived.pixel_array, by_uid[source_uid])
        assert derived.pixel_array.dtype == by_uid[source_uid].dtype


def test_derived_attributes(mr_series, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    files = _write_identity(mr_series, tmp_path)
    sources = {pydicom.dcmread(p).SOPInstanceUID: pydicom.dcmread(p) for p in mr_series.paths}
    series_uids = set()
    for path in files:
        ds = pydicom.dcmread(path)
        src = sources[ds.SourceImageSequence[0].ReferencedSOPInstanceUID]
        series_uids.add(ds.SeriesInstanceUID)
        assert ds.SOPClassUID == src.SOPClassUID
        assert ds.SOPInstanceUID == derived_uid(ds.SeriesInstanceUID, src.SOPInstanceUID)
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        assert ds.SeriesInstanceUID == DerivedUIDs.for_plan(
            "model-a", src.SeriesInstanceUID, plan_stacks(mr_series.paths)).series_uid
        assert ds.StudyInstanceUID == src.StudyInstanceUID
        assert ds.FrameOfReferenceUID == src.FrameOfReferenceUID
        assert list(ds.ImageType[:2]) == ["DERIVED", "SECONDARY"]
        assert ds.SeriesDescription == f"{src.SeriesDescription} DENOISED"
        assert ds.SeriesNumber == src.SeriesNumber + 1000
        assert ds.ImagePositionPatient == src.ImagePositionPatient
        assert ds.ImageOrientationPatient == src.ImageOrientationPatient
        assert ds.PixelSpacing == src.PixelSpacing
        assert ds.WindowCenter == src.WindowCenter and ds.WindowWidth == src.WindowWidth
        assert ds.PatientName == src.PatientName
        assert ds.DerivationCodeSequence[0].CodeValue == "113087"
        assert "model-a" in ds.DerivationDescription
        ref = ds.SourceImageSequence[0]
        assert ref.ReferencedSOPClassUID == src.SOPClassUID
        assert ref.PurposeOfReferenceCodeSequence[0].CodeValue == "121322"
        equipment = ds.ContributingEquipmentSequence[-1]
        assert equipment.Manufacturer == "denoised-node"
        assert is_own_output(ds) and not is_own_output(src)
        assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    assert len(series_uids) == 1


def test_uids_are_deterministic_and_depend_on_the_model(mr_series, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    first = sorted(p.name for p in _write_identity(mr_series, tmp_path / "a"))
    again = sorted(p.name for p in _write_identity(mr_series, tmp_path / "b"))
    other = DerivationInfo(model_identity="model-b", model_name="unet", model_version="2.0",
                           software_version="0.1.0")
    different = sorted(p.name for p in _write_identity(mr_series, tmp_path / "c", other))
    assert first == again
    assert not set(first) & set(different)


def test_compressed_input_and_rle_output(mr_series_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    series = mr_series_factory(slices=2, transfer_syntax=RLELossless)
    info = DerivationInfo(model_identity="m", model_name="n", model_version="1",
                          software_version="0", transfer_syntax="rle")
    files = _write_identity(series, tmp_path, info)
    for path in files:
        ds = pydicom.dcmread(path)
        assert ds.file_meta.TransferSyntaxUID == RLELossless
        source = series.pixels_by_uid[ds.SourceImageSequence[0].ReferencedSOPInstanceUID]
        np.testing.assert_array_equal(ds.pixel_array, source)


def test_long_description_keeps_the_suffix(mr_series_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    series = mr_series_factory(slices=1, series_description="X" * 64)
    ds = pydicom.dcmread(_write_identity(series, tmp_path)[0])
    assert len(ds.SeriesDescription) <= 64 and ds.SeriesDescription.endswith(" DENOISED")


def test_values_are_clipped_to_the_stored_range(mr_series_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    series = mr_series_factory(slices=2, bits_stored=12)
    plan = plan_stacks(series.paths)
    stack = plan.stacks[0]
    writer = DerivedSeriesWriter(tmp_path / "out", INFO, NOW,
                                 DerivedUIDs.for_plan("model-a", series.series_uid, plan))
    volume = load_volume(stack)
    volume[:, 0, 0] = 1e9
    volume[:, 0, 1] = -1e9
    writer.add_stack(stack, volume)
    for path in writer.close():
        pixels = pydicom.dcmread(path).pixel_array
        assert pixels[0, 0] == 4095 and pixels[0, 1] == 0


@pytest.mark.parametrize("number", [2147483647, 2147482700, -2147483648, 0])
def test_the_derived_series_number_stays_within_is(mr_series_factory, tmp_path: Path,  # type: ignore[no-untyped-def]
                                                   number: int) -> None:
    """Issue 29, item 12: IS holds -2**31 .. 2**31-1; the derived number differs from the
    source's and stays in range (dciodvfy)."""
    series = mr_series_factory(slices=1, series_number=number)
    derived = pydicom.dcmread(_write_identity(series, tmp_path)[0]).SeriesNumber
    assert -2**31 <= derived <= 2**31 - 1 and derived != number
