"""Fast checks that the synthetic MR generator writes what it says it writes."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import (
    UID,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
)

from tests.fixtures.encoding import dcmcjpeg_path
from tests.fixtures.mr_series import GeneratedSeries, MRSeriesSpec, generate_series
from tests.fixtures.phantom import rician

Factory = Callable[..., GeneratedSeries]


def test_same_seed_same_bytes_other_seed_other_uids(tmp_path: Path) -> None:
    spec = MRSeriesSpec(slices=3, rows=33, columns=29, seed=7)
    first = generate_series(tmp_path / "a", spec)
    second = generate_series(tmp_path / "b", spec)
    other = generate_series(tmp_path / "c", spec, seed=8)
    assert [p.read_bytes() for p in first.paths] == [p.read_bytes() for p in second.paths]
    assert not set(first.sop_instance_uids) & set(other.sop_instance_uids)
    assert first.study_uid != other.study_uid


def test_uids_are_valid_and_unique(mr_series_factory: Factory) -> None:
    series = mr_series_factory(slices=6, echoes=2, localizers=1)
    uids = [
        *series.sop_instance_uids,
        series.series_uid,
        series.study_uid,
        series.frame_of_reference_uid,
    ]
    assert len(set(uids)) == len(uids)
    assert all(UID(uid).is_valid for uid in uids)
    ds = pydicom.dcmread(series.paths[0])
    assert ds.StudyInstanceUID == series.study_uid
    assert ds.SeriesInstanceUID == series.series_uid
    assert ds.FrameOfReferenceUID == series.frame_of_reference_uid


@pytest.mark.parametrize("orientation", ["axial", "sagittal", "coronal", "oblique"])
def test_slices_are_parallel_and_evenly_spaced(
    orientation: str, mr_series_factory: Factory
) -> None:
    series = mr_series_factory(
        slices=5,
        rows=31,
        columns=27,
        orientation=orientation,
        slice_thickness=3.0,
        slice_spacing=4.0,
        pixel_spacing=(1.5, 2.0),
    )
    datasets = [pydicom.dcmread(p) for p in series.paths]
    iop = np.asarray(datasets[0].ImageOrientationPatient, dtype=float)
    row, col = iop[:3], iop[3:]
    assert (
        abs(row @ col) < 1e-6
        and np.isclose(np.linalg.norm(row), 1)
        and np.isclose(np.linalg.norm(col), 1)
    )
    normal = np.cross(row, col)
    along = sorted(
        float(np.asarray(ds.ImagePositionPatient, dtype=float) @ normal) for ds in datasets
    )
    np.testing.assert_allclose(np.diff(along), 4.0, atol=1e-4)
    assert all(
        list(ds.ImageOrientationPatient) == list(datasets[0].ImageOrientationPatient)
        for ds in datasets
    )
    assert [float(v) for v in datasets[0].PixelSpacing] == [1.5, 2.0]
    assert (datasets[0].Rows, datasets[0].Columns) == (31, 27)


def test_shuffle_sends_slices_out_of_order(mr_series_factory: Factory) -> None:
    series = mr_series_factory(slices=10, shuffle=True)
    numbers = [pydicom.dcmread(p).InstanceNumber for p in sorted(series.paths)]
    assert sorted(numbers) == list(range(1, 11))
    assert numbers != sorted(numbers)


@pytest.mark.parametrize(
    "bits_stored, signed, slope, intercept",
    [
        (12, False, None, None),
        (16, False, 0.5, 0.0),
        (12, True, 1.0, 1000.0),
        (16, True, 2.0, -50.0),
    ],
)
def test_stored_values_fit_the_pixel_format(
    bits_stored: int,
    signed: bool,
    slope: float | None,
    intercept: float | None,
    mr_series_factory: Factory,
) -> None:
    series = mr_series_factory(
        slices=2,
        bits_stored=bits_stored,
        signed=signed,
        rescale_slope=slope,
        rescale_intercept=intercept,
    )
    ds = pydicom.dcmread(series.paths[0])
    assert (ds.BitsAllocated, ds.BitsStored, ds.HighBit) == (16, bits_stored, bits_stored - 1)
    assert ds.PixelRepresentation == int(signed)
    pixels = ds.pixel_array
    low, high = series.spec.pixel_format.stored_range
    assert low <= pixels.min() and pixels.max() <= high
    assert pixels.max() > pixels.min() + 200
    if signed and intercept == 1000.0:
        assert pixels.min() < 0
    if slope is None:
        assert "RescaleSlope" not in ds
    else:
        real = pixels * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        assert 700 < np.percentile(real, 99) < 1400


TRANSFER_SYNTAXES = [
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    RLELossless,
    JPEGLSLossless,
    JPEG2000Lossless,
    JPEGLosslessSV1,
]


@pytest.mark.parametrize("transfer_syntax", TRANSFER_SYNTAXES, ids=lambda uid: UID(uid).name)
@pytest.mark.parametrize("signed", [False, True])
def test_every_transfer_syntax_reads_back_losslessly(
    transfer_syntax: str, signed: bool, mr_series_factory: Factory
) -> None:
    if transfer_syntax == JPEGLosslessSV1 and dcmcjpeg_path() is None:
        from tests.integration.peers import require_tool

        require_tool("dcmcjpeg")
    series = mr_series_factory(
        slices=2,
        rows=45,
        columns=38,
        transfer_syntax=transfer_syntax,
        signed=signed,
        rescale_intercept=500.0 if signed else None,
    )
    for instance in series.instances:
        ds = pydicom.dcmread(instance.path)
        assert ds.file_meta.TransferSyntaxUID == transfer_syntax
        assert ds.SOPInstanceUID == instance.sop_instance_uid
        np.testing.assert_array_equal(ds.pixel_array, instance.stored)


def test_echoes_and_localizers(mr_series_factory: Factory) -> None:
    series = mr_series_factory(slices=4, echoes=3, localizers=2)
    datasets = {ds.SOPInstanceUID: ds for ds in map(pydicom.dcmread, series.paths)}
    assert len(datasets) == 4 * 3 + 2
    localizers = [ds for ds in datasets.values() if "LOCALIZER" in ds.ImageType]
    assert len(localizers) == 2
    images = [ds for ds in datasets.values() if "LOCALIZER" not in ds.ImageType]
    assert sorted({int(ds.EchoNumbers) for ds in images}) == [1, 2, 3]
    echo_times = sorted({float(ds.EchoTime) for ds in images})
    assert len(echo_times) == 3
    by_echo = {int(ds.EchoNumbers): ds.pixel_array.astype(float).mean() for ds in images}
    assert by_echo[1] > by_echo[2] > by_echo[3]  # T2 decay
    assert len(series.imaging_instances()) == 12


def test_non_ascii_name_private_tags_and_window(mr_series_factory: Factory) -> None:
    series = mr_series_factory(slices=1)
    ds = pydicom.dcmread(series.paths[0])
    assert ds.SpecificCharacterSet == "ISO_IR 192"
    assert str(ds.PatientName) == "Müller^Jürgen=山田^太郎"
    block = ds.private_block(0x0029, "DENOISED_NODE_TESTS")
    assert block[0x10].value == "synthetic private text"
    assert float(ds.WindowWidth) > 100


def test_rician_noise_has_the_right_floor() -> None:
    rng = np.random.default_rng(0)
    background = rician(np.zeros(200_000), 10.0, rng)
    assert background.mean() == pytest.approx(10.0 * np.sqrt(np.pi / 2), rel=0.02)
    bright = rician(np.full(200_000, 1000.0), 10.0, rng)
    assert bright.std() == pytest.approx(10.0, rel=0.03)


def test_noise_free_pixels_are_given_too(mr_series_factory: Factory) -> None:
    series = mr_series_factory(slices=3, noise_sigma=25.0)
    instance = series.instances[1]
    residual = instance.stored.astype(float) - instance.clean_stored.astype(float)
    brain = instance.clean_stored > 400
    assert 15 < residual[brain].std() < 35


def test_volume_is_sorted_along_the_normal_and_rescaled(mr_series_factory: Factory) -> None:
    series = mr_series_factory(
        slices=6, echoes=2, shuffle=True, localizers=1, rescale_slope=0.5, rescale_intercept=100.0
    )
    stack = series.stack(echo=2)
    along = [float(i.geometry.position @ i.geometry.normal) for i in stack]
    assert len(stack) == 6 and along == sorted(along)
    volume = series.volume(echo=2)
    assert volume.shape == (6, 64, 56)
    np.testing.assert_allclose(volume[0], stack[0].stored * 0.5 + 100.0)
    enhanced = mr_series_factory(
        slices=6, echoes=2, enhanced=True, rescale_slope=0.5, rescale_intercept=100.0
    )
    np.testing.assert_allclose(
        enhanced.volume(echo=2, clean=True), series.volume(echo=2, clean=True)
    )
