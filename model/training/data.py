"""Training data: clean volumes, the held-out split, and noisy 2.5D patch batches.

Volumes are float32 arrays (slices, rows, cols), scaled so the clean maximum is 1. Each volume
holds out a central slab of ``holdout`` slices plus a ``gap`` on each side along the slice axis;
training only ever samples the two blocks outside (slab and gap are never seen, along any axis).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from denoised_node.model.hyperparameters import HYPERPARAMETERS
from denoised_node.model.noise import add_rician, estimate_sigma
from denoised_node.model.schedule import NoiseSchedule

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# Sources
# ---------------------------------------------------------------------------------------------


def _axial(data: np.ndarray) -> np.ndarray:
    """(x, y, z) RAS array -> (z, rows, cols) with anterior at the top, as a viewer shows it."""
    return np.ascontiguousarray(np.flip(np.transpose(data, (2, 1, 0)), axis=1), dtype=np.float32)


def load_mni_t1() -> np.ndarray:
    """nilearn's MNI152 1 mm T1 template (ships in the wheel; nothing is downloaded)."""
    from nilearn.datasets import load_mni152_template

    vol = _axial(np.asarray(load_mni152_template(resolution=1).get_fdata()))
    return vol / float(vol.max())


def load_mni_t2_like() -> np.ndarray:
    """A second contrast for testing only, synthesised from the MNI152 tissue maps: CSF bright,
    grey matter mid, white matter dark (T2-like); never used in training."""
    from nilearn.datasets import load_mni152_gm_template, load_mni152_wm_template
    from scipy.ndimage import gaussian_filter

    gm = _axial(np.asarray(load_mni152_gm_template(resolution=1).get_fdata()))
    wm = _axial(np.asarray(load_mni152_wm_template(resolution=1).get_fdata()))
    t1 = load_mni_t1()
    brain = gaussian_filter((t1 > 0.05).astype(np.float32), 1.0)
    csf = np.clip(brain - gm - wm, 0.0, 1.0)
    vol = 0.30 * wm + 0.55 * gm + 1.0 * csf
    vol = gaussian_filter(vol, 0.5) * (brain > 0.5)
    return (vol / float(vol.max())).astype(np.float32)


def mni_maps() -> np.ndarray:
    """The MNI152 training anatomy as tissue maps (4, slices, rows, cols): the T1 template,
    grey matter, white matter, CSF (``synth.brain_maps``)."""
    from nilearn.datasets import load_mni152_gm_template, load_mni152_wm_template

    from denoised_node.model.training.synth import brain_maps

    gm = _axial(np.asarray(load_mni152_gm_template(resolution=1).get_fdata()))
    wm = _axial(np.asarray(load_mni152_wm_template(resolution=1).get_fdata()))
    return brain_maps(load_mni_t1(), gm, wm)


# Named training anatomy beyond nilearn's template; each ships inside an installable package
# (nothing is downloaded at run time). The model card lists each source and its licence.
NIMARE_SCALP = "resources/templates/tpl-MNI152NLin6Asym_res-01_T1w.nii.gz"
INIA19_T1 = Path("/usr/share/mricron/templates/inia19-t1-brain.nii.gz")
NAMED_VOLUMES = {
    "mni152-t1": "nilearn's MNI152 2009c T1 template and tissue maps, 1 mm, brain only (BSD-3)",
    "mni152-scalp": (
        "FSL MNI152NLin6Asym T1 with scalp and neck, 1 mm, from the nimare wheel "
        "(`pip install --no-deps nimare`; MIT)"
    ),
    "inia19-macaque": (
        "INIA19 macaque T1 template, 0.5 mm voxels read as a 1 mm grid, from "
        "Debian's mricron-data (`apt-get install mricron-data`; see its debian/copyright)"
    ),
}


