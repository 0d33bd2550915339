"""Every common form of MR input through the pipeline (``denoise_series``), with a stand-in
network that gives its input back: each derived object must hold the source's exact stored
values, geometry, character set and private tags, and pass dciodvfy.

The real network and real peers run the same inputs in tests/integration/test_input_matrix.py.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import (
    JPEG2000,
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
)

from denoised_node.config.settings import Settings
from denoised_node.daemon.jobs.pipeline import SeriesOutcome, denoise_series
from tests.fixtures.classic_mr import PRIVATE_CREATOR, PRIVATE_GROUP
from tests.fixtures.identity import StudyInfo
from tests.fixtures.mr_series import GeneratedSeries
from tests.fixtures.other_objects import write_legacy_converted
from tests.integration.peers import dciodvfy

Factory = Callable[..., GeneratedSeries]
NOW = datetime(2026, 11, 25, 10, 0, 0, tzinfo=UTC)


class IdentityDenoiser:
    """The network's interface, returning the volume unchanged: derived == source."""

    identity = "identity-test-model"

    class card:  # noqa: N801 - mimics the model card's attributes
        name = "identity"
        version = "1.0"

    def denoise(self, volume: np.ndarray, progress: Any = None, spacing: Any = None) -> np.ndarray:
        return volume.copy()


def run(paths: list[Path], series_uid: str, settings: Settings, out: Path) -> SeriesOutcome:
    return denoise_series(paths, series_uid, IdentityDenoiser(), settings, out, NOW)


def source_of(derived: Dataset, frame: int) -> tuple[str, int | None]:
    """(SOP Instance UID, 1-based frame or None) that a derived image or frame names."""
    if "PerFrameFunctionalGroupsSequence" in derived:
        group = derived.PerFrameFunctionalGroupsSequence[frame]
        ref = group.DerivationImageSequence[0].SourceImageSequence[0]
        number = ref.get("ReferencedFrameNumber")
        return str(ref.ReferencedSOPInstanceUID), None if number is None else int(number)
    return str(derived.SourceImageSequence[0].ReferencedSOPInstanceUID), None


def frames_of(ds: Dataset) -> np.ndarray:
    pixels = ds.pixel_array
    return pixels if pixels.ndim == 3 else pixels[np.newaxis]


def geometry(ds: Dataset, frame: int) -> tuple[list[float], list[float], list[float]]:
    """(position, orientation, spacing) of a classic image or one frame, as stored."""
    if "PerFrameFunctionalGroupsSequence" not in ds:
        return list(ds.ImagePositionPatient), list(ds.ImageOrientationPatient), list(
            ds.PixelSpacing)

    def item(keyword: str) -> Dataset:
        for groups in (ds.PerFrameFunctionalGroupsSequence[frame],
                       ds.SharedFunctionalGroupsSequence[0]):
            if keyword in groups:
                return groups[keyword][0]
        raise KeyError(keyword)

    return (list(item("PlanePositionSequence").ImagePositionPatient),
            list(item("PlaneOrientationSequence").ImageOrientationPatient),
            list(item("PixelMeasuresSequence").PixelSpacing))


def private_values(ds: Dataset) -> list[Any]:
    block = ds.private_block(PRIVATE_GROUP, PRIVATE_CREATOR)
    return [block[offset].value for offset in (0x10, 0x11, 0x12)]


def check_derived_like_source(files: list[Path], sources: list[Path]) -> None:
    """Identity network: stored values, geometry, identity and private tags all kept."""
    by_uid = {str(ds.SOPInstanceUID): ds for ds in map(pydicom.dcmread, sources)}
    for path in files:
        derived = pydicom.dcmread(path)
        assert dciodvfy(path) == [], f"dciodvfy errors in {path.name}"
        assert derived.ImageType[0] == "DERIVED"
        for index, pixels in enumerate(frames_of(derived)):
            uid, number = source_of(derived, index)
            source = by_uid[uid]
            source_frame = 0 if number is None else number - 1
            np.testing.assert_array_equal(pixels, frames_of(source)[source_frame])
            assert geometry(derived, index) == geometry(source, source_frame)
        # Same kind and size (a big-endian source's '>i2' comes out little endian).
        assert derived.pixel_array.dtype.str[1:] == source.pixel_array.dtype.str[1:]
        assert derived.SOPClassUID == source.SOPClassUID
        assert derived.StudyInstanceUID == source.StudyInstanceUID
        assert derived.FrameOfReferenceUID == source.FrameOfReferenceUID
        assert derived.SpecificCharacterSet == source.SpecificCharacterSet
        assert derived.PatientName == source.PatientName
        assert derived.BitsStored == source.BitsStored
        assert derived.PixelRepresentation == source.PixelRepresentation
        if PRIVATE_CREATOR in source.private_creators(PRIVATE_GROUP):
            assert private_values(derived) == private_values(source)


