"""Stored series -> stacks of slices -> volumes.

A series may hold several stacks (echoes, repeated positions over time, b-values,
orientations, matrices); each is denoised on its own. Each file's header is read once, when
the series is planned (its pixel data stays on disk), and carried in a SourceImage to the
steps after: the rules read it and the derived object is made from it. The pixel data is
read when a volume is loaded, one image at a time into a preallocated array, so memory stays
bounded. Classic MR (one slice per instance), Enhanced MR and Legacy Converted
Enhanced MR (multi-frame) objects are handled alike: a frame is just another slice.

Images the network must not touch are skipped with a reason (docs/inputs.md lists them).
"""

from __future__ import annotations

import hashlib
import logging
from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import pydicom
from pydicom.datadict import dictionary_VR
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.filereader import read_deferred_data_element
from pydicom.multival import MultiValue
from pydicom.pixels import iter_pixels, pixel_array
from pydicom.tag import BaseTag
from pydicom.uid import UID

from denoised_node.storage.images.mosaic import MosaicError, MosaicTile, is_mosaic, mosaic_layout
from denoised_node.storage.images.private_vr import UNDEFINED_LENGTH
from denoised_node.storage.images.recognise import (
    DEFAULT_POLICY,
    InputPolicy,
    localizer_reason,
    orthogonal_planes,
    reformat_reason,
)
from denoised_node.storage.reasons import one_line

log = logging.getLogger(__name__)

MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
ENHANCED_MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4.1"
LEGACY_ENHANCED_MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4.4"
MR_SOP_CLASSES = frozenset({MR_IMAGE_STORAGE, ENHANCED_MR_IMAGE_STORAGE,
                            LEGACY_ENHANCED_MR_IMAGE_STORAGE})
MULTIFRAME_MR_SOP_CLASSES = frozenset({ENHANCED_MR_IMAGE_STORAGE, LEGACY_ENHANCED_MR_IMAGE_STORAGE})

# ImageType values 3+ (vendors' own) of images that are not magnitude images, and Enhanced MR's
# ComplexImageComponent: the model learnt Rician magnitude noise only.
NON_MAGNITUDE_TYPES = {"P": "phase", "PHASE": "phase", "PHASE MAP": "phase", "R": "real",
                       "REAL": "real", "I": "imaginary", "IMAGINARY": "imaginary"}
COMPLEX_COMPONENTS = {"PHASE": "phase", "REAL": "real", "IMAGINARY": "imaginary",
                      "MIXED": "mixed complex components"}
# Quantitative maps and projections: their values are measurements or maxima, not a noisy
# magnitude; smoothing them would change what a radiologist measures.
NOT_DENOISED_TYPES = {
    "ADC": "quantitative map (ADC)", "EADC": "quantitative map (eADC)",
    "FA": "quantitative map (FA)", "DIFFUSION_ANISO": "quantitative map (anisotropy)",
    "T1 MAP": "quantitative map (T1)", "T2 MAP": "quantitative map (T2)",
    "T2* MAP": "quantitative map (T2*)", "VELOCITY": "quantitative map (velocity)",
    "METABOLITE_MAP": "quantitative map (metabolite)", "QUANTITY": "quantitative map",
    "MIP": "projection (MIP)", "MINIP": "projection (MinIP)",
    "PROJECTION IMAGE": "projection", "LOCALIZER": "localizer",
}


class SeriesError(Exception):
    """The stored series cannot be turned into volumes."""


class NothingToDenoise(SeriesError):
    """No instance of the series has the pixel data and geometry needed to denoise it."""


class NoNoiseToRemove(NothingToDenoise):
    """Every stack with an image reads less noise than the model's floor (its card's
    noise_floor_percent): the model would make it worse."""


PIXEL_DATA = BaseTag(0x7FE00010)
_PIXEL_DATA_ELEMENTS = (("Pixel Data", "PixelData"), ("Float Pixel Data", "FloatPixelData"),
                        ("Double Float Pixel Data", "DoubleFloatPixelData"))