def _named_path(spec: str) -> Path:
    """Where an installed package keeps the named volume, or a clear error naming the install."""
    if spec == "mni152-scalp":
        import importlib.util

        found = importlib.util.find_spec("nimare")
        roots = list(found.submodule_search_locations or []) if found else []
        for root in roots:
            path = Path(root) / NIMARE_SCALP
            if path.exists():
                return path
        raise FileNotFoundError("mni152-scalp needs the nimare wheel: pip install --no-deps nimare")
    if spec == "inia19-macaque":
        if INIA19_T1.exists():
            return INIA19_T1
        raise FileNotFoundError(f"inia19-macaque needs {INIA19_T1}: apt-get install mricron-data")
    raise ValueError(f"unknown named volume {spec!r}; known: {', '.join(NAMED_VOLUMES)}")


def load_named_volume(spec: str) -> np.ndarray:
    """A named volume (``NAMED_VOLUMES``) as (slices, rows, cols), its bright level 1: divided by
    its 99.9th percentile and clipped at 1.2 (the macaque template has a few outliers at 3x)."""
    if spec == "mni152-t1":
        return load_mni_t1()
    return bright_level(load_raw(_named_path(spec)))


def bright_level(vol: np.ndarray) -> np.ndarray:
    """A template on its bright level: divided by its 99.9th percentile of non-zero voxels,
    clipped at 1.2 and scaled so that 1.2 is 1."""
    vol = np.clip(vol, 0.0, None)
    level = float(np.percentile(vol[vol > 0], 99.9))
    return np.clip(vol / level, 0.0, 1.2).astype(np.float32) / np.float32(1.2)


def is_named_volume(spec: str) -> bool:
    return spec in NAMED_VOLUMES


def volume_maps(vol: np.ndarray) -> np.ndarray:
    """Another clean volume as the synthesiser's anatomy: its own intensities as the texture
    channel, no tissue maps (so its contrast is drawn by gamma and bias only)."""
    maps = np.zeros((4, *vol.shape), dtype=np.float32)
    maps[0] = vol / max(float(vol.max()), 1e-12)
    return maps


