"""The derived series writer: one derived instance per source instance, same SOP class.

New UIDs are derived deterministically from the source UIDs and the model's identity, so a
replay replaces (never duplicates) the derived series in the PACS, while a new model gives a
new series beside the old one.
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    RLELossless,
    generate_uid,
)

from denoised_node.storage.files import write_atomic
from denoised_node.storage.series import MULTIFRAME_MR_SOP_CLASSES, SeriesError, SliceRef, Stack

log = logging.getLogger(__name__)

PRODUCER_MANUFACTURER = "denoised-node"
OUTPUT_TRANSFER_SYNTAXES = {
    "explicit": ExplicitVRLittleEndian,
    "implicit": ImplicitVRLittleEndian,
    "rle": RLELossless,
}
SERIES_NUMBER_OFFSET = 1000
# Attributes that describe the source's pixel values and would be wrong in the derived object.
_STALE_ATTRIBUTES = (
    "SmallestImagePixelValue", "LargestImagePixelValue", "SmallestPixelValueInSeries",
    "LargestPixelValueInSeries", "IconImageSequence", "PixelDataProviderURL",
)


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
            raise ValueError(f"unknown output transfer syntax {self.transfer_syntax!r}")
        if not self.model_identity:
            raise ValueError("model_identity must not be empty")


def derived_uid(model_identity: str, source_uid: str) -> str:
    """A UID under 2.25 computed from the model identity and the source UID."""
    return generate_uid(prefix="2.25.", entropy_srcs=[model_identity, str(source_uid)])


def is_own_output(ds: Dataset) -> bool:
    """True when ``ds`` was produced by a denoised-node (a PACS routing loop sent it back)."""
    for item in ds.get("ContributingEquipmentSequence", []):
        if str(item.get("Manufacturer", "")) == PRODUCER_MANUFACTURER:
            return True
    return False


def stored_values(physical: np.ndarray, slope: float, intercept: float, ds: Dataset,
                  dtype: np.dtype) -> np.ndarray:
    """Physical values back to stored ones, clipped to what BitsStored can represent."""
    bits = int(ds.BitsStored)
    signed = int(ds.PixelRepresentation) == 1
    low, high = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    stored = np.rint((physical.astype(np.float64) - intercept) / slope)
    return np.clip(stored, low, high).astype(dtype)


class DerivedSeriesWriter:
    """Writes derived instances into ``out_dir`` as stacks are denoised.

    Classic instances are written at once; a multi-frame object is written when all of its
    frames have arrived (they may belong to several stacks, e.g. one per echo).
    """

    def __init__(self, out_dir: Path, info: DerivationInfo, now: datetime) -> None:
        self.out_dir = out_dir
        self.info = info
        self.now = now
        self.written: list[Path] = []
        self._pending: dict[Path, tuple[Dataset, np.ndarray, np.ndarray]] = {}
        out_dir.mkdir(parents=True, exist_ok=True)

    def add_stack(self, stack: Stack, denoised: np.ndarray) -> None:
        if denoised.shape != (stack.depth, stack.rows, stack.columns):
            raise SeriesError(f"denoised stack {stack.label} has shape {denoised.shape}")
        for ref, image in zip(stack.slices, denoised):
            if ref.frame is None:
                self._write_classic(ref, image)
            else:
                self._add_frame(ref, image)

    def close(self) -> list[Path]:
        incomplete = [p.name for p, (_, _, filled) in self._pending.items() if not filled.all()]
        if incomplete:
            raise SeriesError(f"multi-frame objects with frames missing: {', '.join(incomplete)}")
        self._pending.clear()
        return list(self.written)

    def _write_classic(self, ref: SliceRef, image: np.ndarray) -> None:
        ds = pydicom.dcmread(ref.path)
        source_pixels = ds.pixel_array
        stored = stored_values(image, ref.slope, ref.intercept, ds, source_pixels.dtype)
        self._finish(ds, stored)

    def _add_frame(self, ref: SliceRef, image: np.ndarray) -> None:
        if ref.path not in self._pending:
            ds = pydicom.dcmread(ref.path)
            pixels = ds.pixel_array
            pixels = pixels if pixels.ndim == 3 else pixels[np.newaxis]
            self._pending[ref.path] = (ds, pixels.copy(), np.zeros(len(pixels), dtype=bool))
        ds, frames, filled = self._pending[ref.path]
        assert ref.frame is not None
        frames[ref.frame] = stored_values(image, ref.slope, ref.intercept, ds, frames.dtype)
        filled[ref.frame] = True
        if filled.all():
            del self._pending[ref.path]
            self._finish(ds, frames if len(frames) > 1 else frames[0])

    def _finish(self, ds: Dataset, stored: np.ndarray) -> None:
        source_sop_uid = str(ds.SOPInstanceUID)
        source_sop_class = str(ds.SOPClassUID)
        derive_attributes(ds, self.info, self.now)
        ds.set_pixel_data(stored, str(ds.PhotometricInterpretation), int(ds.BitsStored),
                          generate_instance_uid=False)
        syntax = OUTPUT_TRANSFER_SYNTAXES[self.info.transfer_syntax]
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian  # native pixels, as set above
        if syntax == RLELossless:
            ds.compress(RLELossless, encoding_plugin="pydicom")
        else:
            ds.file_meta.TransferSyntaxUID = syntax
        ds.file_meta.MediaStorageSOPClassUID = source_sop_class
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.file_meta.SourceApplicationEntityTitle = self.info.station_ae_title
        buffer = io.BytesIO()
        ds.save_as(buffer, enforce_file_format=True,
                   implicit_vr=syntax == ImplicitVRLittleEndian, little_endian=True)
        target = self.out_dir / f"{ds.SOPInstanceUID}.dcm"
        write_atomic(target, buffer.getvalue())
        self.written.append(target)
        log.debug("derived instance written", extra={"source_sop": source_sop_uid})


def derive_attributes(ds: Dataset, info: DerivationInfo, now: datetime) -> None:
    """Turn a copy of a source dataset into its derived counterpart (all but pixel data)."""
    source_sop_uid = str(ds.SOPInstanceUID)
    source_sop_class = str(ds.SOPClassUID)
    multiframe = source_sop_class in MULTIFRAME_MR_SOP_CLASSES
    ds.SOPInstanceUID = derived_uid(info.model_identity, source_sop_uid)
    ds.SeriesInstanceUID = derived_uid(info.model_identity, str(ds.SeriesInstanceUID))
    _set_image_type(ds, multiframe)
    ds.SeriesDescription = _with_suffix(str(ds.get("SeriesDescription", "") or ""),
                                        info.description_suffix)
    if ds.get("SeriesNumber") not in (None, ""):
        ds.SeriesNumber = int(ds.SeriesNumber) + SERIES_NUMBER_OFFSET
    ds.InstanceCreationDate = now.strftime("%Y%m%d")
    ds.InstanceCreationTime = now.strftime("%H%M%S")
    ds.DerivationDescription = (
        f"Denoised by {PRODUCER_MANUFACTURER} {info.software_version} with model "
        f"{info.model_name} {info.model_version} ({info.model_identity})"
    )[:1024]
    ds.DerivationCodeSequence = DicomSequence([_code("113087", "DCM", "Smoothing")])
    source_ref = Dataset()
    source_ref.ReferencedSOPClassUID = source_sop_class
    source_ref.ReferencedSOPInstanceUID = source_sop_uid
    source_ref.PurposeOfReferenceCodeSequence = DicomSequence(
        [_code("121322", "DCM", "Source image for image processing operation")])
    ds.SourceImageSequence = DicomSequence([source_ref])
    equipment = Dataset()
    equipment.Manufacturer = PRODUCER_MANUFACTURER
    equipment.ManufacturerModelName = info.model_name[:64]
    equipment.SoftwareVersions = [info.software_version[:64], info.model_identity[:64]]
    equipment.ContributionDateTime = now.strftime("%Y%m%d%H%M%S")
    equipment.ContributionDescription = f"Denoising with model {info.model_identity}"[:64]
    equipment.PurposeOfReferenceCodeSequence = DicomSequence(
        [_code("109102", "DCM", "Processing Equipment")])
    previous = list(ds.get("ContributingEquipmentSequence", []))
    ds.ContributingEquipmentSequence = DicomSequence(previous + [equipment])
    if multiframe:
        _derive_frame_types(ds)
    for keyword in _STALE_ATTRIBUTES:
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


def _derive_frame_types(ds: Dataset) -> None:
    groups: list[Dataset] = list(ds.get("PerFrameFunctionalGroupsSequence", []))
    groups += list(ds.get("SharedFunctionalGroupsSequence", []))
    for group in groups:
        for keyword in ("MRImageFrameTypeSequence", "FrameTypeSequence"):
            for item in group.get(keyword, []):
                values = [str(v) for v in item.get("FrameType", [])]
                if values:
                    item.FrameType = ["DERIVED", *values[1:]]


def _with_suffix(description: str, suffix: str) -> str:
    room = 64 - len(suffix)
    return (description[:room].rstrip() + suffix).strip() if suffix else description[:64]


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = scheme
    item.CodeMeaning = meaning
    return item

