"""What rules, the intended-use check and notifications read of a series: the attributes of
its first image.

Enhanced MR keeps SliceThickness and friends in functional groups: an attribute that is not at
the top level is looked up in the shared groups, then in the first frame's.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue

from denoised_node.config.rules import CALLING_AE_TITLE

_GROUP_SEQUENCES = ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence")


@dataclass(frozen=True)
class SeriesAttributes:
    """A series as the rules see it: attribute text by DICOM keyword."""

    series_uid: str
    dataset: Dataset = field(repr=False)
    calling_ae_title: str = ""

    def text(self, keyword: str) -> str:
        """The attribute's value as text: multi-valued ones joined with a backslash, an
        absent or empty one as ""."""
        if keyword == CALLING_AE_TITLE:
            return self.calling_ae_title
        value = _find(self.dataset, keyword)
        if value is None:
            return ""
        if isinstance(value, MultiValue | list | tuple):
            return "\\".join(str(v).strip() for v in value)
        return str(value).strip()

    def number(self, keyword: str) -> float | None:
        """The attribute's (first) value as a number; None when absent or not a number."""
        first = self.text(keyword).split("\\")[0]
        try:
            return float(first)
        except ValueError:
            return None

    def describe(self) -> str:
        """How a person finds the series: description, modality (no patient data)."""
        description = self.text("SeriesDescription") or "(no description)"
        return f"{description} ({self.text('Modality') or 'no modality'})"


def _find(dataset: Dataset, keyword: str) -> object | None:
    value = dataset.get(keyword)
    if value not in (None, ""):
        return value
    for sequence_keyword in _GROUP_SEQUENCES:
        groups = dataset.get(sequence_keyword)
        if not groups:
            continue
        for macro in groups[0]:
            if macro.VR == "SQ" and macro.value:
                nested = macro.value[0].get(keyword)
                if nested not in (None, ""):
                    return nested
    return None


def attributes_from_file(path: Path, calling_ae_title: str = "") -> SeriesAttributes:
    """Read one image's header (no pixel data); raises ValueError for a non-DICOM file."""
    try:
        dataset = pydicom.dcmread(path, stop_before_pixels=True)
    except (InvalidDicomError, OSError, EOFError) as exc:
        raise ValueError(f"{path.name} is not a readable DICOM file: {exc}") from None
    return attributes_from_dataset(dataset, calling_ae_title)


def attributes_from_dataset(dataset: Dataset, calling_ae_title: str = "") -> SeriesAttributes:
    """Facts from a header already read (the worker's plan of the series)."""
    return SeriesAttributes(str(dataset.get("SeriesInstanceUID", "")), dataset, calling_ae_title)


def attributes_from_mapping(series_uid: str, values: Mapping[str, object],
                       calling_ae_title: str = "") -> SeriesAttributes:
    """Facts from keyword -> value (tests, and callers that hold no file)."""
    dataset = Dataset()
    for keyword, value in values.items():
        setattr(dataset, keyword, value)
    return SeriesAttributes(series_uid, dataset, calling_ae_title)