# Real images nest a few levels (Enhanced MR's functional groups: 3); the copy and the
# writer recurse once or twice per level, so a few thousand would end them.
MAX_SEQUENCE_DEPTH = 32
# Values longer than this stay on disk when a header is read: the pixel data. Any other one
# (a vendor's private header) is read in at once, so that no later step opens the file for it.
_DEFER_BYTES = 4096


def read_header(path: Path) -> Dataset:
    """The file's dataset without its pixel data in memory (that is read when needed, e.g.
    by ``pixel_array(path)``); every other value is read. One open of the file."""
    return read_source_file(path)[0]


def read_source_file(path: Path) -> tuple[Dataset, str]:
    """``read_header``, and the SHA-256 of the file's bytes in the same open: what the file
    holds, which the derived objects' UIDs are made from (storage/images/derived_uids.py)."""
    with path.open("rb") as stream:
        ds = pydicom.dcmread(stream, defer_size=_DEFER_BYTES)
        # A deflated file is inflated into a buffer: its values are read from there, the
        # pixel data too (no decoder reads a deflated file by its path).
        inflated = ds.buffer
        source = stream if inflated is None else inflated
        for tag in list(ds.keys()):
            element = ds.get_item(tag, keep_deferred=True)
            if (isinstance(element, RawDataElement) and element.value is None
                    and element.length and (tag != PIXEL_DATA or inflated is not None)):
                # Into the element dict: set as an item, a private value would be converted
                # with pydicom's guess at its VR; the writer keeps unknown ones as they came.
                ds._dict[tag] = read_deferred_data_element(type(source), source, None, element)
        ds.buffer = None  # nothing is deferred to it any more
        stream.seek(0)
        digest = hashlib.file_digest(stream, "sha256").hexdigest()
    return ds, digest


@dataclass(frozen=True)
class PixelFormat:
    """How an image stores its pixel values: the derived image stores its own alike."""

    bits_allocated: int
    bits_stored: int
    signed: bool

    def __post_init__(self) -> None:
        if self.bits_allocated not in (8, 16):
            raise ValueError(f"BitsAllocated {self.bits_allocated} is not supported")
        if not 1 <= self.bits_stored <= self.bits_allocated:
            raise ValueError(f"BitsStored {self.bits_stored} does not fit BitsAllocated "
                             f"{self.bits_allocated}")

    @classmethod
    def from_dataset(cls, ds: Dataset) -> PixelFormat:
        try:
            return cls(int(ds.BitsAllocated), int(ds.BitsStored), int(ds.PixelRepresentation) == 1)
        except (AttributeError, TypeError) as exc:
            raise ValueError(f"image pixel attributes missing or invalid: {exc}") from exc

    @property
    def dtype(self) -> np.dtype:
        """What the decoder gives for these pixels (native byte order)."""
        return np.dtype(f"{'i' if self.signed else 'u'}{self.bits_allocated // 8}")

    @property
    def stored_range(self) -> tuple[int, int]:
        """The lowest and highest value BitsStored can hold."""
        if self.signed:
            return -(2 ** (self.bits_stored - 1)), 2 ** (self.bits_stored - 1) - 1
        return 0, 2**self.bits_stored - 1


