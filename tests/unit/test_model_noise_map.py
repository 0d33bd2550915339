"""The noise map on each noise case real scanners produce (issue: noise level for real MR)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from denoised_node.model.noise import add_coil_noise, estimate_sigma, gfactor_field
from denoised_node.model.noise_map import noise_map

SIGMA = 0.05


def phantom(slices: int = 6, size: int = 192) -> np.ndarray:
    """Head-like slices: an ellipse of tissue with darker and brighter blobs, zero outside."""
    yy, xx = np.mgrid[:size, :size] / size - 0.5
    head = (yy / 0.42) ** 2 + (xx / 0.36) ** 2 < 1
    img = np.where(head, 0.6, 0.0)
    img = img + 0.3 * (((yy + 0.1) / 0.12) ** 2 + ((xx - 0.1) / 0.08) ** 2 < 1)
    img = img - 0.35 * (((yy - 0.15) / 0.06) ** 2 + ((xx + 0.1) / 0.15) ** 2 < 1)
    return np.repeat(img[None].astype(np.float32), slices, axis=0)


def read(noisy: np.ndarray) -> float:
    return float(noise_map(torch.from_numpy(noisy)).sigma.median())


def test_uniform_rician() -> None:
    noisy = add_coil_noise(phantom(), SIGMA, 1, np.random.default_rng(0))
    assert read(noisy) == pytest.approx(SIGMA, rel=0.12)


def test_vendor_zeroed_background_reads_the_noise_not_zero() -> None:
    clean = phantom()
    noisy = add_coil_noise(clean, SIGMA, 1, np.random.default_rng(1))
    zeroed = np.where(clean > 0, noisy, 0.0).astype(np.float32)
    old = float(np.median([estimate_sigma(s) for s in zeroed]))
    assert old < 0.2 * SIGMA  # the Haar MAD over the slice reads the zeros
    assert read(zeroed) == pytest.approx(SIGMA, rel=0.12)


@pytest.mark.parametrize("coils", [4, 8, 32])
def test_sum_of_squares_of_many_coils(coils: int) -> None:
    """Noncentral chi: the background floor is high but its spread is below sigma; the map
    reads within 30 % (tissue tiles are trusted; the rest is the floor's 0.71 sigma)."""
    noisy = add_coil_noise(phantom(), SIGMA, coils, np.random.default_rng(coils))
    assert 0.7 * SIGMA <= read(noisy) <= 1.15 * SIGMA


def test_correlated_noise_of_zero_filled_kspace() -> None:
    clean = phantom()
    rng = np.random.default_rng(3)
    size = clean.shape[-1]
    noise = rng.normal(size=clean.shape) + 1j * rng.normal(size=clean.shape)
    k = np.fft.fftshift(np.fft.fft2(noise), axes=(-2, -1))
    keep = np.zeros((size, size))
    keep[size // 4 : 3 * size // 4, size // 4 : 3 * size // 4] = 1  # 2x zero-filling
    band = np.fft.ifft2(np.fft.ifftshift(k * keep, axes=(-2, -1)))
    band = band / band.real.std() * SIGMA
    noisy = np.abs(clean + band).astype(np.float32)
    old = float(np.median([estimate_sigma(s) for s in noisy]))
    assert old < 0.6 * SIGMA
    result = noise_map(torch.from_numpy(noisy))
    assert float(result.correlation_gain.min()) > 1.5
    assert float(result.sigma.median()) == pytest.approx(SIGMA, rel=0.2)


def test_gfactor_map_is_followed_across_the_slice() -> None:
    clean = phantom()
    g = gfactor_field(clean.shape[1:], 0.5, 2.0)
    noisy = add_coil_noise(clean, SIGMA * g[None], 1, np.random.default_rng(4))
    smap = noise_map(torch.from_numpy(noisy)).sigma_map.numpy()
    tissue = clean[0] > 0.2
    centre = tissue & (g > 1.8)
    rim = tissue & (g < 0.9)
    ratio_centre = float(np.median(smap[:, centre])) / float(np.median(SIGMA * g[centre]))
    ratio_rim = float(np.median(smap[:, rim])) / float(np.median(SIGMA * g[rim]))
    # The map resolves 32-pixel tiles: this field falls 4x across 70 pixels, so the map
    # follows it at about half its contrast (one figure per slice would have none).
    assert 0.7 < ratio_centre < 1.25 and 0.75 < ratio_rim < 1.45
    assert np.median(smap[:, centre]) > 1.2 * np.median(smap[:, rim])


def test_flat_or_empty_slices_are_flagged_not_read_as_zero_noise() -> None:
    result = noise_map(torch.zeros(2, 64, 64))
    assert not bool(result.measurable.any())
    assert float(result.sigma.abs().max()) == 0.0


def test_small_slices_still_get_a_map() -> None:
    noisy = add_coil_noise(phantom(2, 40), SIGMA, 1, np.random.default_rng(5))
    result = noise_map(torch.from_numpy(noisy))
    assert result.sigma_map.shape == (2, 40, 40)
    assert bool(result.measurable.all())