CASES: dict[str, dict[str, Any]] = {
    "rle": {"transfer_syntax": RLELossless},
    "jpeg-lossless-sv1": {"transfer_syntax": JPEGLosslessSV1},
    "jpeg-lossless-process-14": {"transfer_syntax": JPEGLossless},
    "jpeg-ls-lossless": {"transfer_syntax": JPEGLSLossless},
    "jpeg2000-lossless": {"transfer_syntax": JPEG2000Lossless},
    "implicit-vr": {"transfer_syntax": ImplicitVRLittleEndian},
    "bits-stored-12": {"bits_stored": 12},
    "bits-stored-16": {"bits_stored": 16},
    "signed": {"signed": True, "bits_stored": 16},
    "signed-12-rescaled": {"signed": True, "bits_stored": 12, "rescale_slope": 2.0,
                           "rescale_intercept": -500.0},
    "rescale": {"rescale_slope": 0.25, "rescale_intercept": 100.0},
    "matrix-320x260": {"rows": 320, "columns": 260, "slices": 2},
    "matrix-270x270": {"rows": 270, "columns": 270, "slices": 2},
    "matrix-512x512": {"rows": 512, "columns": 512, "slices": 2},
    "matrix-768x640": {"rows": 768, "columns": 640, "slices": 1},
    "oblique-out-of-order": {"orientation": "oblique", "shuffle": True, "slices": 5},
    "sagittal": {"orientation": "sagittal"},
    "coronal-gap": {"orientation": "coronal", "slice_spacing": 6.5},
    "single-slice": {"slices": 1},
    "no-private-tags": {"private_tags": False},
    "enhanced": {"enhanced": True},
    "enhanced-jpeg2000-signed": {"enhanced": True, "transfer_syntax": JPEG2000Lossless,
                                 "signed": True, "bits_stored": 16},
    "enhanced-rle-rescaled": {"enhanced": True, "transfer_syntax": RLELossless,
                              "rescale_slope": 0.5, "rescale_intercept": 10.0},
    "enhanced-oblique-echoes": {"enhanced": True, "orientation": "oblique", "echoes": 2},
    "enhanced-temporal": {"enhanced": True, "temporal_positions": 2},
    "enhanced-single-frame": {"enhanced": True, "slices": 1},
}


@pytest.mark.parametrize("overrides", CASES.values(), ids=CASES.keys())
def test_input_comes_out_with_its_own_values(mr_series_factory: Factory, settings: Settings,
                                             tmp_path: Path, overrides: dict[str, Any]) -> None:
    spec = {"slices": 3, "rows": 48, "columns": 40, **overrides}
    series = mr_series_factory(**spec)
    outcome = run(series.paths, series.series_uid, settings, tmp_path / "out")
    assert outcome.skipped == []
    assert len(outcome.files) == len(series.paths)
    check_derived_like_source(outcome.files, series.paths)


def _rewrite(paths: list[Path], transfer_syntax: str) -> None:
    """Re-encode files in place: Deflated or (retired) big-endian Explicit VR."""
    for path in paths:
        ds = pydicom.dcmread(path)
        pixels = ds.pixel_array
        ds.file_meta.TransferSyntaxUID = UID(transfer_syntax)
        if transfer_syntax == ExplicitVRBigEndian:
            ds.PixelData = pixels.astype(pixels.dtype.newbyteorder(">")).tobytes()
            pydicom.dcmwrite(path, ds, implicit_vr=False, little_endian=False,
                             force_encoding=True)
        else:
            ds.save_as(path, enforce_file_format=True)


@pytest.mark.parametrize("syntax", [DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian],
                         ids=["deflated", "big-endian"])
def test_rarer_uncompressed_syntaxes(mr_series_factory: Factory, settings: Settings,
                                     tmp_path: Path, syntax: str) -> None:
    series = mr_series_factory(slices=2, signed=True, bits_stored=16)
    _rewrite(series.paths, syntax)
    assert pydicom.dcmread(series.paths[0]).file_meta.TransferSyntaxUID == syntax
    outcome = run(series.paths, series.series_uid, settings, tmp_path / "out")
    check_derived_like_source(outcome.files, series.paths)


