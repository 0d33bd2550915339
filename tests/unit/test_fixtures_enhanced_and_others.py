"""The Enhanced MR multi-frame variant and the non-MR objects of the generator."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import (
    CTImageStorage,
    EnhancedMRImageStorage,
    JPEG2000Lossless,
    LegacyConvertedEnhancedMRImageStorage,
    SecondaryCaptureImageStorage,
)

from tests.fixtures.identity import StudyInfo
from tests.fixtures.mr_series import GeneratedSeries
from tests.fixtures.other_objects import (
    write_ct_image,
    write_legacy_converted,
    write_secondary_capture,
)

Factory = Callable[..., GeneratedSeries]


def test_enhanced_mr_is_one_multiframe_object(mr_series_factory: Factory) -> None:
    series = mr_series_factory(
        enhanced=True,
        slices=5,
        rows=41,
        columns=37,
        orientation="oblique",
        rescale_slope=0.5,
        rescale_intercept=10.0,
    )
    (instance,) = series.instances
    ds = pydicom.dcmread(instance.path)
    assert ds.SOPClassUID == EnhancedMRImageStorage
    assert int(ds.NumberOfFrames) == 5 == len(ds.PerFrameFunctionalGroupsSequence)
    np.testing.assert_array_equal(ds.pixel_array, instance.stored)
    shared = ds.SharedFunctionalGroupsSequence[0]
    assert float(shared.PixelValueTransformationSequence[0].RescaleSlope) == 0.5
    assert "RescaleSlope" not in ds
    iop = [float(v) for v in shared.PlaneOrientationSequence[0].ImageOrientationPatient]
    assert iop == pytest.approx(instance.geometry.orientation_values)
    positions = [
        frame.PlanePositionSequence[0].ImagePositionPatient
        for frame in ds.PerFrameFunctionalGroupsSequence
    ]
    for position, geometry in zip(positions, instance.geometries, strict=True):
        np.testing.assert_allclose([float(v) for v in position], geometry.position, atol=1e-5)


def test_enhanced_mr_with_echoes_has_two_dimensions(mr_series_factory: Factory) -> None:
    series = mr_series_factory(
        enhanced=True, slices=3, echoes=2, localizers=1, transfer_syntax=JPEG2000Lossless
    )
    ds = pydicom.dcmread(series.paths[0])
    assert int(ds.NumberOfFrames) == 6  # localizers are left out of the multi-frame object
    assert len(ds.DimensionIndexSequence) == 2
    indices = [
        tuple(f.FrameContentSequence[0].DimensionIndexValues)
        for f in ds.PerFrameFunctionalGroupsSequence
    ]
    assert len(set(indices)) == 6
    echo_times = {
        float(f.MREchoSequence[0].EffectiveEchoTime) for f in ds.PerFrameFunctionalGroupsSequence
    }
    assert len(echo_times) == 2
    np.testing.assert_array_equal(ds.pixel_array, series.instances[0].stored)


def test_other_objects_share_the_study(tmp_path: Path, mr_series_factory: Factory) -> None:
    study = StudyInfo(seed=3)
    series = mr_series_factory(study=study, slices=3)
    sc = pydicom.dcmread(write_secondary_capture(tmp_path / "other", study))
    ct = pydicom.dcmread(write_ct_image(tmp_path / "other", study))
    legacy = pydicom.dcmread(write_legacy_converted(tmp_path / "other", series.paths, seed=3))
    assert sc.SOPClassUID == SecondaryCaptureImageStorage and sc.Modality == "OT"
    assert ct.SOPClassUID == CTImageStorage and ct.Modality == "CT"
    assert legacy.SOPClassUID == LegacyConvertedEnhancedMRImageStorage
    assert int(legacy.NumberOfFrames) == 3
    for ds in (sc, ct, legacy):
        assert ds.StudyInstanceUID == series.study_uid
        assert ds.SeriesInstanceUID != series.series_uid
        assert ds.pixel_array.size > 0