def load_raw(path: str | Path) -> np.ndarray:
    """A volume from a NIfTI file or a DICOM folder as (slices, rows, cols), in its own units."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"training volume {path} does not exist")
    if path.is_dir():
        vol = _read_dicom_folder(path)
    else:
        import nibabel as nib

        vol = _axial(np.asarray(nib.load(str(path)).get_fdata(), dtype=np.float32))  # type: ignore[attr-defined]
    return np.nan_to_num(vol.astype(np.float32))


def load_training_volume(path: str | Path) -> np.ndarray:
    """A clean volume from a NIfTI file or a DICOM folder, as (slices, rows, cols), max 1."""
    vol = load_raw(path)
    vol -= min(0.0, float(vol.min()))
    peak = float(vol.max())
    if peak <= 0:
        raise ValueError(f"{path} is empty (all zero)")
    return vol / peak


def load_pair(noisy_path: str | Path, clean_path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """A real noisy/clean pair (same grid), both divided by the clean maximum."""
    noisy, clean = load_raw(noisy_path), load_raw(clean_path)
    if noisy.shape != clean.shape:
        raise ValueError(
            f"{noisy_path} {noisy.shape} and {clean_path} {clean.shape} are not on the same grid"
        )
    peak = float(clean.max())
    if peak <= 0:
        raise ValueError(f"{clean_path} is empty (all zero)")
    return noisy / peak, clean / peak


def _read_dicom_folder(folder: Path) -> np.ndarray:
    import pydicom

    slices: list[tuple[float, np.ndarray]] = []
    for f in sorted(folder.iterdir()):
        if not f.is_file():
            continue
        try:
            ds = pydicom.dcmread(f)
        except Exception as exc:  # noqa: BLE001 - not DICOM: skip it
            logger.debug("skipping %s: %s", f, exc)
            continue
        if "PixelData" not in ds:
            continue
        arr = ds.pixel_array.astype(np.float32) * float(getattr(ds, "RescaleSlope", 1)) + float(
            getattr(ds, "RescaleIntercept", 0)
        )
        iop = np.array(getattr(ds, "ImageOrientationPatient", [1, 0, 0, 0, 1, 0]), dtype=float)
        ipp = np.array(getattr(ds, "ImagePositionPatient", [0, 0, len(slices)]), dtype=float)
        normal = np.cross(iop[:3], iop[3:])
        slices.append((float(ipp @ normal), arr))
    if not slices:
        raise ValueError(f"{folder} holds no DICOM images")
    slices.sort(key=lambda s: s[0])
    return np.stack([s[1] for s in slices])


# ---------------------------------------------------------------------------------------------
# Split
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Split:
    """Slice-axis ranges of one volume: test slab, validation slices (in the gap), training."""

    n: int
    holdout: int = 24
    gap: int = 8

    @property
    def test(self) -> tuple[int, int]:
        start = self.n // 2 - self.holdout // 2
        return start, start + self.holdout

    @property
    def excluded(self) -> tuple[int, int]:
        a, b = self.test
        return max(0, a - self.gap), min(self.n, b + self.gap)

    @property
    def validation(self) -> tuple[int, int]:
        """The half of the lower gap furthest from the test slab (never trained on)."""
        lo, a = self.excluded[0], self.test[0]
        return lo, lo + max(1, (a - lo) // 2)

    def training_ranges(self) -> list[tuple[int, int]]:
        """Slice ranges training may sample: either side of the slab and its gaps."""
        lo, hi = self.excluded
        return [(a, b) for a, b in ((0, lo), (hi, self.n)) if b > a]

    def training_blocks(self, vol: np.ndarray) -> list[np.ndarray]:
        return [vol[a:b] for a, b in self.training_ranges()]


# ---------------------------------------------------------------------------------------------
# Patch sampler
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SamplerConfig:
    patch: int = HYPERPARAMETERS.patch
    in_slices: int = HYPERPARAMETERS.in_slices
    sigma_range: tuple[float, float] = HYPERPARAMETERS.sigma_range
    axis_probs: tuple[float, float, float] = HYPERPARAMETERS.axis_probs
    stride2_prob: float = 0.25  # neighbours two slices apart (thicker-slice scans)
    gamma_prob: float = 0.3
    gamma_range: tuple[float, float] = (0.7, 1.4)
    scale_jitter: float = 0.08
    min_foreground: float = 0.05


class PatchSampler:
    """Draws batches ``(inputs (B,S,P,P), targets (B,1,P,P), timesteps (B,), sigmas (B,))``,
    normalised the way inference normalises: divided by the volume's robust scale."""

    def __init__(
        self,
        blocks: list[np.ndarray],
        scale: float | list[float],
        schedule: NoiseSchedule,
        cfg: SamplerConfig,
        rng: np.random.Generator,
        noisy_blocks: list[np.ndarray] | None = None,
    ) -> None:
        """``noisy_blocks`` (real noisy data on the grid of ``blocks``) replaces simulated noise."""
        if not blocks:
            raise ValueError("no training data: every volume is too small for the held-out split")
        if noisy_blocks is not None and [b.shape for b in noisy_blocks] != [
            b.shape for b in blocks
        ]:
            raise ValueError("noisy and clean training blocks differ in shape")
        self.blocks = blocks
        self.noisy_blocks = noisy_blocks
        # robust_scale of each block's volume (the percentile commutes with gamma)
        self.scales = list(scale) if isinstance(scale, list) else [float(scale)] * len(blocks)
        if len(self.scales) != len(blocks):
            raise ValueError("one scale per training block")
        self.schedule = schedule
        self.cfg = cfg
        self.rng = rng
        sizes = np.array([b.size for b in blocks], dtype=np.float64)
        self.block_probs = sizes / sizes.sum()

    def _slab(self) -> tuple[np.ndarray, np.ndarray | None, float]:
        rng, cfg = self.rng, self.cfg
        b = int(rng.choice(len(self.blocks), p=self.block_probs))
        block = self.blocks[b]
        axis = int(rng.choice(3, p=np.asarray(cfg.axis_probs)))
        v = np.moveaxis(block, axis, 0)
        stride = 2 if rng.random() < cfg.stride2_prob else 1
        half = cfg.in_slices // 2
        for _ in range(20):
            c = int(rng.integers(0, v.shape[0]))
            if v[c].max() > 0.1:
                break
        idx = np.clip(c + stride * np.arange(-half, half + 1), 0, v.shape[0] - 1)
        slab = np.asarray(v[idx], dtype=np.float32)
        noisy = None
        if self.noisy_blocks is not None:
            noisy = np.asarray(np.moveaxis(self.noisy_blocks[b], axis, 0)[idx], dtype=np.float32)
        p = cfg.patch
        ph, pw = max(0, p - slab.shape[1]), max(0, p - slab.shape[2])
        if ph or pw:
            pad = ((0, 0), (ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2))
            slab = np.pad(slab, pad)
            noisy = None if noisy is None else np.pad(noisy, pad)
        return slab, noisy, self.scales[b]

    def sample(self) -> tuple[np.ndarray, np.ndarray, float, float]:
        rng, cfg = self.rng, self.cfg
        slab, real_noisy, scale = self._slab()
        half = cfg.in_slices // 2
        if real_noisy is None and rng.random() < cfg.gamma_prob:
            g = float(rng.uniform(*cfg.gamma_range))
            slab = slab**g
            scale = scale**g
        scale *= float(rng.uniform(1 - cfg.scale_jitter, 1 + cfg.scale_jitter))
        sigma = float(rng.uniform(*cfg.sigma_range)) if real_noisy is None else float("nan")
        # The estimate sees the whole noisy centre slice, as at inference.
        centre_noisy = (
            add_rician(slab[half], sigma, rng) if real_noisy is None else real_noisy[half]
        )
        sigma_hat = estimate_sigma(centre_noisy)
        p = cfg.patch
        h, w = slab.shape[1:]
        for _ in range(10):
            y, x = int(rng.integers(0, h - p + 1)), int(rng.integers(0, w - p + 1))
            if (slab[half, y : y + p, x : x + p] > 0.04).mean() >= cfg.min_foreground:
                break
        clean = slab[:, y : y + p, x : x + p]
        if real_noisy is None:
            noisy = add_rician(clean, sigma, rng)
            noisy[half] = centre_noisy[y : y + p, x : x + p]
        else:
            noisy = real_noisy[:, y : y + p, x : x + p].copy()
        k = int(rng.integers(0, 4))
        noisy, clean = np.rot90(noisy, k, axes=(1, 2)), np.rot90(clean, k, axes=(1, 2))
        if rng.random() < 0.5:
            noisy, clean = noisy[:, :, ::-1], clean[:, :, ::-1]
        if rng.random() < 0.5:  # through-plane flip
            noisy, clean = noisy[::-1], clean[::-1]
        return (
            (noisy / scale).astype(np.float32),
            (clean[half : half + 1] / scale).astype(np.float32),
            sigma_hat / scale,
            sigma,
        )

    def batch(self, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        items = [self.sample() for _ in range(n)]
        x = np.stack([i[0] for i in items])
        y = np.stack([i[1] for i in items])
        sig_hat = np.array([i[2] for i in items], dtype=np.float32)
        t = self.schedule.timestep(sig_hat)
        sig = np.array([i[3] for i in items], dtype=np.float32)
        return x, y, t, sig


def foreground_mask(clean: np.ndarray) -> np.ndarray:
    """The evaluation mask: clean > 10/255 of its max."""
    return clean > (10.0 / 255.0) * float(clean.max())
