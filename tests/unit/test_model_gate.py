"""The safety gate passes a real denoise and fails blurred, shifted or scaled results."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.ndimage import gaussian_filter, shift

from denoised_node.config.settings import GateSettings
from denoised_node.model.card import CHECKPOINT_DIR
from denoised_node.model.gate import check_result
from denoised_node.model.inference import Denoiser
from denoised_node.model.noise import add_rician
from denoised_node.model.training.data import load_mni_t1


@pytest.fixture(scope="module")
def case() -> tuple[np.ndarray, np.ndarray]:
    clean = (
        load_mni_t1()[100:103, 10:218, 0:192] * 800.0
    )  # slices above the slab, physical-ish units
    noisy = add_rician(clean, 0.05 * 800.0, np.random.default_rng(0))
    return clean, noisy


def test_passes_when_the_residual_is_the_noise(case: tuple[np.ndarray, np.ndarray]) -> None:
    clean, noisy = case
    res = check_result(noisy, clean, GateSettings())
    assert res.passed, res.reason
    assert 0.6 < res.figures["residual_std_ratio"] < 1.6


@pytest.mark.skipif(
    not (CHECKPOINT_DIR / "default.safetensors").exists(), reason="no shipped checkpoint"
)
def test_passes_a_real_denoise(case: tuple[np.ndarray, np.ndarray]) -> None:
    _, noisy = case
    den = Denoiser.load("default", device="cpu")
    res = check_result(noisy, den.denoise(noisy), GateSettings())
    assert res.passed, res.reason


def test_fails_a_blurred_result(case: tuple[np.ndarray, np.ndarray]) -> None:
    clean, noisy = case
    blurred = np.stack([gaussian_filter(s, 2.5) for s in clean])
    res = check_result(noisy, blurred, GateSettings())
    assert not res.passed and "edge_correlation" in res.reason


def test_fails_a_shifted_result(case: tuple[np.ndarray, np.ndarray]) -> None:
    clean, noisy = case
    moved = np.stack([shift(s, (0, 2), order=1) for s in clean])
    res = check_result(noisy, moved, GateSettings())
    assert not res.passed


def test_fails_an_intensity_change_and_a_shape_change(case: tuple[np.ndarray, np.ndarray]) -> None:
    clean, noisy = case
    res = check_result(noisy, clean * 1.2, GateSettings())
    assert not res.passed and "tissue_mean_change" in res.reason
    assert not check_result(noisy, clean[:2], GateSettings()).passed


def test_fails_when_nothing_was_removed(case: tuple[np.ndarray, np.ndarray]) -> None:
    _, noisy = case
    res = check_result(noisy, noisy.copy(), GateSettings())
    assert not res.passed and "nothing removed" in res.reason
    assert "output_noise_ratio" in res.reason


def test_disabled_gate_passes_but_measures(case: tuple[np.ndarray, np.ndarray]) -> None:
    clean, noisy = case
    res = check_result(noisy, clean * 1.2, GateSettings(enabled=False))
    assert res.passed and res.figures["tissue_mean_change"] > 0.1


def test_fails_erased_small_structures(case: tuple[np.ndarray, np.ndarray]) -> None:
    """Small bright lesions in the input that the output lacks leave blobs in the residual
    (caught where the noise is low; at 5 % and above they hide in it, docs/model.md)."""
    clean, _ = case
    noisy = add_rician(clean, 0.02 * 800.0, np.random.default_rng(7))
    yy, xx = np.mgrid[: clean.shape[1], : clean.shape[2]]
    rng = np.random.default_rng(1)
    lesions = sum(
        np.exp(-((yy - rng.integers(60, 160)) ** 2 + (xx - rng.integers(50, 140)) ** 2) / 2.9)
        for _ in range(12)
    )
    res = check_result(noisy + 0.25 * 800.0 * lesions[None], clean, GateSettings())
    assert not res.passed and "blob_fraction" in res.reason


def test_fails_added_texture(case: tuple[np.ndarray, np.ndarray]) -> None:
    clean, noisy = case
    textured = clean + np.random.default_rng(2).normal(0, 0.05 * 800.0, clean.shape)
    res = check_result(noisy, textured.astype(np.float32), GateSettings())
    assert not res.passed and "output_noise_ratio" in res.reason


def test_fails_a_regional_darkening_at_low_noise() -> None:
    clean = load_mni_t1()[100:103, 10:218, 0:192] * 800.0
    noisy = add_rician(clean, 0.02 * 800.0, np.random.default_rng(3))
    yy, xx = np.mgrid[: clean.shape[1], : clean.shape[2]]
    region = np.exp(-((yy - 100) ** 2 + (xx - 90) ** 2) / (2 * 25.0**2))
    res = check_result(noisy, clean * (1 - 0.04 * region[None]), GateSettings())
    assert not res.passed and "local_shift_ratio" in res.reason


def test_zeroed_background_is_judged_on_its_noise(case: tuple[np.ndarray, np.ndarray]) -> None:
    """A vendor-zeroed background no longer reads sigma 0 (which failed every such series)."""
    clean, noisy = case
    zeroed = np.where(clean > 0, noisy, 0.0).astype(np.float32)
    res = check_result(zeroed, np.where(clean > 0, clean, 0.0), GateSettings())
    assert res.passed, res.reason
    assert res.figures["sigma_estimate"] == pytest.approx(0.05 * 800.0, rel=0.15)


def test_fails_when_the_noise_cannot_be_read() -> None:
    flat = np.full((3, 64, 64), 100.0, dtype=np.float32)
    res = check_result(flat, flat * 0.99, GateSettings())
    assert not res.passed and "noise_measurable" in res.reason
