"""Stored series -> stacks of slices -> volumes.

A series may hold several stacks (echoes, repeated positions over time, orientations);
each is denoised on its own. Headers are read first (no pixels), so grouping is cheap, and a
volume is loaded one slice at a time into a preallocated array, so memory stays bounded.
Both classic (one slice per instance) and enhanced (multi-frame) MR objects are handled.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset

log = logging.getLogger(__name__)

MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
ENHANCED_MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4.1"
LEGACY_ENHANCED_MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4.4"
MR_SOP_CLASSES = frozenset({MR_IMAGE_STORAGE, ENHANCED_MR_IMAGE_STORAGE,
                            LEGACY_ENHANCED_MR_IMAGE_STORAGE})
MULTIFRAME_MR_SOP_CLASSES = frozenset({ENHANCED_MR_IMAGE_STORAGE, LEGACY_ENHANCED_MR_IMAGE_STORAGE})


class SeriesError(Exception):
    """The stored series cannot be turned into volumes."""


class NothingToDenoise(SeriesError):
    """No instance of the series has the pixel data and geometry needed to denoise it."""


@dataclass(frozen=True)
class SliceRef:
    """One 2D image: a classic instance, or one frame (0-based) of a multi-frame one."""

    path: Path
    sop_instance_uid: str
    sop_class_uid: str
    frame: int | None
    position: float  # along the stack's normal, mm
    slope: float
    intercept: float
    instance_number: int


@dataclass(frozen=True)
class Stack:
    rows: int
    columns: int
    slices: tuple[SliceRef, ...]
    label: str  # e.g. "echo 2", for logs and errors

    @property
    def depth(self) -> int:
        return len(self.slices)


@dataclass
class StackPlan:
    stacks: list[Stack] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (SOP Instance UID, reason)

    @property
    def slice_count(self) -> int:
        return sum(stack.depth for stack in self.stacks)


@dataclass(frozen=True)
class _Candidate:
    ref: SliceRef
    orientation: tuple[float, ...]
    group: tuple[object, ...]


def plan_stacks(paths: Iterable[Path]) -> StackPlan:
    """Read the headers of ``paths`` and group their images into sorted stacks."""
    plan = StackPlan()
    candidates: list[_Candidate] = []
    for path in paths:
        try:
            # Large values (pixel data) are deferred: present, but not read into memory.
            ds = pydicom.dcmread(path, defer_size=4096)
        except Exception as exc:  # noqa: BLE001 - any unreadable file is skipped with a reason
            plan.skipped.append((path.stem, f"unreadable: {exc}"))
            continue
        sop_uid = str(ds.get("SOPInstanceUID", path.stem))
        reason = _unusable_reason(ds)
        if reason:
            plan.skipped.append((sop_uid, reason))
            continue
        try:
            candidates.extend(_candidates_of(ds, path))
        except (AttributeError, KeyError, ValueError, IndexError, TypeError) as exc:
            plan.skipped.append((sop_uid, f"no usable geometry: {exc}"))
    plan.stacks = _group_into_stacks(candidates)
    return plan


def _unusable_reason(ds: Dataset) -> str | None:
    if "PixelData" not in ds and "FloatPixelData" not in ds:
        return "no pixel data"
    if int(ds.get("SamplesPerPixel", 1)) != 1:
        return "not a grayscale image"
    image_type = [str(v).upper() for v in ds.get("ImageType", [])]
    if "LOCALIZER" in image_type:
        return "localizer"
    return None


def _candidates_of(ds: Dataset, path: Path) -> list[_Candidate]:
    sop_uid = str(ds.SOPInstanceUID)
    sop_class = str(ds.SOPClassUID)
    instance_number = int(ds.get("InstanceNumber", 0) or 0)
    if "PerFrameFunctionalGroupsSequence" in ds:
        return _frame_candidates(ds, path, sop_uid, sop_class, instance_number)
    orientation = _floats(ds.ImageOrientationPatient, 6)
    position = _floats(ds.ImagePositionPatient, 3)
    slope = float(ds.get("RescaleSlope", 1) or 1)
    intercept = float(ds.get("RescaleIntercept", 0) or 0)
    group = (int(ds.Rows), int(ds.Columns), _echo(ds), _temporal(ds))
    ref = SliceRef(path, sop_uid, sop_class, None, _along_normal(orientation, position),
                   slope, intercept, instance_number)
    return [_Candidate(ref, _rounded(orientation), group)]


def _frame_candidates(ds: Dataset, path: Path, sop_uid: str, sop_class: str,
                      instance_number: int) -> list[_Candidate]:
    shared = ds.get("SharedFunctionalGroupsSequence", [Dataset()])[0]
    out = []
    for index, frame in enumerate(ds.PerFrameFunctionalGroupsSequence):
        orientation = _floats(_group_item(frame, shared, "PlaneOrientationSequence")
                              .ImageOrientationPatient, 6)
        position = _floats(_group_item(frame, shared, "PlanePositionSequence")
                           .ImagePositionPatient, 3)
        slope, intercept = 1.0, 0.0
        try:
            transform = _group_item(frame, shared, "PixelValueTransformationSequence")
            slope = float(transform.get("RescaleSlope", 1) or 1)
            intercept = float(transform.get("RescaleIntercept", 0) or 0)
        except KeyError:
            pass
        echo, temporal = None, None
        try:
            echo = _group_item(frame, shared, "MREchoSequence").get("EffectiveEchoTime")
        except KeyError:
            pass
        try:
            temporal = _group_item(frame, shared, "FrameContentSequence").get(
                "TemporalPositionIndex")
        except KeyError:
            pass
        group = (int(ds.Rows), int(ds.Columns), echo, temporal)
        ref = SliceRef(path, sop_uid, sop_class, index, _along_normal(orientation, position),
                       slope, intercept, instance_number)
        out.append(_Candidate(ref, _rounded(orientation), group))
    return out


def _group_item(frame: Dataset, shared: Dataset, keyword: str) -> Dataset:
    for source in (frame, shared):
        if keyword in source and len(source[keyword].value):
            return source[keyword].value[0]
    raise KeyError(keyword)


def _group_into_stacks(candidates: list[_Candidate]) -> list[Stack]:
    groups: dict[tuple[object, ...], list[SliceRef]] = defaultdict(list)
    for cand in candidates:
        groups[(cand.orientation, *cand.group)].append(cand.ref)
    stacks: list[Stack] = []
    for key, refs in sorted(groups.items(), key=lambda item: str(item[0])):
        rows, columns = int(key[1]), int(key[2])  # type: ignore[call-overload]
        label = _label(key)
        for repeat, members in enumerate(_split_repeated_positions(refs)):
            members.sort(key=lambda ref: (ref.position, ref.instance_number))
            suffix = f" repeat {repeat + 1}" if repeat else ""
            stacks.append(Stack(rows, columns, tuple(members), label + suffix))
    return stacks


def _split_repeated_positions(refs: list[SliceRef]) -> list[list[SliceRef]]:
    """Positions repeated within one group (a time series without temporal tags) go to
    separate stacks, in instance-number order: the n-th image at a position joins stack n."""
    by_position: dict[float, list[SliceRef]] = defaultdict(list)
    for ref in sorted(refs, key=lambda r: (r.instance_number, r.sop_instance_uid, r.frame or 0)):
        by_position[round(ref.position, 3)].append(ref)
    depth = max(len(v) for v in by_position.values())
    return [[v[i] for v in by_position.values() if len(v) > i] for i in range(depth)]


def _label(key: tuple[object, ...]) -> str:
    parts = [f"{key[1]}x{key[2]}"]
    if key[3] is not None:
        parts.append(f"echo {key[3]}")
    if key[4] is not None:
        parts.append(f"time {key[4]}")
    return ", ".join(parts)


def _echo(ds: Dataset) -> object:
    value = ds.get("EchoNumbers")
    if value is None or value == "":
        return None
    return str(value)


def _temporal(ds: Dataset) -> object:
    value = ds.get("TemporalPositionIdentifier")
    return None if value in (None, "") else int(value)


def _floats(value: object, count: int) -> tuple[float, ...]:
    values = tuple(float(v) for v in value)  # type: ignore[attr-defined]
    if len(values) != count:
        raise ValueError(f"expected {count} values, got {len(values)}")
    return values


def _rounded(orientation: Sequence[float]) -> tuple[float, ...]:
    return tuple(round(v, 3) + 0.0 for v in orientation)


def _along_normal(orientation: Sequence[float], position: Sequence[float]) -> float:
    normal = np.cross(np.asarray(orientation[:3]), np.asarray(orientation[3:]))
    return float(np.dot(normal, np.asarray(position)))


def load_volume(stack: Stack) -> np.ndarray:
    """The stack's images as float32 (slices, rows, columns) in physical units."""
    volume = np.empty((stack.depth, stack.rows, stack.columns), dtype=np.float32)
    cache_path: Path | None = None
    cache: np.ndarray | None = None
    for index, ref in enumerate(stack.slices):
        if ref.frame is None:
            pixels = pydicom.dcmread(ref.path).pixel_array
        else:
            # Multi-frame: decode the object once for all of its frames in this stack.
            if cache_path != ref.path:
                cache = pydicom.dcmread(ref.path).pixel_array
                cache = cache if cache.ndim == 3 else cache[np.newaxis]
                cache_path = ref.path
            pixels = cache[ref.frame]  # type: ignore[index]
        if pixels.shape != (stack.rows, stack.columns):
            raise SeriesError(f"image {ref.sop_instance_uid} is {pixels.shape}, "
                              f"stack {stack.label} expects {(stack.rows, stack.columns)}")
        volume[index] = pixels.astype(np.float32) * ref.slope + ref.intercept
    return volume