@dataclass(frozen=True)
class SourceImage:
    """One stored source file as planning read it: what identifies it, how its pixels are
    stored, and its header (read_header), from which its derived object is made. The pixel
    data is read from the file by ``pixels``/``frames`` (from the header only where it holds
    them: values too small to leave on disk, a deflated file)."""

    path: Path
    sop_instance_uid: str
    sop_class_uid: str
    pixel_format: PixelFormat
    digest: str  # SHA-256 of the file's bytes (read_source_file)
    header: Dataset = field(repr=False, compare=False)

    @classmethod
    def from_dataset(cls, ds: Dataset, path: Path, digest: str) -> SourceImage:
        """Raises ValueError when the image cannot be denoised and written back."""
        if "PixelData" not in ds:
            raise ValueError("no pixel data")
        if "SOPInstanceUID" not in ds or "SOPClassUID" not in ds:
            raise ValueError("no SOP Instance UID or SOP Class UID")
        return cls(path, str(ds.SOPInstanceUID), str(ds.SOPClassUID),
                   PixelFormat.from_dataset(ds), digest, ds)

    def pixels(self) -> np.ndarray:
        """The decoded pixel data: (rows, columns), or (frames, rows, columns)."""
        return pixel_array(self._pixel_source())

    def frames(self, indices: Sequence[int]) -> Iterator[np.ndarray]:
        """The frames ``indices`` (in that order, which should be the file's), one at a time."""
        return iter_pixels(self._pixel_source(), indices=list(indices))

    def _pixel_source(self) -> Path | Dataset:
        element = self.header.get_item(PIXEL_DATA, keep_deferred=True)
        deferred = isinstance(element, RawDataElement) and element.value is None
        return self.path if deferred else self.header  # the header holds small ones


@dataclass(frozen=True)
class SliceRef:
    """One 2D image: a classic instance, or one frame (0-based) of a multi-frame one."""

    source: SourceImage
    frame: int | None
    position: float  # along the stack's normal, mm
    slope: float
    intercept: float
    instance_number: int
    tile: MosaicTile | None = None  # a slice cut from a Siemens mosaic

    @property
    def path(self) -> Path:
        return self.source.path

    @property
    def sop_instance_uid(self) -> str:
        return self.source.sop_instance_uid


@dataclass(frozen=True)
class Stack:
    rows: int
    columns: int
    slices: tuple[SliceRef, ...]
    label: str  # e.g. "256x256, echo 2", for logs and errors
    pixel_spacing: tuple[float, ...] = ()  # (between rows, between columns), mm

    @property
    def depth(self) -> int:
        return len(self.slices)

    @property
    def voxel_spacing(self) -> tuple[float, float, float] | None:
        """(slices, rows, columns) spacing in mm: the median distance between neighbouring
        slice positions (robust to a missing slice) and the pixel spacing; None if unknown."""
        if len(self.pixel_spacing) != 2 or self.depth < 2:
            return None
        between = float(np.median(np.diff([ref.position for ref in self.slices])))
        if between <= 0:
            return None
        return (between, float(self.pixel_spacing[0]), float(self.pixel_spacing[1]))


@dataclass
class StackPlan:
    stacks: list[Stack] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (SOP Instance UID, reason)

    @property
    def slice_count(self) -> int:
        return sum(stack.depth for stack in self.stacks)


@dataclass(frozen=True)
class _StackKey:
    """What must be equal for images to share a stack (and be denoised as one volume)."""

    orientation: tuple[float, ...]
    rows: int
    columns: int
    pixel_spacing: tuple[float, ...]
    echo: object = None
    temporal: object = None
    b_value: object = None

    @property
    def label(self) -> str:
        parts = [f"{self.rows}x{self.columns}"]
        for name, value in (("echo", self.echo), ("time", self.temporal), ("b", self.b_value)):
            if value is not None:
                parts.append(f"{name} {value}")
        return ", ".join(parts)


@dataclass(frozen=True)
class _Candidate:
    ref: SliceRef
    key: _StackKey


