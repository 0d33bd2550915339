"""The real peers work with the generated data: DCMTK -> Orthanc -> DCMTK, validators agree."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydicom.uid import (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
)

from tests.fixtures.encoding import truncated_copy
from tests.fixtures.identity import StudyInfo
from tests.fixtures.mr_series import GeneratedSeries
from tests.fixtures.other_objects import (
    write_ct_image,
    write_legacy_converted,
    write_secondary_capture,
)
from tests.integration.peers import (
    Modality,
    Orthanc,
    StoreSCP,
    dciodvfy,
    dcm2niix_affine,
    echoscu,
    send_files,
    storescu,
    storescu_syntax_args,
)

MODALITY_AET = "MODALITY"

# (transfer syntax, generator overrides): each one also varies the pixel format a bit.
SENDS: dict[str, tuple[str, dict[str, Any]]] = {
    "explicit": (ExplicitVRLittleEndian, {}),
    "implicit": (ImplicitVRLittleEndian, {"orientation": "sagittal"}),
    "rle-signed": (
        RLELossless,
        {"signed": True, "rescale_intercept": 1000.0, "rescale_slope": 1.0},
    ),
    "jpeg-lossless": (JPEGLosslessSV1, {"orientation": "oblique"}),
    "jpeg-ls-16bit": (
        JPEGLSLossless,
        {"bits_stored": 16, "rescale_slope": 0.25, "rescale_intercept": 0.0},
    ),
    "jpeg2000": (JPEG2000Lossless, {"orientation": "coronal", "shuffle": True}),
}


@pytest.mark.parametrize("name", list(SENDS))
def test_storescu_into_orthanc_keeps_every_pixel(
    name: str, orthanc: Orthanc, mr_series_factory: Callable[..., GeneratedSeries]
) -> None:
    transfer_syntax, overrides = SENDS[name]
    series = mr_series_factory(
        slices=7,
        rows=65,
        columns=52,
        transfer_syntax=transfer_syntax,
        seed=hash(name) % 1000,
        **overrides,
    )

    storescu(
        series.directory,
        "127.0.0.1",
        orthanc.dicom_port,
        MODALITY_AET,
        orthanc.aet,
        storescu_syntax_args(transfer_syntax),
    )

    assert orthanc.count_instances(series.series_uid) == len(series.instances)
    found = orthanc.find_series(series.study_uid)
    assert [s["MainDicomTags"]["SeriesInstanceUID"] for s in found] == [series.series_uid]
    expected = series.pixels_by_uid
    for ds in orthanc.series_datasets(series.series_uid):
        assert ds.file_meta.TransferSyntaxUID == transfer_syntax
        assert str(ds.PatientName) == series.spec.effective_study.patient_name
        np.testing.assert_array_equal(ds.pixel_array, expected[ds.SOPInstanceUID])


def test_compressed_files_need_their_storescu_option(
    orthanc: Orthanc, mr_series_factory: Callable[..., GeneratedSeries]
) -> None:
    series = mr_series_factory(slices=2, transfer_syntax=RLELossless)
    done = storescu(
        series.directory, "127.0.0.1", orthanc.dicom_port, MODALITY_AET, orthanc.aet, check=False
    )
    assert done.returncode != 0
    assert orthanc.count_instances(series.series_uid) == 0


def test_orthanc_checks_the_called_ae_title(orthanc: Orthanc) -> None:
    assert echoscu("127.0.0.1", orthanc.dicom_port, orthanc.aet)
    assert not echoscu("127.0.0.1", orthanc.dicom_port, "NOT_ORTHANC")


def test_orthanc_pushes_a_series_to_a_declared_modality(
    orthanc: Orthanc, storescp: StoreSCP, mr_series: GeneratedSeries
) -> None:
    storescu(mr_series.directory, "127.0.0.1", orthanc.dicom_port, MODALITY_AET, orthanc.aet)
    orthanc.set_modality("RECEIVER", Modality(storescp.aet, storescp.port))
    answer = orthanc.push_series(mr_series.series_uid, "RECEIVER")

    assert answer["InstancesCount"] == len(mr_series.instances)
    files = storescp.wait_for_files(len(mr_series.instances), timeout=30)
    assert len(files) == len(mr_series.instances)


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"orientation": "oblique", "rows": 71, "columns": 50},
        {"orientation": "sagittal", "echoes": 2, "shuffle": True},
        {"signed": True, "bits_stored": 16, "rescale_intercept": 1000.0, "rescale_slope": 1.0},
        {"transfer_syntax": JPEGLosslessSV1},
        {"transfer_syntax": RLELossless, "private_tags": False},
    ],
    ids=["axial", "oblique", "echoes", "signed-rescaled", "jpeg-lossless", "rle"],
)
def test_generated_classic_mr_passes_dciodvfy(
    overrides: dict[str, object], mr_series_factory: Callable[..., GeneratedSeries]
) -> None:
    series = mr_series_factory(slices=3, **overrides)
    for path in series.paths:
        assert dciodvfy(path) == [], path


@pytest.mark.parametrize("orientation", ["axial", "sagittal", "coronal", "oblique"])
def test_dcm2niix_sees_the_generated_geometry(
    orientation: str, tmp_path: Path, mr_series_factory: Callable[..., GeneratedSeries]
) -> None:
    series = mr_series_factory(
        slices=5,
        rows=40,
        columns=36,
        orientation=orientation,
        slice_thickness=4.0,
        pixel_spacing=(2.5, 3.0),
    )
    affine = dcm2niix_affine(series.directory, tmp_path / "nifti")

    voxel_sizes = np.linalg.norm(affine[:3, :3], axis=0)
    np.testing.assert_allclose(voxel_sizes, [3.0, 2.5, 4.0], atol=1e-3)
    normal_ras = series.instances[0].geometry.normal * np.array([-1.0, -1.0, 1.0])
    slice_axis = affine[:3, 2] / 4.0
    np.testing.assert_allclose(np.abs(slice_axis @ normal_ras), 1.0, atol=1e-4)


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"echoes": 3, "orientation": "oblique", "rescale_slope": 0.5, "rescale_intercept": 10.0},
        {"signed": True, "bits_stored": 16, "transfer_syntax": JPEG2000Lossless},
    ],
    ids=["plain", "echoes-oblique-rescaled", "signed-j2k"],
)
def test_generated_enhanced_mr_passes_dciodvfy(
    overrides: dict[str, object], mr_series_factory: Callable[..., GeneratedSeries]
) -> None:
    series = mr_series_factory(enhanced=True, slices=4, **overrides)
    assert dciodvfy(series.paths[0]) == []


def test_non_mr_objects_pass_dciodvfy(tmp_path: Path) -> None:
    study = StudyInfo(seed=5)
    for path in (write_secondary_capture(tmp_path, study), write_ct_image(tmp_path, study)):
        assert dciodvfy(path) == [], path


def test_orthanc_takes_a_mixed_study(
    orthanc: Orthanc, tmp_path: Path, mr_series_factory: Callable[..., GeneratedSeries]
) -> None:
    study = StudyInfo(seed=6)
    classic = mr_series_factory(study=study, series_number=3, slices=4)
    enhanced = mr_series_factory(study=study, series_number=4, slices=4, enhanced=True)
    others = tmp_path / "others"
    write_secondary_capture(others, study)
    write_ct_image(others, study)
    write_legacy_converted(others, classic.paths, seed=6)
    for folder in (classic.directory, enhanced.directory):
        storescu(folder, "127.0.0.1", orthanc.dicom_port, MODALITY_AET, orthanc.aet)
    # storescu's default proposal list lacks Legacy Converted Enhanced MR: -R proposes
    # exactly the SOP classes and transfer syntaxes of the files instead.
    storescu(others, "127.0.0.1", orthanc.dicom_port, MODALITY_AET, orthanc.aet, ["-R"])

    found = {
        s["MainDicomTags"]["SeriesInstanceUID"]: s for s in orthanc.find_series(study.study_uid)
    }
    assert len(found) == 5
    assert len(found[classic.series_uid]["Instances"]) == 4
    assert len(found[enhanced.series_uid]["Instances"]) == 1
    (back,) = orthanc.series_datasets(enhanced.series_uid)
    np.testing.assert_array_equal(back.pixel_array, enhanced.instances[0].stored)


def test_orthanc_acknowledges_a_truncated_file(
    orthanc: Orthanc, tmp_path: Path, mr_series_factory: Callable[..., GeneratedSeries]
) -> None:
    """The PACS does not filter garbage: a cut file sent with pynetdicom is answered 0x0000."""
    series = mr_series_factory(slices=2)
    damaged = truncated_copy(series.paths[0], tmp_path / "bad" / "cut.dcm", keep=0.8)

    statuses = send_files(
        [damaged, series.paths[1]],
        "127.0.0.1",
        orthanc.dicom_port,
        MODALITY_AET,
        orthanc.aet,
        timeout=10,
    )

    assert statuses == [0x0000, 0x0000]
    assert orthanc.count_instances(series.series_uid) == 2
