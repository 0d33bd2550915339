"""The DICOM attribute keywords (SeriesDescription, ...) that rules may match on.

Read from pydicom's data dictionary file without importing pydicom itself: the package's
__init__ loads its pixel handlers (numpy and more, about half a second), and every command
that loads the settings, `status` included, would pay for it."""

from __future__ import annotations

import importlib.util
from functools import cache
from pathlib import Path


@cache
def dicom_keywords() -> frozenset[str]:
    spec = importlib.util.find_spec("pydicom")
    folders = list(spec.submodule_search_locations or []) if spec else []
    for folder in folders:
        source = Path(folder) / "_dicom_dict.py"
        module_spec = importlib.util.spec_from_file_location("_denoised_node_dicom_dict", source)
        if source.is_file() and module_spec is not None and module_spec.loader is not None:
            module = importlib.util.module_from_spec(module_spec)
            module_spec.loader.exec_module(module)
            return frozenset(entry[4] for entry in module.DicomDictionary.values() if entry[4])
    from pydicom.datadict import keyword_dict  # another layout of pydicom: the slow way

    return frozenset(keyword_dict)