def plan_stacks(paths: Iterable[Path], policy: InputPolicy = DEFAULT_POLICY) -> StackPlan:
    """Read the headers of ``paths`` and group their images into sorted stacks."""
    plan = StackPlan()
    candidates: list[_Candidate] = []
    mosaics: list[Stack] = []
    for path in paths:
        try:
            ds, digest = read_source_file(path)
        except Exception as exc:  # noqa: BLE001 - any unreadable file is skipped with a reason
            plan.skipped.append((path.stem, f"unreadable: {one_line(str(exc))}"))
            continue
        sop_uid = str(ds.get("SOPInstanceUID", path.stem))
        reason = (unusable_reason(ds) or malformed_reason(ds) or localizer_reason(ds)
                  or reformat_reason(ds, policy))
        if not reason and is_mosaic(ds) and policy.mosaics == "ignore":
            reason = 'Siemens mosaic (series.mosaics = "ignore")'
        if reason:
            plan.skipped.append((sop_uid, reason))
            continue
        try:
            source = SourceImage.from_dataset(ds, path, digest)
        except ValueError as exc:
            plan.skipped.append((sop_uid, one_line(str(exc))))
            continue
        try:
            if is_mosaic(ds):
                mosaics.append(_mosaic_stack(source))
            else:
                candidates.extend(_candidates_of(source))
        except MosaicError as exc:
            plan.skipped.append((sop_uid, f"mosaic layout unknown: {one_line(str(exc))}"))
        except (AttributeError, KeyError, ValueError, IndexError, TypeError) as exc:
            plan.skipped.append((sop_uid, f"no usable geometry: {one_line(str(exc))}"))
    if orthogonal_planes({cand.key.orientation for cand in candidates}):
        # Three orthogonal planes in one series: a localizer whatever its name says.
        reason = "localizer (three orthogonal planes in one series)"
        plan.skipped += [(cand.ref.sop_instance_uid, reason) for cand in candidates
                         if cand.ref.frame in (None, 0)]
        candidates = []
    plan.stacks = _group_into_stacks(candidates) + mosaics
    return plan


def _mosaic_stack(source: SourceImage) -> Stack:
    """One mosaic instance is one volume: its tiles, in grid order, are its slices."""
    ds = source.header
    layout = mosaic_layout(ds)
    spacing = _spacing(ds.PixelSpacing)
    between = _float_or(ds.get("SpacingBetweenSlices") or ds.get("SliceThickness"), 1.0)
    slope = float(ds.get("RescaleSlope", 1) or 1)
    intercept = float(ds.get("RescaleIntercept", 0) or 0)
    refs = tuple(SliceRef(source, None, index * between, slope, intercept,
                          _instance_number(ds), MosaicTile(index, layout))
                 for index in range(layout.count))
    label = (f"mosaic {layout.tile_rows}x{layout.tile_columns}x{layout.count}, "
             f"instance {_instance_number(ds)}")
    return Stack(layout.tile_rows, layout.tile_columns, refs, label, spacing)


def unusable_reason(ds: Dataset) -> str | None:
    """Why the network must not denoise this object (None: it may)."""
    if "PixelData" not in ds:
        return "no pixel data"
    if int(ds.get("SamplesPerPixel", 1)) != 1:
        return "not a grayscale image"
    if int(ds.get("BitsAllocated", 16)) not in (8, 16):
        return f"BitsAllocated {ds.get('BitsAllocated')} is not supported"
    component = str(ds.get("ComplexImageComponent", "") or "").strip().upper()
    if component and component != "MAGNITUDE":
        return f"not a magnitude image ({COMPLEX_COMPONENTS.get(component, component.lower())})"
    image_type = ds.get("ImageType") or []
    values = [image_type] if isinstance(image_type, str) else list(image_type)  # VM 1: a str
    for value in (str(v).strip().upper() for v in values[2:]):
        if value in NON_MAGNITUDE_TYPES:
            return f"not a magnitude image ({NON_MAGNITUDE_TYPES[value]})"
        if value in NOT_DENOISED_TYPES:
            return NOT_DENOISED_TYPES[value]
    return None


