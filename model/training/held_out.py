"""Held-out test material beyond the MNI slab: report only, never trained on, never used to
choose anything (checkpoint, noise-map factor, NLM's strength, the gate's thresholds).

Each comes from an installed package (nothing is downloaded):
- Colin27 (Debian ``mricron-data``: ``ch2.nii.gz``, one subject, 27 T1 scans averaged, 1 mm
  with scalp): its central slab at 1 mm, and its central 100 mm as 20 axial 5 mm slices;
- the scalp template's and the macaque's central test slabs (the slabs training never samples);
- a piecewise-smooth brain-like phantom of 20 axial 5 mm slices, 256x256: smooth tissues and
  soft edges, where a denoiser that paints a template's texture into flat regions fails;
- nibabel's real EPI, its two volumes: noise added to one, scored against the other;
- the real vendor slices of pydicom and pydicom-data (``pip install pydicom-data``): the
  Philips shoulder (MR2_UNCI) and the Siemens abdomen (MR-SIEMENS-DICOM-WithOverlays).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

import numpy as np
from scipy.ndimage import gaussian_filter

from denoised_node.model.training.data import Split, bright_level, load_named_volume, load_raw

COLIN27 = Path("/usr/share/mricron/templates/ch2.nii.gz")
THICK_MM = 5


def colin27() -> np.ndarray:
    """Colin27 at 1 mm as (slices, rows, cols), its bright level 1."""
    if not COLIN27.exists():
        raise FileNotFoundError(f"Colin27 needs {COLIN27}: apt-get install mricron-data")
    return bright_level(load_raw(COLIN27))


def central_slab(vol: np.ndarray, margin: int, extra: int = 0) -> np.ndarray:
    """The volume's test slab (``data.Split``) with ``margin + extra`` slices either side."""
    a, b = Split(vol.shape[0]).test
    return vol[a - margin - extra : b + margin + extra]


def thick_slices(vol: np.ndarray, slices: int = 20, mm: int = THICK_MM) -> np.ndarray:
    """The central ``slices * mm`` 1 mm slices averaged ``mm`` by ``mm`` (a box slice profile):
    a 2-D series whose neighbours share little with the centre slice."""
    start = vol.shape[0] // 2 - slices * mm // 2
    if start < 0:
        raise ValueError(f"{vol.shape[0]} slices are too few for {slices} slices of {mm} mm")
    block = vol[start : start + slices * mm]
    thick = block.reshape(slices, mm, *vol.shape[1:]).mean(axis=1)
    return (thick / max(float(thick.max()), 1e-6)).astype(np.float32)


def named_test_slab(name: str, margin: int) -> np.ndarray:
    """The central test slab of a named training volume (``data.NAMED_VOLUMES``)."""
    return central_slab(load_named_volume(name), margin)


def smooth_phantom(seed: int = 0, size: int = 256, depth_mm: int = 100) -> np.ndarray:
    """A brain-like phantom at 1 mm (``depth_mm`` x size x size): scalp, skull, CSF, grey and white
    matter and ventricles as smooth regions with soft edges, a gentle shading inside each."""
    rng = np.random.default_rng(90_000 + seed)
    z, y, x = np.mgrid[:depth_mm, :size, :size].astype(np.float32)
    cz, cy, cx = depth_mm / 2, size / 2, size / 2

    def ellipsoid(rz: float, ry: float, rx: float, wobble: float = 0.0) -> np.ndarray:
        r = np.sqrt(((z - cz) / rz) ** 2 + ((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2)
        if wobble:
            field = gaussian_filter(rng.normal(size=r.shape).astype(np.float32), 12.0)
            r = r + wobble * field / (field.std() + 1e-6)
        return (r < 1.0).astype(np.float32)

    head = ellipsoid(160, 0.45 * size, 0.37 * size)
    inner_skull = ellipsoid(150, 0.41 * size, 0.33 * size)
    brain = ellipsoid(140, 0.38 * size, 0.30 * size, wobble=0.01)
    white = ellipsoid(120, 0.30 * size, 0.22 * size, wobble=0.04)
    vent = np.zeros_like(head)
    for side in (-1, 1):
        r = np.sqrt(
            ((z - cz) / 30) ** 2 + ((y - cy + 6) / 28) ** 2 + ((x - cx - side * 10) / 7) ** 2
        )
        vent = np.maximum(vent, (r < 1.0).astype(np.float32))
    vol = (0.75 * head * (1 - inner_skull)            # scalp
           + 0.08 * (inner_skull - brain).clip(0)      # skull and the CSF rim, dark
           + 0.55 * (brain - white).clip(0)            # grey matter
           + 0.85 * (white - vent).clip(0)             # white matter
           + 0.25 * vent)  # ventricles
    shading = (
        1.0 + 0.06 * gaussian_filter(rng.normal(size=vol.shape).astype(np.float32), 20.0) / 0.01
    )
    vol = gaussian_filter(vol * np.clip(shading, 0.85, 1.15), 1.2)  # soft edges
    return (vol / float(vol.max())).astype(np.float32)


def epi_volumes() -> tuple[np.ndarray, np.ndarray]:
    """nibabel's real EPI (2 x 2 x 2.2 mm), its two volumes as (slices, rows, cols)."""
    import nibabel as nib

    path = os.path.join(os.path.dirname(nib.__file__), "tests", "data", "example4d.nii.gz")
    image: Any = nib.load(path)  # a Nifti1Image (the stubs say FileBasedImage)
    data = np.asarray(image.dataobj, dtype=np.float32)
    first, second = (np.ascontiguousarray(np.transpose(data[..., i], (2, 1, 0))) for i in (0, 1))
    return first, second


def reference_noise_variance(first: np.ndarray, second: np.ndarray, mask: np.ndarray) -> float:
    """The variance of one volume's own noise, from the difference of two repeats: what scoring
    against the second volume must take out of the squared error (whatever else differs
    between the repeats, motion or physiology, stays in: the figure is conservative)."""
    return float(np.var((first - second)[mask]) / 2.0)


VENDOR_SLICES = {
    "philips-shoulder": "MR2_UNCI.dcm",
    "siemens-abdomen": "MR-SIEMENS-DICOM-WithOverlays.dcm",
}


def vendor_slice(name: str) -> np.ndarray:
    """A real vendor MR slice (rescale applied) from the pydicom-data wheel, as (1, rows, cols)."""
    import pydicom

    spec = importlib.util.find_spec("data_store")
    roots = list(spec.submodule_search_locations or []) if spec else []
    for root in roots:
        path = Path(root) / "data" / VENDOR_SLICES[name]
        if path.exists():
            ds = pydicom.dcmread(path)
            arr = ds.pixel_array.astype(np.float32)
            arr = arr * float(getattr(ds, "RescaleSlope", 1) or 1) + float(
                getattr(ds, "RescaleIntercept", 0) or 0
            )
            return arr[None] if arr.ndim == 2 else arr
    raise FileNotFoundError(
        f"{VENDOR_SLICES[name]} needs the pydicom-data wheel: pip install pydicom-data"
    )
