"""What the derived objects look like: the multi-frame form with its functional groups and
per-frame derivation, lossless output transfer syntaxes, and geometry as highdicom and
dcm2niix read it."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
)

from denoised_node.storage.images.derive import DerivationInfo, DerivedSeriesWriter
from denoised_node.storage.images.derived_uids import DerivedUIDs
from denoised_node.storage.images.series import load_volume, plan_stacks
from tests.fixtures.mr_series import GeneratedSeries
from tests.fixtures.other_objects import write_legacy_converted
from tests.integration.peers import dciodvfy, dcm2niix_affines

Factory = Callable[..., GeneratedSeries]
NOW = datetime(2026, 11, 25, 10, 0, 0, tzinfo=UTC)


def _info(transfer_syntax: str = "explicit") -> DerivationInfo:
    return DerivationInfo(model_identity="model-a", model_name="unet", model_version="1.0",
                          software_version="0.1.0", transfer_syntax=transfer_syntax)


def derive(paths: list[Path], out: Path, info: DerivationInfo | None = None) -> list[Path]:
    """The writer with the input given back unchanged (what a perfect no-op network gives)."""
    info = info or _info()
    plan = plan_stacks(paths)
    source_series = str(pydicom.dcmread(paths[0], stop_before_pixels=True).SeriesInstanceUID)
    writer = DerivedSeriesWriter(out, info, NOW,
                                 DerivedUIDs.for_plan(info.model_identity, source_series, plan))
    for stack in plan.stacks:
        writer.add_stack(stack, load_volume(stack))
    return writer.close()


def _group_keywords(group: Dataset) -> set[str]:
    return {element.keyword for element in group}


def test_enhanced_mr_stays_one_multiframe_object(mr_series_factory: Factory,
                                                 tmp_path: Path) -> None:
    series = mr_series_factory(slices=3, echoes=2, enhanced=True)
    (path,) = derive(series.paths, tmp_path / "out")
    source, derived = pydicom.dcmread(series.paths[0]), pydicom.dcmread(path)
    assert dciodvfy(path) == []
    assert derived.NumberOfFrames == source.NumberOfFrames == 6
    assert list(derived.ImageType) == ["DERIVED", "PRIMARY", *source.ImageType[2:]]
    assert derived.DimensionIndexSequence == source.DimensionIndexSequence
    assert _group_keywords(derived.SharedFunctionalGroupsSequence[0]) == _group_keywords(
        source.SharedFunctionalGroupsSequence[0])
    frame_type = derived.SharedFunctionalGroupsSequence[0].MRImageFrameTypeSequence[0]
    assert list(frame_type.FrameType) == ["DERIVED", "PRIMARY", "VOLUME", "NONE"]
    for number, (before, after) in enumerate(zip(source.PerFrameFunctionalGroupsSequence,
                                                 derived.PerFrameFunctionalGroupsSequence), 1):
        assert _group_keywords(after) == _group_keywords(before) | {"DerivationImageSequence"}
        assert after.PlanePositionSequence == before.PlanePositionSequence
        assert after.FrameContentSequence == before.FrameContentSequence
        (derivation,) = after.DerivationImageSequence
        assert derivation.DerivationCodeSequence[0].CodeValue == "113087"
        (reference,) = derivation.SourceImageSequence
        assert reference.ReferencedSOPInstanceUID == source.SOPInstanceUID
        assert reference.ReferencedFrameNumber == number
        assert reference.PurposeOfReferenceCodeSequence[0].CodeValue == "121322"
    evidence = derived.SourceImageEvidenceSequence[0]
    assert evidence.StudyInstanceUID == source.StudyInstanceUID
    assert evidence.ReferencedSeriesSequence[0].ReferencedSOPSequence[0] \
        .ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert derived.ReferencedSeriesSequence[0].SeriesInstanceUID == source.SeriesInstanceUID
    # dciodvfy allows the MR Pulse Sequence module only in ORIGINAL images.
    assert "PulseSequenceName" not in derived and "MRAcquisitionType" not in derived
    assert "SourceImageSequence" not in derived  # per frame, not at the top level
    assert derived.SeriesInstanceUID == DerivedUIDs.for_plan(
        "model-a", source.SeriesInstanceUID, plan_stacks(series.paths)).series_uid


def test_legacy_converted_output_is_cleaner_than_its_input(mr_series_factory: Factory,
                                                           tmp_path: Path) -> None:
    classic = mr_series_factory(slices=3)
    legacy = write_legacy_converted(tmp_path / "legacy", classic.paths)
    assert dciodvfy(legacy) != []  # highdicom 0.28: ReferencedSeriesSequence without instances
    (path,) = derive([legacy], tmp_path / "out")
    derived = pydicom.dcmread(path)
    assert dciodvfy(path) == []
    assert derived.SOPClassUID == pydicom.dcmread(legacy).SOPClassUID
    assert all(item.ReferencedInstanceSequence for item in derived.ReferencedSeriesSequence)


SYNTAXES = {"explicit": ExplicitVRLittleEndian, "implicit": ImplicitVRLittleEndian,
            "rle": RLELossless, "jpeg-ls": JPEGLSLossless, "jpeg2000": JPEG2000Lossless}


@pytest.mark.parametrize("name", SYNTAXES)
@pytest.mark.parametrize("enhanced", [False, True], ids=["classic", "enhanced"])
def test_output_transfer_syntaxes_are_lossless(mr_series_factory: Factory, tmp_path: Path,
                                               name: str, enhanced: bool) -> None:
    series = mr_series_factory(slices=2, signed=True, bits_stored=16, enhanced=enhanced)
    files = derive(series.paths, tmp_path / "out", _info(name))
    sources = {pydicom.dcmread(p).SOPInstanceUID: pydicom.dcmread(p) for p in series.paths}
    for path in files:
        derived = pydicom.dcmread(path)
        assert derived.file_meta.TransferSyntaxUID == SYNTAXES[name]
        if enhanced:
            source = next(iter(sources.values()))
        else:
            source = sources[derived.SourceImageSequence[0].ReferencedSOPInstanceUID]
        np.testing.assert_array_equal(derived.pixel_array, source.pixel_array)
        assert dciodvfy(path) == []


def test_unknown_output_syntax_is_refused() -> None:
    with pytest.raises(ValueError, match="jpeg-ls"):
        _info("jpeg-lossy")


def _affines(directory: Path, out: Path) -> list[np.ndarray]:
    return [affine for _, affine in sorted(dcm2niix_affines(directory, out).items())]


@pytest.mark.parametrize("overrides", [
    {"orientation": "oblique", "shuffle": True, "rows": 40, "columns": 52},
    {"orientation": "sagittal", "echoes": 2},
    {"orientation": "oblique", "enhanced": True},
    {"orientation": "coronal", "enhanced": True, "echoes": 2},
], ids=["classic-oblique", "classic-sagittal-echoes", "enhanced-oblique", "enhanced-echoes"])
def test_dcm2niix_gives_the_source_affine(mr_series_factory: Factory, tmp_path: Path,
                                          overrides: dict[str, object]) -> None:
    series = mr_series_factory(slices=4, **overrides)
    derive(series.paths, tmp_path / "out")
    source, derived = (_affines(series.directory, tmp_path / "nii-source"),
                       _affines(tmp_path / "out", tmp_path / "nii-derived"))
    assert len(source) == len(derived) >= 1  # classic echoes: one file each; enhanced: 4D
    for before, after in zip(source, derived):
        np.testing.assert_allclose(after, before, atol=1e-4)


def test_highdicom_rebuilds_the_source_geometry(mr_series_factory: Factory,
                                                tmp_path: Path) -> None:
    classic = mr_series_factory(slices=5, orientation="oblique", shuffle=True)
    files = derive(classic.paths, tmp_path / "classic")
    source = hd.get_volume_from_series([pydicom.dcmread(p) for p in classic.paths])
    assert hd.get_volume_from_series([pydicom.dcmread(p) for p in files]).geometry_equal(source)

    enhanced = mr_series_factory(slices=5, orientation="oblique", enhanced=True)
    (path,) = derive(enhanced.paths, tmp_path / "enhanced")
    source = hd.imread(enhanced.paths[0]).get_volume()
    assert hd.imread(path).get_volume().geometry_equal(source)
