"""Noise simulation (Rician: the magnitude of complex Gaussian noise) and a robust estimator
of the noise sigma, the same one in training and inference.
"""

from __future__ import annotations

import numpy as np
import torch

# median(|N(0, 1)|)
_MAD_TO_SIGMA = 1.0 / 0.6744897501960817


def add_rician(clean: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """``|clean + n1 + i n2|`` with n1, n2 ~ N(0, sigma^2): magnitude MR noise."""
    re = clean + rng.normal(0.0, sigma, clean.shape).astype(np.float32, copy=False)
    im = rng.normal(0.0, sigma, clean.shape).astype(np.float32, copy=False)
    return np.sqrt(re * re + im * im, dtype=np.float32)


def add_coil_noise(clean: np.ndarray, sigma: float | np.ndarray, coils: int,
                   rng: np.random.Generator) -> np.ndarray:
    """Magnitude of sum-of-squares over ``coils`` coils (noncentral chi; Rician for one)."""
    s = np.asarray(sigma, dtype=np.float32)
    re = clean + s * rng.normal(0.0, 1.0, clean.shape).astype(np.float32)
    im = s * rng.normal(0.0, 1.0, clean.shape).astype(np.float32)
    power = re * re + im * im
    if coils > 1:
        power += (s * s) * rng.chisquare(2 * (coils - 1), clean.shape).astype(np.float32)
    return np.sqrt(power, dtype=np.float32)


def gfactor_field(shape: tuple[int, int], low: float = 0.6, high: float = 1.6) -> np.ndarray:
    """A smooth noise amplification across the slice: ``high`` in the middle, ``low`` at the rim."""
    h, w = shape
    yy, xx = np.mgrid[:h, :w]
    r2 = ((yy - h / 2) / (h / 2)) ** 2 + ((xx - w / 2) / (w / 2)) ** 2
    return (low + (high - low) * np.exp(-r2 / 0.5)).astype(np.float32)


def add_rician_torch(
    clean: torch.Tensor, sigma: torch.Tensor, generator: torch.Generator
) -> torch.Tensor:
    """Torch version; ``sigma`` broadcasts against ``clean`` (e.g. shape (B, 1, 1, 1))."""
    re = clean + sigma * torch.randn(
        clean.shape, generator=generator, dtype=clean.dtype, device=clean.device
    )
    im = sigma * torch.randn(
        clean.shape, generator=generator, dtype=clean.dtype, device=clean.device
    )
    return torch.sqrt(re * re + im * im)


def estimate_sigma(image: np.ndarray) -> float:
    """Noise sigma of one 2D slice: the median absolute value of the finest diagonal Haar
    wavelet band over 0.6745 (Donoho's estimator, as in skimage's ``estimate_sigma`` but with
    a Haar wavelet, which is exact for white noise and needs no padding).

    It reads a little low on magnitude images with much background (Rician noise there is
    Rayleigh, with a smaller spread); the network is trained with this very estimator, so the
    bias is learnt, not corrected.
    """
    x = np.asarray(image, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"estimate_sigma expects a 2D slice, got shape {x.shape}")
    h, w = (x.shape[0] // 2) * 2, (x.shape[1] // 2) * 2
    if h == 0 or w == 0:
        return 0.0
    x = x[:h, :w]
    hh = (x[0::2, 0::2] - x[0::2, 1::2] - x[1::2, 0::2] + x[1::2, 1::2]) * 0.5
    return float(np.median(np.abs(hh)) * _MAD_TO_SIGMA)


def estimate_sigma_volume(volume: np.ndarray) -> np.ndarray:
    """Per-slice estimates for a (slices, rows, cols) volume."""
    return np.array([estimate_sigma(s) for s in volume], dtype=np.float32)


def robust_scale(volume: np.ndarray) -> float:
    """The intensity that maps to 1.0 at the network's input: the 99.5th percentile of the
    volume (a bright-tissue level that ignores a few hot voxels), or the max if that is 0."""
    v = np.asarray(volume, dtype=np.float32)
    if v.size > 4_000_000:  # a strided subsample is plenty for a percentile
        v = v.reshape(-1)[:: v.size // 2_000_000]
    scale = float(np.percentile(v, 99.5))
    if not np.isfinite(scale) or scale <= 0:
        scale = float(np.max(np.abs(v))) if v.size else 0.0
    return scale if scale > 0 else 1.0
