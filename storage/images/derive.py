"""The derived series writer: one derived instance per source instance, same SOP class.

New UIDs are derived deterministically from the model's identity, the source UIDs and what
the sources hold (storage/images/derived_uids.py): a replay replaces (never duplicates) the derived
series in the PACS, while new content or a new model gives a new series beside the old one.
A multi-frame source (Enhanced or Legacy Converted Enhanced
MR) gives a multi-frame object with the same functional groups, each frame marked DERIVED and
pointing at its source frame. Everything else of the source is kept: private tags, the
specific character set and its values, window, geometry.

A derived object is made from the header that planning read (SourceImage.header, copied) and
the denoised values; the source's pixel data is read again only for what was not denoised
(frames of a stack left out, mosaic grid cells without a slice).
"""

from __future__ import annotations

import copy
import io
import logging
from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset
from pydicom.pixels import get_encoder
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import (
    UID,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
)

from denoised_node.storage.files import sync_filesystem, write_atomic
from denoised_node.storage.images.derived_uids import DerivedUIDs
from denoised_node.storage.images.mosaic import MosaicLayout
from denoised_node.storage.images.private_vr import keep_private_values_untyped
from denoised_node.storage.images.series import (
    ENHANCED_MR_IMAGE_STORAGE,
    MULTIFRAME_MR_SOP_CLASSES,
    PIXEL_DATA,
    PixelFormat,
    SeriesError,
    SliceRef,
    SourceImage,
    Stack,
)

log = logging.getLogger(__name__)

PRODUCER_MANUFACTURER = "denoised-node"
OUTPUT_TRANSFER_SYNTAXES = {
    "explicit": ExplicitVRLittleEndian,
    "implicit": ImplicitVRLittleEndian,
    "rle": RLELossless,
    "jpeg-ls": JPEGLSLossless,
    "jpeg2000": JPEG2000Lossless,
}
_ENCAPSULATED = frozenset({RLELossless, JPEGLSLossless, JPEG2000Lossless})
SERIES_NUMBER_OFFSET = 1000
IS_MIN, IS_MAX = -(2**31), 2**31 - 1  # what an Integer String may hold
# Attributes that describe the source's pixel values and would be wrong in the derived object.
_STALE_ATTRIBUTES = (
    "SmallestImagePixelValue", "LargestImagePixelValue", "SmallestPixelValueInSeries",
    "LargestPixelValueInSeries", "IconImageSequence", "PixelDataProviderURL",
)
# MR Pulse Sequence module: dciodvfy (dicom3tools) allows these in Enhanced MR only when
# ImageType value 1 is ORIGINAL or MIXED, so a DERIVED object must leave them out.
_ORIGINAL_ONLY_ENHANCED_MR = (
    "PulseSequenceName", "MRAcquisitionType", "EchoPulseSequence", "MultipleSpinEcho",
    "MultiPlanarExcitation", "PhaseContrast", "TimeOfFlightContrast",
    "SteadyStatePulseSequence", "EchoPlanarPulseSequence", "SaturationRecovery",
    "SpectrallySelectedSuppression", "OversamplingPhase", "GeometryOfKSpaceTraversal",
    "RectilinearPhaseEncodeReordering", "SegmentedKSpaceTraversal", "CoverageOfKSpace",
    "NumberOfKSpaceTrajectories",
    # MR Image and Spectroscopy Instance macro (Enhanced MR Image module): conditional on
    # ImageType value 1 ORIGINAL or MIXED as well.
    "BulkMotionCompensationTechnique", "BulkMotionSignalSource",
)
SMOOTHING = ("113087", "DCM", "Smoothing")
SOURCE_IMAGE = ("121322", "DCM", "Source image for image processing operation")
PROCESSING_EQUIPMENT = ("109102", "DCM", "Processing Equipment")


