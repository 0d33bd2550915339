"""The safety gate passes a real denoise and fails blurred, shifted or scaled results."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.ndimage import gaussian_filter, shift

from denoised_node.config.settings import GateSettings
from denoised_node.model.data import load_mni_t1
from denoised_node.model.gate import check_result
from denoised_node.model.inference import CHECKPOINT_DIR, Denoiser
from denoised_node.model.noise import add_rician


@pytest.fixture(scope="module")
def case() -> tuple[np.ndarray, np.ndarray]:
    clean = load_mni_t1()[100:103, 10:218, 0:192] * 800.0  # central slices, physical-ish units
    noisy = add_rician(clean, 0.05 * 800.0, np.random.default_rng(0))
    return clean, noisy


def test_passes_when_the_residual_is_the_noise(case: tuple[np.ndarray, np.ndarray]) -> None:
    clean, noisy = case
    res = check_result(noisy, clean, GateSettings())
    assert res.passed, res.reason
    assert 0.6 < res.figures["residual_std_ratio"] < 1.6


@pytest.mark.skipif(not (CHECKPOINT_DIR / "default.safetensors").exists(), reason="no shipped checkpoint")
def test_passes_a_real_denoise(case: tuple[np.ndarray, np.ndarray]) -> None:
    _, noisy = case
    den = Denoiser.load("default", device="cpu")
    res = check_result(noisy, den.denoise(noisy), GateSettings())
    assert res.passed, res.reason


def test_fails_a_blurred_result(case: tuple[np.ndarray, np.ndarray]) -> None:
    clean, noisy = case
    blurred = np.stack([gaussian_filter(s, 2.5) for s in clean])
    res = check_result(noisy, blurred, GateSettings())
    assert not res.passed and "edges" in res.reason


def test_fails_a_shifted_result(case: tuple[np.ndarray, np.ndarray]) -> None:
    clean, noisy = case
    moved = np.stack([shift(s, (0, 2), order=1) for s in clean])
    res = check_result(noisy, moved, GateSettings())
    assert not res.passed


def test_fails_an_intensity_change_and_a_shape_change(case: tuple[np.ndarray, np.ndarray]) -> None:
    clean, noisy = case
    res = check_result(noisy, clean * 1.2, GateSettings())
    assert not res.passed and "tissue mean" in res.reason
    assert not check_result(noisy, clean[:2], GateSettings()).passed


def test_fails_when_nothing_was_removed(case: tuple[np.ndarray, np.ndarray]) -> None:
    _, noisy = case
    res = check_result(noisy, noisy.copy(), GateSettings())
    assert not res.passed and "removed almost nothing" in res.reason


def test_disabled_gate_passes_but_measures(case: tuple[np.ndarray, np.ndarray]) -> None:
    clean, noisy = case
    res = check_result(noisy, clean * 1.2, GateSettings(enabled=False))
    assert res.passed and res.figures["tissue_mean_change"] > 0.1
