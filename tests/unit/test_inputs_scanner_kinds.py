"""What real scanners send beyond the textbook series (issue 17): Siemens mosaics, localizers
that do not say LOCALIZER, reformats, empty stacks, private elements without a VR and
Enhanced MR attributes that a DERIVED object must not carry."""

from __future__ import annotations

import re
import struct
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from pydicom.dataelem import DataElement
from pydicom.tag import Tag
from pydicom.uid import ImplicitVRLittleEndian

from denoised_node.config.settings import Settings
from denoised_node.daemon.jobs.pipeline import denoise_series
from denoised_node.storage.images.mosaic import csa_fields
from denoised_node.storage.images.series import NothingToDenoise, flat_reason, plan_stacks
from tests.fixtures.mr_series import GeneratedSeries
from tests.integration.peers import dciodvfy

Factory = Callable[..., GeneratedSeries]
NOW = datetime(2026, 11, 25, 10, 0, 0, tzinfo=UTC)


class Recorder:
    """The network's interface: records each volume's shape, gives back volume + 1."""

    identity = "recorder-model"

    class card:  # noqa: N801 - mimics the model card's attributes
        name = "recorder"
        version = "1.0"

    def __init__(self) -> None:
        self.shapes: list[tuple[int, ...]] = []

    def denoise(self, volume: np.ndarray, progress: Any = None, spacing: Any = None) -> np.ndarray:
        self.shapes.append(volume.shape)
        return volume + 1


def csa_header(fields: dict[str, str]) -> bytes:
    """A Siemens CSA2 header (SV10) holding one value per field."""
    out = [b"SV10\x04\x03\x02\x01", struct.pack("<2I", len(fields), 77)]
    for name, value in fields.items():
        data = value.encode() + b"\0"
        out.append(struct.pack("<64si4s3i", name.encode(), 1, b"IS\0\0", 6, 1, 77))
        out.append(struct.pack("<4i", len(data), len(data), 77, len(data)))
        out.append(data + b"\0" * (-len(data) % 4))
    return b"".join(out)


def make_mosaic(series: GeneratedSeries, count: int | None) -> Path:
    """The series' first 64x56 image turned into a 2x2 mosaic of 32x28 tiles, ``count`` of
    them used (None: no header says how many), like a Siemens EPI."""
    path = series.paths[0]
    ds = pydicom.dcmread(path)
    tiles = np.zeros((64, 56), dtype=np.uint16)
    for index in range(count or 3):
        row, column = divmod(index, 2)
        tiles[row * 32:(row + 1) * 32, column * 28:(column + 1) * 28] = 100 * (index + 1) + (
            np.arange(32 * 28).reshape(32, 28) % 7)
    ds.PixelData = tiles.tobytes()
    ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "ND", "MOSAIC"]
    if count is not None:
        block = ds.private_block(0x0029, "SIEMENS CSA HEADER", create=True)
        block.add_new(0x10, "OB", csa_header({"NumberOfImagesInMosaic": str(count)}))
    ds.save_as(path)
    return path


def test_csa_reader_reads_the_header_it_is_given() -> None:
    assert csa_fields(csa_header({"NumberOfImagesInMosaic": "48", "B_value": "1000"})) == {
        "NumberOfImagesInMosaic": ["48"], "B_value": ["1000"]}
    assert csa_fields(b"SV10\x04\x03\x02\x01\xff") == {}  # damaged: nothing, no exception


@pytest.mark.parametrize("count", [3, None], ids=["csa-header", "counted-tiles"])
def test_a_mosaic_is_denoised_as_a_volume_and_tiled_back(
        mr_series_factory: Factory, settings: Settings, tmp_path: Path, count: int | None) -> None:
    path = make_mosaic(mr_series_factory(slices=1), count)
    network = Recorder()
    outcome = denoise_series([path], "1.2.3", network, settings, tmp_path / "out", NOW)
    assert network.shapes == [(3, 32, 28)]  # three slices, never one 64x56 image
    source, (derived,) = pydicom.dcmread(path), [pydicom.dcmread(p) for p in outcome.files]
    assert (derived.Rows, derived.Columns) == (64, 56)
    expected = source.pixel_array.astype(np.int32)
    expected[:32, :] += 1
    expected[32:, :28] += 1  # the fourth cell holds no slice: kept as it came
    assert np.array_equal(derived.pixel_array, expected)
    assert "MOSAIC" in derived.ImageType
    assert dciodvfy(outcome.files[0]) == []