@dataclass(frozen=True)
class DerivationInfo:
    """What the derived objects say about the processing that made them."""

    model_identity: str  # stable name of the model weights; part of every derived UID
    model_name: str
    model_version: str
    software_version: str
    description_suffix: str = " DENOISED"
    transfer_syntax: str = "explicit"
    station_ae_title: str = "DENOISER"

    def __post_init__(self) -> None:
        if self.transfer_syntax not in OUTPUT_TRANSFER_SYNTAXES:
            raise ValueError(f"unknown output transfer syntax {self.transfer_syntax!r}; use "
                             f"one of {', '.join(OUTPUT_TRANSFER_SYNTAXES)}")
        syntax = OUTPUT_TRANSFER_SYNTAXES[self.transfer_syntax]
        if syntax in _ENCAPSULATED and not get_encoder(syntax).is_available:
            raise ValueError(f"output transfer syntax {self.transfer_syntax!r} needs an encoder "
                             "plugin that is not installed (pyjpegls for jpeg-ls, "
                             "pylibjpeg-openjpeg for jpeg2000)")
        if not self.model_identity:
            raise ValueError("model_identity must not be empty")

    @property
    def transfer_syntax_uid(self) -> UID:
        return OUTPUT_TRANSFER_SYNTAXES[self.transfer_syntax]


def derived_series_number(source: object) -> int | str:
    """The source's SeriesNumber + 1000, or - 1000 where that would leave IS's range
    (dciodvfy); empty (it is type 2) when the source's is not a number within the range."""
    try:
        number = int(str(source))
    except ValueError:
        return ""
    derived = number + SERIES_NUMBER_OFFSET
    if derived > IS_MAX:
        derived = number - SERIES_NUMBER_OFFSET
    return derived if IS_MIN <= derived <= IS_MAX else ""


def is_own_output(ds: Dataset) -> bool:
    """True when ``ds`` was produced by a denoised-node (a PACS routing loop sent it back)."""
    for item in ds.get("ContributingEquipmentSequence", []):
        if str(item.get("Manufacturer", "")) == PRODUCER_MANUFACTURER:
            return True
    return False


def stored_values(physical: np.ndarray, slope: float, intercept: float,
                  pixel_format: PixelFormat) -> np.ndarray:
    """Physical values back to stored ones, clipped to what BitsStored can represent."""
    low, high = pixel_format.stored_range
    stored = np.rint((physical.astype(np.float64) - intercept) / slope)
    return np.clip(stored, low, high).astype(pixel_format.dtype)


@dataclass
class _Assembly:
    """A multi-frame object or mosaic whose derived pixels arrive a stack at a time."""

    source: SourceImage
    pixels: np.ndarray  # (frames, rows, columns), or the mosaic image
    filled: np.ndarray  # per frame or tile: its derived values are in place


