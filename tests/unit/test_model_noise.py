"""model/noise.py and model/schedule.py: the sigma estimate, Rician noise, the noise level <->
timestep schedule, the robust scale."""

from __future__ import annotations

import numpy as np
import pytest

from denoised_node.model.noise import add_rician, estimate_sigma, robust_scale
from denoised_node.model.schedule import NoiseSchedule


def test_sigma_estimate_on_white_noise() -> None:
    rng = np.random.default_rng(1)
    img = rng.normal(5.0, 0.2, (256, 256)).astype(np.float32)
    assert estimate_sigma(img) == pytest.approx(0.2, rel=0.05)


def test_rician_noise_is_magnitude() -> None:
    rng = np.random.default_rng(2)
    out = add_rician(np.zeros((64, 64), np.float32), 1.0, rng)
    assert out.min() >= 0
    assert out.mean() == pytest.approx(np.sqrt(np.pi / 2), rel=0.05)  # Rayleigh mean


def test_schedule_is_monotone_and_invertible() -> None:
    s = NoiseSchedule()
    sig = np.array([0.005, 0.01, 0.03, 0.09, 0.15])
    t = s.timestep(sig)
    assert np.all(np.diff(t) > 0) and t.min() >= 0 and t.max() <= 999
    np.testing.assert_allclose(s.sigma(t), sig, rtol=1e-4)
    assert s.timestep(1e-9) == 0 and s.timestep(10.0) == 999


def test_robust_scale_ignores_hot_pixels() -> None:
    vol = np.ones((4, 32, 32), np.float32)
    vol[0, 0, 0] = 1e6
    assert robust_scale(vol) == pytest.approx(1.0)