def malformed_reason(ds: Dataset) -> str | None:
    """Image attributes no decoder can use, found in the header alone: one such image is
    left out with this reason and the rest of its series is denoised."""
    mismatch = _encoding_mismatch(ds)
    if mismatch:
        return mismatch
    pixel_elements = [name for name, keyword in _PIXEL_DATA_ELEMENTS if keyword in ds]
    if len(pixel_elements) > 1:
        return f"more than one pixel data element ({', '.join(pixel_elements)})"
    if _nested_deeper_than(ds, MAX_SEQUENCE_DEPTH):
        return f"sequences nested deeper than {MAX_SEQUENCE_DEPTH} levels"
    try:
        rows, columns = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
        allocated = int(ds.get("BitsAllocated", 16) or 0)
        stored = int(ds.get("BitsStored", allocated) or 0)
        frames = int(ds.get("NumberOfFrames", 1) or 1)
    except (TypeError, ValueError) as exc:
        return f"malformed image attributes: {exc}"
    if rows < 1 or columns < 1:
        return f"Rows {rows}, Columns {columns}: an image needs at least one of each"
    if not 1 <= stored <= allocated:
        return f"BitsStored {stored} does not fit BitsAllocated {allocated}"
    if frames != 1 and str(ds.get("SOPClassUID", "")) not in MULTIFRAME_MR_SOP_CLASSES:
        return f"NumberOfFrames {frames} on a single-frame MR image (one frame expected)"
    return None


def _nested_deeper_than(ds: Dataset, limit: int) -> bool:
    """True when sequences nest more than ``limit`` deep. Walked without recursion: the
    steps after (copying, writing) recurse per level, and a few thousand levels would end
    them in a RecursionError."""
    pending = [(ds, 0)]
    while pending:
        dataset, depth = pending.pop()
        for tag in list(dataset.keys()):
            if not _is_sequence(dataset.get_item(tag)):
                continue
            if depth + 1 > limit:
                return True
            pending += [(item, depth + 1) for item in dataset[tag].value or []]
    return False


def _is_sequence(element: DataElement | RawDataElement) -> bool:
    """Whether pydicom reads the element as a sequence; a raw one is not converted to find
    out (a private value of unknown VR must stay raw for the writer,
    storage/images/private_vr.py)."""
    if not isinstance(element, RawDataElement):
        return element.VR == "SQ"
    if element.VR == "SQ":
        return True
    if element.VR not in (None, "UN") or element.tag == PIXEL_DATA:
        return False
    if element.length == UNDEFINED_LENGTH:
        return True
    try:
        return not element.tag.is_private and dictionary_VR(element.tag) == "SQ"
    except KeyError:
        return False


def _encoding_mismatch(ds: Dataset) -> str | None:
    """pydicom reads a dataset in the encoding it finds, whatever the transfer syntax says;
    the derived object would be written in the wrong one. Elements not yet converted tell
    how they were read."""
    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if syntax is None:
        return None
    expected = UID(syntax)
    for tag in ds.keys():  # noqa: SIM118 - a Dataset iterates over its elements, not tags
        element = ds.get_item(tag)
        if isinstance(element, RawDataElement):
            if element.is_implicit_VR != expected.is_implicit_VR:
                found = "implicit VR" if element.is_implicit_VR else "explicit VR"
                return f"encoded in {found}, unlike its transfer syntax ({expected.name})"
            if element.is_little_endian != expected.is_little_endian:
                return f"byte order differs from its transfer syntax ({expected.name})"
            return None
    return None


def _candidates_of(source: SourceImage) -> list[_Candidate]:
    ds = source.header
    if "PerFrameFunctionalGroupsSequence" in ds:
        return _frame_candidates(source)
    orientation = _floats(ds.ImageOrientationPatient, 6)
    position = _floats(ds.ImagePositionPatient, 3)
    key = _StackKey(_rounded(orientation), int(ds.Rows), int(ds.Columns),
                    _spacing(ds.PixelSpacing), _echo(ds.get("EchoNumbers")),
                    _integer(ds.get("TemporalPositionIdentifier")),
                    _number(ds.get("DiffusionBValue")))
    ref = SliceRef(source, None, _along_normal(orientation, position),
                   float(ds.get("RescaleSlope", 1) or 1),
                   float(ds.get("RescaleIntercept", 0) or 0), _instance_number(ds))
    return [_Candidate(ref, key)]