class DerivedSeriesWriter:
    """Writes derived instances into ``out_dir`` as stacks are denoised.

    Classic instances are written at once; a multi-frame object is written when all of its
    frames have arrived (they may belong to several stacks, e.g. one per echo).
    """

    def __init__(self, out_dir: Path, info: DerivationInfo, now: datetime,
                 uids: DerivedUIDs) -> None:
        self.out_dir = out_dir
        self.info = info
        self.now = now
        self.uids = uids
        self.written: list[Path] = []
        self._pending: dict[Path, _Assembly] = {}  # multi-frame objects
        self._mosaics: dict[Path, _Assembly] = {}
        self._unchanged: dict[Path, set[int]] = defaultdict(set)  # frames of stacks left out
        out_dir.mkdir(parents=True, exist_ok=True)

    def add_stack(self, stack: Stack, denoised: np.ndarray) -> None:
        if denoised.shape != (stack.depth, stack.rows, stack.columns):
            raise SeriesError(f"denoised stack {stack.label} has shape {denoised.shape}")
        for ref, image in zip(stack.slices, denoised):
            if ref.tile is not None:
                self._add_tile(ref, image)
            elif ref.frame is None:
                self._write_classic(ref, image)
            else:
                self._add_frame(ref, image)

    def keep_unchanged(self, stack: Stack) -> None:
        """A stack left out (e.g. empty) that shares multi-frame objects or mosaics with
        denoised stacks: those frames or tiles keep the source's values. Classic images of it
        get no derived instance, and an object left out entirely is never written."""
        for ref in stack.slices:
            if ref.frame is None:
                continue
            self._unchanged[ref.path].add(ref.frame)
            if ref.path in self._pending:
                self._pending[ref.path].filled[ref.frame] = True
                self._finish_if_complete(ref.path)

    def close(self) -> list[Path]:
        incomplete = [p.name for p, pending in self._pending.items() if not pending.filled.all()]
        if incomplete:
            raise SeriesError(f"multi-frame objects with frames missing: {', '.join(incomplete)}")
        if self._mosaics:
            missing = ", ".join(p.name for p in self._mosaics)
            raise SeriesError(f"mosaics with tiles missing: {missing}")
        self._pending.clear()
        # Files are written without fsync; one flush here makes the whole series durable
        # before the job is marked processed (a crash before that reprocesses the series).
        sync_filesystem(self.out_dir)
        return list(self.written)

    def _write_classic(self, ref: SliceRef, image: np.ndarray) -> None:
        pixel_format = ref.source.pixel_format
        self._finish(ref.source, stored_values(image, ref.slope, ref.intercept, pixel_format))

    def _add_frame(self, ref: SliceRef, image: np.ndarray) -> None:
        if ref.path not in self._pending:
            self._pending[ref.path] = _multiframe_assembly(ref.source)
            for frame in self._unchanged.get(ref.path, ()):
                self._pending[ref.path].filled[frame] = True
        pending = self._pending[ref.path]
        assert ref.frame is not None
        pending.pixels[ref.frame] = stored_values(image, ref.slope, ref.intercept,
                                                  ref.source.pixel_format)
        pending.filled[ref.frame] = True
        self._finish_if_complete(ref.path)

    def _finish_if_complete(self, path: Path) -> None:
        pending = self._pending[path]
        if pending.filled.all():
            del self._pending[path]
            unchanged = sorted(self._unchanged.get(path, ()))
            if unchanged:  # frames of a stack left out keep the source's values
                for frame, pixels in zip(unchanged, pending.source.frames(unchanged)):
                    pending.pixels[frame] = pixels
            # (frames, rows, columns) even for one frame: NumberOfFrames
            self._finish(pending.source, pending.pixels)

    def _add_tile(self, ref: SliceRef, image: np.ndarray) -> None:
        """A mosaic is written once all its tiles are back in place; the grid cells past the
        last slice keep the source's values."""
        tile = ref.tile
        assert tile is not None
        if ref.path not in self._mosaics:
            self._mosaics[ref.path] = _mosaic_assembly(ref.source, tile.layout)
        mosaic = self._mosaics[ref.path]
        tile.layout.fill(mosaic.pixels, tile.index, stored_values(
            image, ref.slope, ref.intercept, ref.source.pixel_format))
        mosaic.filled[tile.index] = True
        if mosaic.filled.all():
            del self._mosaics[ref.path]
            self._finish(mosaic.source, mosaic.pixels)

    def _finish(self, source: SourceImage, stored: np.ndarray) -> None:
        ds = _header_copy(source)
        source_sop_uid = str(ds.SOPInstanceUID)
        source_sop_class = str(ds.SOPClassUID)
        derive_attributes(ds, self.info, self.now, self.uids)
        _decode_big_endian(ds)
        keep_private_values_untyped(ds)
        stored = stored.astype(stored.dtype.newbyteorder("="), copy=False)  # '>u2' from BE
        # Native pixels first (whatever the source's syntax), then the configured encoding.
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.set_pixel_data(stored, str(ds.PhotometricInterpretation), int(ds.BitsStored),
                          generate_instance_uid=False)
        syntax = self.info.transfer_syntax_uid
        if syntax in _ENCAPSULATED:
            ds.compress(syntax, generate_instance_uid=False)
        else:
            ds.file_meta.TransferSyntaxUID = syntax
        ds.file_meta.MediaStorageSOPClassUID = UID(source_sop_class)
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.file_meta.SourceApplicationEntityTitle = self.info.station_ae_title
        buffer = io.BytesIO()
        ds.save_as(buffer, enforce_file_format=True,
                   implicit_vr=syntax == ImplicitVRLittleEndian, little_endian=True)
        target = self.out_dir / f"{ds.SOPInstanceUID}.dcm"
        write_atomic(target, buffer.getvalue(), durable=False)
        self.written.append(target)
        log.debug("derived instance written", extra={"source_sop": source_sop_uid})


def _header_copy(source: SourceImage) -> Dataset:
    """The source's header to turn into the derived object's: a copy (the header is the
    plan's, and the rules' facts), without the source's pixel data (never read for this)."""
    ds = copy.deepcopy(source.header)
    del ds[PIXEL_DATA]
    return ds