def test_a_site_may_ignore_mosaics(mr_series_factory: Factory, settings_factory: Any,
                                   tmp_path: Path) -> None:
    path = make_mosaic(mr_series_factory(slices=1), 3)
    with pytest.raises(NothingToDenoise, match='mosaic \\(series.mosaics = "ignore"\\)'):
        denoise_series([path], "1.2.3", Recorder(), settings_factory(series__mosaics="ignore"),
                       tmp_path / "out", NOW)


LOCALIZERS = {"siemens-scout": {"ProtocolName": "AAHead_Scout_64ch-head-coil"},
              "philips-fast": {"SeriesDescription": "FAST LOCALIZER"},
              "philips-survey": {"SeriesDescription": "Survey"},
              "ge-3plane": {"SeriesDescription": "3-Plane Loc"},
              "pilot": {"SeriesDescription": "T/S/C RF FAST PILOT"},
              "localiser": {"SeriesDescription": "localiser_haste"}}


@pytest.mark.parametrize("extra", LOCALIZERS.values(), ids=LOCALIZERS.keys())
def test_localizers_are_known_by_their_names(mr_series_factory: Factory,
                                             extra: dict[str, str]) -> None:
    plan = plan_stacks(mr_series_factory(slices=2, extra=extra).paths)
    assert plan.stacks == []
    assert all(reason.startswith("localizer (named") for _, reason in plan.skipped)


def test_ordinary_names_are_not_localizers(mr_series_factory: Factory) -> None:
    for description in ("t2_tse_tra", "SURVIVAL T1", "ep2d_diff_3scan_trace", "cor scoutless"):
        series = mr_series_factory(slices=2, extra={"SeriesDescription": description})
        assert plan_stacks(series.paths).skipped == [], description


def test_three_orthogonal_planes_in_one_series_are_a_localizer(
        mr_series_factory: Factory) -> None:
    first = mr_series_factory(slices=3, orientation="sagittal", series_description="T1")
    paths = list(first.paths)
    for seed, orientation in ((2, "coronal"), (3, "axial")):
        paths += mr_series_factory(slices=3, seed=seed, orientation=orientation,
                                   study=first.spec.effective_study,
                                   extra={"SeriesInstanceUID": first.series_uid}).paths
    plan = plan_stacks(paths)
    assert plan.stacks == []
    assert {reason for _, reason in plan.skipped} == {
        "localizer (three orthogonal planes in one series)"}


def test_tiny_matrices_are_thumbnails_or_surveys(mr_series_factory: Factory) -> None:
    plan = plan_stacks(mr_series_factory(slices=2, rows=16, columns=16).paths)
    assert plan.stacks == []
    assert plan.skipped[0][1] == "localizer or thumbnail (matrix 16x16, under 24)"


REFORMATS = {"siemens-mpr": (["DERIVED", "SECONDARY", "MPR", "CSA MPR", "", "CSAPARALLEL"],
                             "reformat (MPR)"),
             "resampled": (["DERIVED", "SECONDARY", "RESAMPLED"], "reformat (resampled)"),
             "named": (["DERIVED", "SECONDARY", "OTHER"], "reformat (named 'MPR')")}