def _frame_candidates(source: SourceImage) -> list[_Candidate]:
    """One candidate per frame; attributes come from the frame's or the shared groups."""
    ds = source.header
    shared = ds.get("SharedFunctionalGroupsSequence", [Dataset()])[0]
    out = []
    for index, frame in enumerate(ds.PerFrameFunctionalGroupsSequence):
        value = partial(_group_value, frame, shared)
        orientation = _floats(value("PlaneOrientationSequence", "ImageOrientationPatient"), 6)
        position = _floats(value("PlanePositionSequence", "ImagePositionPatient"), 3)
        slope = value("PixelValueTransformationSequence", "RescaleSlope")
        intercept = value("PixelValueTransformationSequence", "RescaleIntercept")
        ref = SliceRef(source, index, _along_normal(orientation, position),
                       _float_or(slope, 1.0) or 1.0,
                       _float_or(intercept, 0.0), _instance_number(ds))
        out.append(_Candidate(ref, _frame_key(ds, frame, shared, orientation)))
    return out


def _frame_key(ds: Dataset, frame: Dataset, shared: Dataset,
               orientation: tuple[float, ...]) -> _StackKey:
    """Legacy Converted objects keep the classic attributes that have no functional group
    (EchoNumbers, TemporalPositionIdentifier) in 'unassigned' groups."""
    value = partial(_group_value, frame, shared)
    echo: object = _echo(_unassigned(frame, shared, "EchoNumbers"))
    effective_echo_time = _number(value("MREchoSequence", "EffectiveEchoTime"))
    if effective_echo_time is not None:
        echo = f"TE {effective_echo_time} ms"
    temporal = value("FrameContentSequence", "TemporalPositionIndex")
    if temporal is None:
        temporal = _unassigned(frame, shared, "TemporalPositionIdentifier")
    return _StackKey(_rounded(orientation), int(ds.Rows), int(ds.Columns),
                     _spacing(value("PixelMeasuresSequence", "PixelSpacing")), echo,
                     _integer(temporal), _number(value("MRDiffusionSequence", "DiffusionBValue")))


def _group_value(frame: Dataset, shared: Dataset, sequence: str, keyword: str) -> object:
    """``keyword`` of the first item of functional group ``sequence``: per frame, else shared."""
    for source in (frame, shared):
        items = source.get(sequence)
        if items and keyword in items[0]:
            return items[0][keyword].value
    return None


def _unassigned(frame: Dataset, shared: Dataset, keyword: str) -> object:
    found = _group_value(frame, shared, "UnassignedPerFrameConvertedAttributesSequence", keyword)
    if found is None:
        found = _group_value(frame, shared, "UnassignedSharedConvertedAttributesSequence", keyword)
    return found


def _group_into_stacks(candidates: list[_Candidate]) -> list[Stack]:
    groups: dict[_StackKey, list[SliceRef]] = defaultdict(list)
    for cand in candidates:
        groups[cand.key].append(cand.ref)
    stacks: list[Stack] = []
    for key, refs in sorted(groups.items(), key=lambda item: repr(item[0])):
        for repeat, members in enumerate(_split_repeated_positions(refs)):
            members.sort(key=lambda ref: (ref.position, ref.instance_number, ref.frame or 0))
            suffix = f" repeat {repeat + 1}" if repeat else ""
            stacks.append(Stack(key.rows, key.columns, tuple(members), key.label + suffix,
                                key.pixel_spacing))
    return stacks


def _split_repeated_positions(refs: list[SliceRef]) -> list[list[SliceRef]]:
    """Positions repeated within one group (a time series without temporal tags) go to
    separate stacks, in instance-number order: the n-th image at a position joins stack n."""
    by_position: dict[float, list[SliceRef]] = defaultdict(list)
    for ref in sorted(refs, key=lambda r: (r.instance_number, r.sop_instance_uid, r.frame or 0)):
        by_position[round(ref.position, 3)].append(ref)
    depth = max(len(v) for v in by_position.values())
    return [[v[i] for v in by_position.values() if len(v) > i] for i in range(depth)]


def _echo(value: object) -> object:
    """EchoNumbers as a number (it is IS, sometimes multi-valued: the first value)."""
    if value is None or value == "":
        return None
    if isinstance(value, (list, tuple, MultiValue)):
        value = value[0] if len(value) else None
    return _number(value)


