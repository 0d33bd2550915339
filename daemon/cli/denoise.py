"""`denoised-node denoise INPUT OUTPUT`: the node's processing without the network.

A DICOM folder gives one derived series per source series, written exactly as the node
writes them; a NIfTI file gives a NIfTI file with the same header and affine.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import cast

import numpy as np
import pydicom

from denoised_node.config.settings import Settings
from denoised_node.daemon.jobs.pipeline import GateFailed, denoise_series
from denoised_node.daemon.jobs.series_triage import triage_files
from denoised_node.storage.images.series import NothingToDenoise
from denoised_node.storage.models import utcnow

log = logging.getLogger(__name__)
Progress = Callable[[int, int], None]


class OfflineError(Exception):
    """The input cannot be denoised; the message says why."""


def _load_denoiser(settings: Settings):  # type: ignore[no-untyped-def]
    from denoised_node.model.inference import Denoiser

    model = settings.model
    return Denoiser.from_settings(model)


def is_nifti(path: Path) -> bool:
    return path.is_file() and (path.name.endswith(".nii") or path.name.endswith(".nii.gz"))


def denoise_path(settings: Settings, source: Path, target: Path,
                 progress: Progress | None = None, denoiser: object | None = None,
                 override_intended_use: bool = False) -> str:
    """Denoise ``source`` into ``target``; a DICOM series the node would ignore (not MR,
    outside the model's intended use, nothing to denoise) is reported, not written."""
    denoiser = denoiser or _load_denoiser(settings)
    if is_nifti(source):
        return _denoise_nifti(settings, source, target, denoiser, progress)
    if source.is_dir():
        return _denoise_dicom_folder(settings, source, target, denoiser, progress,
                                     override_intended_use)
    raise OfflineError(f"{source} is neither a DICOM folder nor a .nii/.nii.gz file")


def _series_files(folder: Path) -> dict[str, list[Path]]:
    series: dict[str, list[Path]] = defaultdict(list)
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True,
                                 specific_tags=["SeriesInstanceUID"])
        except Exception:  # noqa: BLE001, S112 - not DICOM: skipped
            continue
        uid = ds.get("SeriesInstanceUID")
        if uid:
            series[str(uid)].append(path)
    return series


def _denoise_dicom_folder(settings: Settings, source: Path, target: Path, denoiser: object,
                          progress: Progress | None, override_intended_use: bool) -> str:
    found = _series_files(source)
    if not found:
        raise OfflineError(f"no DICOM files with a SeriesInstanceUID under {source}")
    lines = []
    for series_uid, paths in found.items():
        out_dir = target / series_uid if len(found) > 1 else target
        # The node's decision, with the model in hand: its intended use, whatever the rules
        # would name (a flag may override the intended use; nothing overrides the modality).
        triage = triage_files(settings, paths, lambda _checkpoint: _intended_use(denoiser),
                              override_intended_use=override_intended_use)
        if not triage.denoise:
            lines.append(f"series {series_uid}: {_ignored(str(triage.ignored_reason))}; "
                         "nothing written for it")
            continue
        out_dir.mkdir(parents=True, exist_ok=True)
        try:
            outcome = denoise_series(paths, series_uid, denoiser, settings,  # type: ignore[arg-type]
                                     out_dir, utcnow(), progress=progress, plan=triage.plan,
                                     noise_floor=(triage.decision is None
                                                  or triage.decision.intended_use_applies))
        except GateFailed as exc:
            raise OfflineError(f"series {series_uid}: {exc}; nothing written for it "
                               "(--no-gate writes it anyway)") from None
        except NothingToDenoise as exc:  # flat, or too little noise: nothing to do is no failure
            lines.append(f"series {series_uid}: {_ignored(str(exc))}; nothing written for it")
            continue
        lines.append(f"{len(outcome.files)} derived instance(s) of series "
                     f"{outcome.derived_series_uid} written to {out_dir}")
    return "\n".join(lines)


def _ignored(reason: str) -> str:
    # "ignored, nothing to denoise: ..." reads better than "ignored: nothing to denoise: ..."
    return f"ignored, {reason}" if reason.startswith("nothing to denoise") else f"ignored: {reason}"


def _intended_use(denoiser: object) -> dict[str, object]:
    card = getattr(denoiser, "card", None)
    return dict(getattr(card, "intended_use", None) or {})


def _denoise_nifti(settings: Settings, source: Path, target: Path, denoiser: object,
                   progress: Progress | None) -> str:
    import nibabel as nib

    image = cast("nib.Nifti1Image", nib.load(str(source)))
    data = np.asarray(image.dataobj, dtype=np.float32)
    if data.ndim == 2:
        data = data[:, :, np.newaxis]
    if data.ndim != 3:
        raise OfflineError(f"{source} has {data.ndim} dimensions; a 2D or 3D image is needed")
    # NIfTI keeps (x, y, z); the network denoises (slice, row, column) = (z, y, x).
    volume = np.ascontiguousarray(np.transpose(data, (2, 1, 0)))
    zooms = tuple(float(z) for z in image.header.get_zooms()[:3])
    spacing = (zooms[2], zooms[1], zooms[0]) if len(zooms) == 3 else None
    denoised = denoiser.denoise(volume, progress=progress,  # type: ignore[attr-defined]
                                spacing=spacing)
    if settings.gate.enabled:  # the same gate as a series from the network
        from denoised_node.model.gate import check_result

        verdict = check_result(volume, denoised, settings.gate)
        if not verdict.passed:
            raise OfflineError(f"{source.name}: safety gate failed: {verdict.reason}; nothing "
                               "written (--no-gate writes it anyway)")
    result = np.transpose(denoised, (2, 1, 0)).reshape(np.asarray(image.dataobj).shape)
    header = image.header.copy()
    header.set_data_dtype(np.float32)
    header["scl_slope"], header["scl_inter"] = 1.0, 0.0
    out = nib.Nifti1Image(result.astype(np.float32), image.affine, header)
    target.parent.mkdir(parents=True, exist_ok=True)
    nib.save(out, str(target))
    return f"denoised {volume.shape[0]} slice(s) of {source.name} into {target}"