@pytest.mark.parametrize("image_type,reason", REFORMATS.values(), ids=REFORMATS.keys())
def test_reformats_are_left_to_their_source(mr_series_factory: Factory, settings_factory: Any,
                                            tmp_path: Path, image_type: list[str],
                                            reason: str) -> None:
    series = mr_series_factory(slices=2, extra={"ImageType": image_type,
                                                "SeriesDescription": "t1 <MPR Collection>"})
    with pytest.raises(NothingToDenoise, match=re.escape(f"nothing to denoise: {reason}")):
        denoise_series(series.paths, series.series_uid, Recorder(), settings_factory(),
                       tmp_path / "a", NOW)
    outcome = denoise_series(series.paths, series.series_uid, Recorder(),
                             settings_factory(series__reformats="denoise"), tmp_path / "b", NOW)
    assert len(outcome.files) == 2


def test_an_empty_stack_is_ignored_before_the_network(mr_series_factory: Factory,
                                                      settings: Settings, tmp_path: Path) -> None:
    empty = mr_series_factory(slices=3)
    for path in empty.paths:
        ds = pydicom.dcmread(path)
        ds.PixelData = np.zeros((ds.Rows, ds.Columns), np.uint16).tobytes()
        ds.save_as(path)
    network = Recorder()
    with pytest.raises(NothingToDenoise, match=r"nothing to denoise: empty stack"):
        denoise_series(empty.paths, empty.series_uid, network, settings, tmp_path / "a", NOW)
    assert network.shapes == []
    echoes = mr_series_factory(slices=3, echoes=2, enhanced=True)
    ds = pydicom.dcmread(echoes.paths[0])
    frames = ds.pixel_array.copy()
    frames[1::2] = 7  # the second echo's frames: one constant
    ds.PixelData = frames.tobytes()
    ds.save_as(echoes.paths[0])
    outcome = denoise_series(echoes.paths, echoes.series_uid, network, settings,
                             tmp_path / "b", NOW)
    assert network.shapes == [(3, 64, 56)]
    assert outcome.skipped[0][1].startswith("near-constant stack")
    derived = pydicom.dcmread(outcome.files[0]).pixel_array
    assert (derived[1::2] == 7).all() and np.array_equal(derived[::2], frames[::2] + 1)


def test_private_values_without_a_vr_are_written_as_they_came(
        mr_series_factory: Factory, settings: Settings, tmp_path: Path) -> None:
    series = mr_series_factory(slices=2, transfer_syntax=ImplicitVRLittleEndian)
    value = b"Tra>Cor(2.8)>Sag(0.6) "  # 22 bytes: too long for SH, pydicom's guess
    for path in series.paths:
        ds = pydicom.dcmread(path)
        block = ds.private_block(0x0051, "SIEMENS MR HEADER", create=True)
        ds[block.get_tag(0x0E)] = DataElement(block.get_tag(0x0E), "UN", value)
        ds.save_as(path, implicit_vr=True)
    outcome = denoise_series(series.paths, series.series_uid, Recorder(), settings,
                             tmp_path / "out", NOW)
    for path in outcome.files:
        assert dciodvfy(path) == []
        derived = pydicom.dcmread(path)
        element = derived.get_item(Tag(derived.private_block(0x0051, "SIEMENS MR HEADER")
                                       .get_tag(0x0E)))
        assert element.VR == "UN" and element.value == value


def test_enhanced_attributes_only_an_original_may_carry_are_dropped(
        mr_series_factory: Factory, settings: Settings, tmp_path: Path) -> None:
    series = mr_series_factory(slices=2, enhanced=True,
                               extra={"BulkMotionCompensationTechnique": "NONE"})
    outcome = denoise_series(series.paths, series.series_uid, Recorder(), settings,
                             tmp_path / "out", NOW)
    derived = pydicom.dcmread(outcome.files[0])
    assert "BulkMotionCompensationTechnique" not in derived
    assert dciodvfy(outcome.files[0]) == []


def test_a_small_object_in_a_zero_background_is_not_flat() -> None:
    volume = np.zeros((4, 64, 64), np.float32)
    volume[1:3, 30:34, 30:34] = 500.0  # 0.2 % of the stack
    assert flat_reason(volume) is None
    volume[:] = 0
    assert flat_reason(volume) == "empty stack (every value 0)"
    volume[0, 0, 0] = 900.0  # one stray value
    assert (flat_reason(volume) or "").startswith("near-constant stack")
