"""Series the node leaves alone although their ImageType does not say so: localizers
(surveys, scouts, pilots), reformats (MPR, resampled, projections) and thumbnail matrices.

Scanners name these inconsistently: a Siemens scout is ORIGINAL\\PRIMARY\\M\\NORM with
"AAHead_Scout" as its protocol, a Philips "FAST LOCALIZER" is ORIGINAL\\PRIMARY\\OTHER. What
they share: words in the description or protocol, three orthogonal planes in one series, a
tiny matrix. A reformat was made from another series, which the node denoises instead.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
from pydicom.dataset import Dataset

# Whole words (case-insensitive) in SeriesDescription, ProtocolName or SequenceName.
LOCALIZER_WORDS = re.compile(
    r"(?<![a-z])(locali[sz]er|locator|scout|survey|surview|pilot|tri-?plane|3[- ]?plane|"
    r"aahead_scout|aascout|plan[- ]?scan)(?![a-z])", re.IGNORECASE)
# ImageType values (3+) and description words of images computed from other images.
REFORMAT_TYPES = {"MPR": "MPR", "CSA MPR": "MPR", "CSAMPR": "MPR", "REFORMATTED": "reformatted",
                  "RESAMPLED": "resampled", "CSA RESAMPLED": "resampled",
                  "CSA MIP": "projection", "PROJECTION IMAGE": "projection",
                  "MIP": "projection", "MINIP": "projection", "CURVED": "curved reformat",
                  "CSA 3D EDITOR": "3D editor"}
REFORMAT_WORDS = re.compile(r"(<MPR|\bMPR\b|\breformat|\bresampled?\b|<MIP)", re.IGNORECASE)
# Below this many rows or columns an image is a thumbnail or a survey, not a diagnostic image.
MIN_MATRIX = 24
INSTEAD = "the node denoises its source series instead"
ORTHOGONAL = 0.1  # |cos| between normals under this: orthogonal planes


@dataclass(frozen=True)
class InputPolicy:
    """What the site chose for inputs that can go either way (``[series]`` settings)."""

    mosaics: Literal["denoise", "ignore"] = "denoise"
    reformats: Literal["ignore", "denoise"] = "ignore"


DEFAULT_POLICY = InputPolicy()


def _values(ds: Dataset, keyword: str) -> list[str]:
    value = ds.get(keyword) or []
    values = [value] if isinstance(value, str) else list(value)
    return [str(v).strip().upper() for v in values]


def _frame_types(ds: Dataset) -> list[str]:
    """Enhanced MR: the shared FrameType (value 3 on is the flavour, e.g. MPR)."""
    shared = ds.get("SharedFunctionalGroupsSequence")
    values: list[str] = []
    for group in shared or []:
        for item in group.get("MRImageFrameTypeSequence", []):
            values += _values(item, "FrameType")
    return values


def _texts(ds: Dataset) -> str:
    return " | ".join(str(ds.get(k, "") or "") for k in
                      ("SeriesDescription", "ProtocolName", "SequenceName"))


def localizer_reason(ds: Dataset) -> str | None:
    """A localizer by its words or its matrix (ImageType LOCALIZER is read elsewhere)."""
    found = LOCALIZER_WORDS.search(_texts(ds))
    if found:
        return f"localizer (named '{found.group(0)}')"
    rows, columns = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    if 0 < min(rows, columns) < MIN_MATRIX:
        return f"localizer or thumbnail (matrix {rows}x{columns}, under {MIN_MATRIX})"
    return None


def reformat_reason(ds: Dataset, policy: InputPolicy) -> str | None:
    """A reformat or projection of another series, unless the site denoises them."""
    if policy.reformats == "denoise":
        return None
    image_type = _values(ds, "ImageType")
    for value in image_type[2:] + _frame_types(ds)[2:]:
        if value in REFORMAT_TYPES:
            return f"reformat ({REFORMAT_TYPES[value]}): {INSTEAD}"
    found = REFORMAT_WORDS.search(_texts(ds)) if image_type[:1] == ["DERIVED"] else None
    if found:
        return f"reformat (named '{found.group(0).lstrip('<')}'): {INSTEAD}"
    return None


def orthogonal_planes(orientations: Iterable[Sequence[float]]) -> bool:
    """Three mutually orthogonal slice planes among ``orientations`` (a 3-plane localizer)."""
    normals: list[np.ndarray] = []
    for orientation in orientations:
        normal = np.cross(np.asarray(orientation[:3]), np.asarray(orientation[3:]))
        length = float(np.linalg.norm(normal))
        if length > 0:
            normals.append(normal / length)
    distinct: list[np.ndarray] = []
    for normal in normals:
        if all(abs(float(np.dot(normal, d))) < 1 - ORTHOGONAL for d in distinct):
            distinct.append(normal)
    for i, a in enumerate(distinct):
        for j, b in enumerate(distinct[i + 1:], start=i + 1):
            for c in distinct[j + 1:]:
                if max(abs(float(np.dot(a, b))), abs(float(np.dot(a, c))),
                       abs(float(np.dot(b, c)))) < ORTHOGONAL:
                    return True
    return False