def _multiframe_assembly(source: SourceImage) -> _Assembly:
    """Every frame of a multi-frame object is denoised or left out with its stack, so the
    frames start empty; those left out are read from the source at the end."""
    ds = source.header
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    shape = (frames, int(ds.Rows), int(ds.Columns))
    return _Assembly(source, np.zeros(shape, source.pixel_format.dtype),
                     np.zeros(frames, dtype=bool))


def _mosaic_assembly(source: SourceImage, layout: MosaicLayout) -> _Assembly:
    """Grid cells without a slice keep the source's values: read when there are such."""
    ds = source.header
    if layout.count < layout.per_side**2:
        pixels = source.pixels().copy()
    else:
        pixels = np.zeros((int(ds.Rows), int(ds.Columns)), source.pixel_format.dtype)
    return _Assembly(source, pixels, np.zeros(layout.count, dtype=bool))


def _decode_big_endian(ds: Dataset) -> None:
    """A source in (retired) Explicit VR Big Endian: decode every element, so that the
    derived object can be written little endian (pydicom cannot re-encode raw elements)."""
    if ds.original_encoding[1] is not False:
        return
    for _ in ds.iterall():  # iterating converts each raw element to a decoded one
        pass
    ds.set_original_encoding(False, True, ds.original_character_set)


@dataclass(frozen=True)
class _Source:
    sop_class_uid: str
    sop_instance_uid: str
    series_uid: str
    frames: int


def derive_attributes(ds: Dataset, info: DerivationInfo, now: datetime,
                      uids: DerivedUIDs) -> None:
    """Turn a copy of a source dataset into its derived counterpart (all but pixel data),
    one of the derived series ``uids``."""
    source = _Source(str(ds.SOPClassUID), str(ds.SOPInstanceUID), str(ds.SeriesInstanceUID),
                     int(ds.get("NumberOfFrames", 1) or 1))
    multiframe = source.sop_class_uid in MULTIFRAME_MR_SOP_CLASSES
    ds.SOPInstanceUID = uids.instance_uid(source.sop_instance_uid)
    ds.SeriesInstanceUID = uids.series_uid
    _set_image_type(ds, multiframe)
    ds.SeriesDescription = _with_suffix(str(ds.get("SeriesDescription", "") or ""),
                                        info.description_suffix)
    if ds.get("SeriesNumber") not in (None, ""):
        ds.SeriesNumber = derived_series_number(ds.SeriesNumber)
    ds.InstanceCreationDate = now.strftime("%Y%m%d")
    ds.InstanceCreationTime = now.strftime("%H%M%S")
    ds.ContributingEquipmentSequence = DicomSequence(
        list(ds.get("ContributingEquipmentSequence", [])) + [_equipment(info, now)])
    if multiframe:
        _derive_frames(ds, info, source)
        _source_evidence(ds, source)
        _reference_source_series(ds, source)
        if source.sop_class_uid == ENHANCED_MR_IMAGE_STORAGE:
            _remove(ds, _ORIGINAL_ONLY_ENHANCED_MR)
    else:
        ds.DerivationDescription = _derivation_description(info)
        ds.DerivationCodeSequence = DicomSequence([_code(*SMOOTHING)])
        ds.SourceImageSequence = DicomSequence([_source_reference(source, None)])
    _remove(ds, _STALE_ATTRIBUTES)


def _derivation_description(info: DerivationInfo) -> str:
    return (f"Denoised by {PRODUCER_MANUFACTURER} {info.software_version} with model "
            f"{info.model_name} {info.model_version} ({info.model_identity})")[:1024]


def _source_reference(source: _Source, frame_number: int | None) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = source.sop_class_uid
    item.ReferencedSOPInstanceUID = source.sop_instance_uid
    if frame_number is not None:
        item.ReferencedFrameNumber = frame_number
    item.PurposeOfReferenceCodeSequence = DicomSequence([_code(*SOURCE_IMAGE)])
    return item