def _number(value: object) -> float | None:
    if value is None or value == "":
        return None
    number = float(value)  # type: ignore[arg-type]
    return int(number) if number.is_integer() else round(number, 3)


def _float_or(value: object, default: float) -> float:
    return default if value in (None, "") else float(value)  # type: ignore[arg-type]


def _integer(value: object) -> int | None:
    return None if value in (None, "") else int(value)  # type: ignore[call-overload]


def _instance_number(ds: Dataset) -> int:
    return int(ds.get("InstanceNumber", 0) or 0)


def _spacing(value: object) -> tuple[float, ...]:
    return tuple(round(v, 4) for v in _floats(value, 2))


def _floats(value: object, count: int) -> tuple[float, ...]:
    if value is None:
        raise ValueError("attribute missing")
    values = tuple(float(v) for v in value)  # type: ignore[attr-defined]
    if len(values) != count:
        raise ValueError(f"expected {count} values, got {len(values)}")
    return values


def _rounded(orientation: Sequence[float]) -> tuple[float, ...]:
    return tuple(round(v, 3) + 0.0 for v in orientation)


def _along_normal(orientation: Sequence[float], position: Sequence[float]) -> float:
    normal = np.cross(np.asarray(orientation[:3]), np.asarray(orientation[3:]))
    return float(np.dot(normal, np.asarray(position)))


# A stack whose 0.1st-99.9th percentile spread is under this share of its level (or of 1 for
# a level near 0) holds no image: empty, or a constant with a few stray values. (Even a small
# object in a zero background fills more than 0.1 % of a stack.)
FLAT_SPREAD = 1e-3


def flat_reason(volume: np.ndarray) -> str | None:
    """Why a stack holds nothing to denoise (None: it has signal)."""
    low, middle, high = (float(v) for v in np.percentile(volume, [0.1, 50, 99.9]))
    if high - low > FLAT_SPREAD * max(abs(middle), 1.0):
        return None
    if float(volume.max()) == float(volume.min()) == 0.0:
        return "empty stack (every value 0)"
    return f"near-constant stack (99.8 % of values within {high - low:.3g} of {middle:.4g})"


def load_volume(stack: Stack) -> np.ndarray:
    """The stack's images as float32 (slices, rows, columns) in physical units. Reads the
    pixel data of each file once (a multi-frame file: once per stack it has frames in)."""
    volume = np.empty((stack.depth, stack.rows, stack.columns), dtype=np.float32)
    frames_by_source: dict[Path, list[tuple[int, int]]] = defaultdict(list)  # (frame, slot)
    mosaic: tuple[Path, np.ndarray] | None = None  # the mosaic image, decoded once
    for slot, ref in enumerate(stack.slices):
        if ref.tile is not None:
            if mosaic is None or mosaic[0] != ref.path:
                mosaic = (ref.path, ref.source.pixels())
            _put(volume, slot, stack, ref, mosaic[1][ref.tile.layout.tile(ref.tile.index)])
        elif ref.frame is None:
            _put(volume, slot, stack, ref, ref.source.pixels())
        else:
            frames_by_source[ref.path].append((ref.frame, slot))
    for frames in frames_by_source.values():
        # Multi-frame: decode only this stack's frames, one at a time, in file order.
        frames.sort()
        source = stack.slices[frames[0][1]].source
        pixels = source.frames([frame for frame, _ in frames])
        for (_, slot), image in zip(frames, pixels):
            _put(volume, slot, stack, stack.slices[slot], image)
    return volume


def _put(volume: np.ndarray, slot: int, stack: Stack, ref: SliceRef, pixels: np.ndarray) -> None:
    if pixels.shape != (stack.rows, stack.columns):
        raise SeriesError(f"image {ref.sop_instance_uid} is {pixels.shape}, "
                          f"stack {stack.label} expects {(stack.rows, stack.columns)}")
    volume[slot] = pixels.astype(np.float32) * ref.slope + ref.intercept