def test_legacy_converted_enhanced_mr(mr_series_factory: Factory, settings: Settings,
                                      tmp_path: Path) -> None:
    classic = mr_series_factory(slices=4, echoes=2, orientation="oblique", shuffle=True)
    legacy = write_legacy_converted(tmp_path / "legacy", classic.paths)
    outcome = run([legacy], str(pydicom.dcmread(legacy).SeriesInstanceUID), settings,
                  tmp_path / "out")
    (derived,) = outcome.files
    assert pydicom.dcmread(derived).NumberOfFrames == 8
    check_derived_like_source(outcome.files, [legacy])


CHARACTER_SETS = {
    "utf-8": ("ISO_IR 192", "Müller^Jürgen=山田^太郎", "Kopf Übersicht 頭部"),
    "latin-1": ("ISO_IR 100", "Müller^Jürgen", "Schädel axial"),
    "cyrillic": ("ISO_IR 144", "Иванов^Иван", "Голова"),
    "greek": ("ISO_IR 126", "Παπαδόπουλος^Γιώργος", "Κεφάλι"),
    "japanese-iso-2022": (("", "ISO 2022 IR 87"), "Yamada^Tarou=山田^太郎=やまだ^たろう", "頭部"),
    "chinese-gb18030": ("GB18030", "王^小明", "头部 轴位"),
    "korean-iso-2022": (("", "ISO 2022 IR 149"), "Hong^Gildong=洪^吉洞=홍^길동", "머리"),
}


@pytest.mark.parametrize("charset,name,description", CHARACTER_SETS.values(),
                         ids=CHARACTER_SETS.keys())
def test_specific_character_sets_are_kept(mr_series_factory: Factory, settings: Settings,
                                          tmp_path: Path, charset: Any, name: str,
                                          description: str) -> None:
    study = StudyInfo(seed=7, charset=charset, patient_name=name)
    series = mr_series_factory(slices=2, study=study, series_description=description)
    outcome = run(series.paths, series.series_uid, settings, tmp_path / "out")
    check_derived_like_source(outcome.files, series.paths)
    for path in outcome.files:
        raw = pydicom.dcmread(path)
        assert str(raw.PatientName) == name
        assert raw.SeriesDescription == f"{description} DENOISED"
    source_raw = pydicom.dcmread(series.paths[0])["PatientName"]
    derived_raw = pydicom.dcmread(outcome.files[0])["PatientName"]
    assert derived_raw.value == source_raw.value


def test_lossy_source_stays_marked_lossy(mr_series_factory: Factory, settings: Settings,
                                         tmp_path: Path) -> None:
    """Lossy JPEG 2000 in: the derived object is written losslessly but says, as the source
    did, that its values went through lossy compression once."""
    series = mr_series_factory(slices=2)
    for path in series.paths:
        ds = pydicom.dcmread(path)
        ds.compress(JPEG2000, j2k_cr=[10], generate_instance_uid=False)
        ds.LossyImageCompression = "01"
        ds.LossyImageCompressionRatio = 10
        ds.LossyImageCompressionMethod = "ISO_15444_1"
        ds.save_as(path)
    outcome = run(series.paths, series.series_uid, settings, tmp_path / "out")
    for path in outcome.files:
        derived = pydicom.dcmread(path)
        assert derived.LossyImageCompression == "01"
        assert derived.LossyImageCompressionMethod == "ISO_15444_1"
        assert dciodvfy(path) == []


class SpacingRecorder(IdentityDenoiser):
    """Records the voxel spacing each stack is denoised with."""

    def __init__(self) -> None:
        self.spacings: list[Any] = []

    def denoise(self, volume: np.ndarray, progress: Any = None, spacing: Any = None) -> np.ndarray:
        self.spacings.append(spacing)
        return volume.copy()


def test_each_stack_is_denoised_with_its_voxel_spacing(mr_series_factory: Factory,
                                                       settings: Settings, tmp_path: Path) -> None:
    """The spacing decides whether a volume is denoised in several planes."""
    iso = mr_series_factory(slices=4, rows=32, columns=32, pixel_spacing=(1.0, 1.0),
                            slice_thickness=1.0, orientation="oblique", shuffle=True)
    thick = mr_series_factory(slices=3, rows=32, columns=32, pixel_spacing=(0.5, 0.5),
                              slice_thickness=5.0)
    recorder = SpacingRecorder()
    denoise_series(iso.paths, iso.series_uid, recorder, settings, tmp_path / "iso", NOW)
    denoise_series(thick.paths, thick.series_uid, recorder, settings, tmp_path / "thick", NOW)
    assert recorder.spacings == [pytest.approx((1.0, 1.0, 1.0)), pytest.approx((5.0, 0.5, 0.5))]