def _equipment(info: DerivationInfo, now: datetime) -> Dataset:
    equipment = Dataset()
    equipment.Manufacturer = PRODUCER_MANUFACTURER
    equipment.ManufacturerModelName = info.model_name[:64]
    equipment.SoftwareVersions = [info.software_version[:64], info.model_identity[:64]]
    equipment.ContributionDateTime = now.strftime("%Y%m%d%H%M%S")
    equipment.ContributionDescription = f"Denoising with model {info.model_identity}"[:64]
    equipment.PurposeOfReferenceCodeSequence = DicomSequence([_code(*PROCESSING_EQUIPMENT)])
    return equipment


def _derive_frames(ds: Dataset, info: DerivationInfo, source: _Source) -> None:
    """Per frame: FrameType DERIVED and a Derivation Image item naming the source frame
    (the multi-frame IODs keep derivation in the functional groups, not at the top level)."""
    description = _derivation_description(info)
    for number, group in enumerate(ds.get("PerFrameFunctionalGroupsSequence", []), start=1):
        derivation = Dataset()
        derivation.DerivationDescription = description
        derivation.DerivationCodeSequence = DicomSequence([_code(*SMOOTHING)])
        frame_number = number if source.frames > 1 else None
        derivation.SourceImageSequence = DicomSequence([_source_reference(source, frame_number)])
        group.DerivationImageSequence = DicomSequence([derivation])
    shared = list(ds.get("SharedFunctionalGroupsSequence", []))
    for group in shared:
        if "DerivationImageSequence" in group:  # a derived source's; ours is per frame
            del group.DerivationImageSequence
    for group in list(ds.get("PerFrameFunctionalGroupsSequence", [])) + shared:
        for keyword in ("MRImageFrameTypeSequence", "FrameTypeSequence"):
            for item in group.get(keyword, []):
                values = [str(v) for v in item.get("FrameType", [])]
                if values:
                    item.FrameType = ["DERIVED", *values[1:]]


def _source_evidence(ds: Dataset, source: _Source) -> None:
    """Source Image Evidence: the instances the frames' Source Image Sequences name (all
    of them: this object's source; a derived source's own evidence no longer applies)."""
    instance = Dataset()
    instance.ReferencedSOPClassUID = source.sop_class_uid
    instance.ReferencedSOPInstanceUID = source.sop_instance_uid
    series = Dataset()
    series.SeriesInstanceUID = source.series_uid
    series.ReferencedSOPSequence = DicomSequence([instance])
    study = Dataset()
    study.StudyInstanceUID = ds.StudyInstanceUID
    study.ReferencedSeriesSequence = DicomSequence([series])
    ds.SourceImageEvidenceSequence = DicomSequence([study])


def _reference_source_series(ds: Dataset, source: _Source) -> None:
    """Common Instance Reference module: every instance this one references, by series.
    Items without instances (highdicom's legacy conversion writes such) are dropped."""
    items = [item for item in ds.get("ReferencedSeriesSequence", [])
             if item.get("ReferencedInstanceSequence")]
    reference = Dataset()
    reference.ReferencedSOPClassUID = source.sop_class_uid
    reference.ReferencedSOPInstanceUID = source.sop_instance_uid
    for item in items:
        if str(item.get("SeriesInstanceUID", "")) == source.series_uid:
            item.ReferencedInstanceSequence.append(reference)
            break
    else:
        series = Dataset()
        series.SeriesInstanceUID = source.series_uid
        series.ReferencedInstanceSequence = DicomSequence([reference])
        items.append(series)
    ds.ReferencedSeriesSequence = DicomSequence(items)


def _remove(ds: Dataset, keywords: tuple[str, ...]) -> None:
    for keyword in keywords:
        if keyword in ds:
            delattr(ds, keyword)


def _set_image_type(ds: Dataset, multiframe: bool) -> None:
    values = [str(v) for v in ds.get("ImageType", [])]
    rest = values[2:] if len(values) > 2 else []
    if multiframe:
        # Enhanced MR allows only PRIMARY as value 2; value 3 and 4 are required there.
        ds.ImageType = ["DERIVED", "PRIMARY", *(rest or ["VOLUME", "NONE"])]
    else:
        ds.ImageType = ["DERIVED", "SECONDARY", *rest]


def _with_suffix(description: str, suffix: str) -> str:
    room = 64 - len(suffix)
    return (description[:room].rstrip() + suffix).strip() if suffix else description[:64]


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = scheme
    item.CodeMeaning = meaning
    return item

