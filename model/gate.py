"""The safety gate: check a denoised volume against its input, without a reference.

A good result removes noise and nothing else, so the residual (input - output) should look
like noise: a mean near zero in tissue, a spread near the estimated noise sigma, no correlation
with the image's edges or gradients (which blurring or a shift would leave), and tissue means
kept. A failing series is not sent; the reason names the figure and its threshold.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
from scipy.ndimage import gaussian_filter

from .noise import estimate_sigma, robust_scale

logger = logging.getLogger(__name__)

MAX_SLICES = 32


class GateThresholds(Protocol):
    """What the gate reads from ``config.settings.GateSettings``."""

    enabled: bool
    max_residual_mean_ratio: float
    min_residual_std_ratio: float
    max_residual_std_ratio: float
    max_edge_correlation: float
    max_tissue_mean_change: float


@dataclass(frozen=True)
class GateResult:
    passed: bool
    reason: str
    figures: dict[str, float] = field(default_factory=dict)


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    a = a - a.mean()
    b = b - b.mean()
    den = float(np.sqrt((a * a).sum() * (b * b).sum()))
    return float((a * b).sum() / den) if den > 0 else 0.0


def measure(noisy: np.ndarray, denoised: np.ndarray) -> dict[str, float]:
    """The gate's figures (see the module docstring)."""
    x = np.atleast_3d(np.asarray(noisy, dtype=np.float32).T).T
    y = np.atleast_3d(np.asarray(denoised, dtype=np.float32).T).T
    if x.shape[0] > MAX_SLICES:
        idx = np.linspace(0, x.shape[0] - 1, MAX_SLICES).round().astype(int)
        x, y = x[idx], y[idx]
    scale = robust_scale(x)
    sigma = float(np.median([estimate_sigma(s) for s in x]))
    sigma_ref = max(sigma, 0.002 * scale)
    r = x - y
    smooth = np.stack([gaussian_filter(s, 1.0) for s in y])
    tissue = smooth > 0.15 * scale
    if tissue.sum() < 64:
        tissue = np.ones_like(tissue)
    rt = r[tissue]
    hp = y - np.stack([gaussian_filter(s, 1.5) for s in y])
    gy = np.gradient(y, axis=1)
    gx = np.gradient(y, axis=2)
    edge = max(abs(_corr(rt, hp[tissue])), abs(_corr(rt, gx[tissue])), abs(_corr(rt, gy[tissue])))
    mean_in = float(x[tissue].mean())
    return {
        "sigma_estimate": sigma,
        "scale": scale,
        "residual_mean_ratio": abs(float(rt.mean())) / sigma_ref,
        "residual_std_ratio": float(rt.std()) / sigma_ref,
        "edge_correlation": edge,
        "tissue_mean_change": abs(float(y[tissue].mean()) - mean_in) / max(abs(mean_in), 1e-12),
        "tissue_fraction": float(tissue.mean()),
    }


def check_result(noisy: np.ndarray, denoised: np.ndarray, settings: GateThresholds) -> GateResult:
    """Pass or fail a denoised volume; ``reason`` says which figure broke which threshold."""
    noisy_a, den_a = np.asarray(noisy), np.asarray(denoised)
    if noisy_a.shape != den_a.shape:
        return GateResult(False, f"shape changed: input {noisy_a.shape}, output {den_a.shape}", {})
    if not np.isfinite(den_a).all():
        return GateResult(False, "the output holds NaN or infinite values", {})
    figures = measure(noisy_a, den_a)
    if not settings.enabled:
        return GateResult(True, "gate disabled", figures)
    checks = [
        ("residual_mean_ratio", figures["residual_mean_ratio"] <= settings.max_residual_mean_ratio,
         f"residual mean is {figures['residual_mean_ratio']:.2f} sigma in tissue (max {settings.max_residual_mean_ratio}): intensities shifted"),
        ("residual_std_ratio", figures["residual_std_ratio"] >= settings.min_residual_std_ratio,
         f"residual spread is {figures['residual_std_ratio']:.2f} sigma (min {settings.min_residual_std_ratio}): the model removed almost nothing"),
        ("residual_std_ratio", figures["residual_std_ratio"] <= settings.max_residual_std_ratio,
         f"residual spread is {figures['residual_std_ratio']:.2f} sigma (max {settings.max_residual_std_ratio}): the model removed more than noise"),
        ("edge_correlation", figures["edge_correlation"] <= settings.max_edge_correlation,
         f"residual correlates with image edges ({figures['edge_correlation']:.2f}, max {settings.max_edge_correlation}): structure was removed or moved"),
        ("tissue_mean_change", figures["tissue_mean_change"] <= settings.max_tissue_mean_change,
         f"tissue mean changed by {100 * figures['tissue_mean_change']:.1f} % (max {100 * settings.max_tissue_mean_change:.1f} %)"),
    ]
    failed = [msg for _, ok, msg in checks if not ok]
    if failed:
        return GateResult(False, "; ".join(failed), figures)
    return GateResult(True, "residual looks like noise", figures)
