"""Private elements whose VR the source never stated, written back as they came.

A file in Implicit VR carries no VRs: pydicom types a private element from its private
dictionary when asked, and that VR may not fit what the vendor wrote (Siemens (0051,xx0E)
"Tra>Cor(2.8)>Sag(0.6)" is 22 bytes; typed SH, which allows 16, it makes an explicit-VR
output invalid). An element read as UN (unknown) is likewise re-typed by pydicom by default.
Both are written as UN with their original bytes: every reader keeps them, none misreads them.
"""

from __future__ import annotations

from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset

UNDEFINED_LENGTH = 0xFFFFFFFF


def keep_private_values_untyped(ds: Dataset) -> None:
    """Turn every not-yet-decoded private element of unknown VR in ``ds`` (and in its
    sequences) into UN with its raw bytes; private creators and sequences stay as they are."""
    for tag in list(ds.keys()):
        element = ds.get_item(tag)
        if (tag.is_private and not tag.is_private_creator
                and isinstance(element, RawDataElement) and element.VR in (None, "UN")
                and element.length != UNDEFINED_LENGTH):
            ds[tag] = DataElement(tag, "UN", element.value or b"")
            continue
        decoded = ds[tag]  # public elements are decoded here rather than when written
        if decoded.VR == "SQ":
            for item in decoded.value or []:
                keep_private_values_untyped(item)
