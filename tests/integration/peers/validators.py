"""Reference consumers: dciodvfy (IOD validation) and dcm2niix (geometry as NIfTI)."""

from __future__ import annotations

import struct
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tests.integration.peers.tools import require_tool


@dataclass(frozen=True)
class DciodvfyReport:
    errors: list[str]
    warnings: list[str]
    output: str


def dciodvfy_report(path: Path) -> DciodvfyReport:
    done = subprocess.run(
        [require_tool("dciodvfy"), str(path)],
        capture_output=True,
        text=True,
        errors="replace",
        timeout=120,
        check=False,
    )
    output = done.stdout + done.stderr
    lines = output.splitlines()
    return DciodvfyReport(
        [x for x in lines if "Error" in x], [x for x in lines if "Warning" in x], output
    )


def dciodvfy(path: Path) -> list[str]:
    """The error lines dciodvfy prints for one file (an empty list: valid)."""
    return dciodvfy_report(path).errors


def nifti_affine(path: Path) -> np.ndarray:
    """The sform affine (RAS, mm) of a NIfTI-1 file, read from its header."""
    header = path.read_bytes()[:348]
    endian = "<" if struct.unpack("<i", header[:4])[0] == 348 else ">"
    sform_code = struct.unpack(endian + "h", header[254:256])[0]
    if sform_code <= 0:
        raise ValueError(f"{path} has no sform")
    rows = [
        struct.unpack(endian + "4f", header[offset : offset + 16]) for offset in (280, 296, 312)
    ]
    return np.vstack([np.asarray(rows, dtype=np.float64), [0.0, 0.0, 0.0, 1.0]])


def dcm2niix_affines(series_dir: Path, out_dir: Path) -> dict[str, np.ndarray]:
    """Convert the DICOM files in series_dir; each NIfTI file's name -> its affine."""
    out_dir.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        [
            require_tool("dcm2niix"),
            "-z",
            "n",
            "-b",
            "n",
            "-f",
            "%s_%d",
            "-o",
            str(out_dir),
            str(series_dir),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    outputs = sorted(out_dir.glob("*.nii"))
    if done.returncode != 0 or not outputs:
        raise AssertionError(
            f"dcm2niix failed ({done.returncode}) on {series_dir}:\n{done.stdout}{done.stderr}"
        )
    return {path.name: nifti_affine(path) for path in outputs}


def dcm2niix_affine(series_dir: Path, out_dir: Path) -> np.ndarray:
    """The affine of the single volume dcm2niix makes from series_dir."""
    affines = dcm2niix_affines(series_dir, out_dir)
    if len(affines) != 1:
        raise AssertionError(
            f"dcm2niix made {len(affines)} volumes from {series_dir}: {sorted(affines)}"
        )
    return next(iter(affines.values()))
