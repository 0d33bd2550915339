"""The safety gate: check a denoised volume against its input, without a reference.

A good result removes noise and nothing else, so the residual (input - output) should look
like noise, at every scale:

- **noise level fits**: the noise could be read at all (a flat or empty stack cannot be judged),
  and the residual's spread is near the estimated noise sigma (too little: nothing removed;
  too much: more than noise removed);
- **no intensity shift**: a mean near zero in tissue, the tissue mean kept, and no region
  darkened or brightened (the residual smoothed over ~10 pixels stays small);
- **no structure**: no correlation with the image's fine edges and gradients (blurring, shifts);
- **no texture added**: the noise level read in the output is well under the input's;
- **no lost small structures**: no compact blobs in the residual far outside its own spread
  (a small lesion or vessel erased leaves one).

Each figure and its threshold is one row of ``CHECKS``; ``check_result`` and the status page
read the same rows. A failing series is not sent; the reason names the figure and threshold.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
from scipy.ndimage import gaussian_filter

from denoised_node.model.noise import robust_scale
from denoised_node.model.noise_map import noise_map_numpy

logger = logging.getLogger(__name__)

MAX_SLICES = 32
# |Gaussian(residual, 1 px)| beyond this many robust standard deviations counts as a blob.
BLOB_SIGMAS = 6.0
HIGH_SNR = 6.0  # output over noise sigma where the bias-sensitive figures are read


class GateThresholds(Protocol):
    """What the gate reads from ``config.settings.GateSettings``."""

    enabled: bool
    max_residual_mean_ratio: float
    min_residual_std_ratio: float
    max_residual_std_ratio: float
    max_edge_correlation: float
    max_output_noise_ratio: float
    max_tissue_mean_change: float
    max_local_shift_ratio: float
    max_blob_fraction: float


@dataclass(frozen=True)
class GateResult:
    passed: bool
    reason: str
    figures: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Check:
    """One row of the gate: a figure, what it means, its bound, and the message when broken."""

    figure: str
    meaning: str
    bound: Callable[[GateThresholds], tuple[float | None, float | None]]  # (min, max)
    problem: str

    def limits(self, settings: GateThresholds) -> tuple[float | None, float | None]:
        return self.bound(settings)

    def passes(self, value: float, settings: GateThresholds) -> bool:
        lo, hi = self.bound(settings)
        return (lo is None or value >= lo) and (hi is None or value <= hi)

    def bound_text(self, settings: GateThresholds) -> str:
        lo, hi = self.bound(settings)
        if lo is not None and hi is not None:
            return f"{lo:g} to {hi:g}"
        return f"≥ {lo:g}" if lo is not None else f"≤ {hi:g}"


CHECKS: tuple[Check, ...] = (
    Check("noise_measurable", "share of slices whose noise could be read",
          lambda s: (0.5, None), "the noise level could not be read (flat or empty images)"),
    Check("residual_mean_ratio", "|mean residual| in tissue / noise sigma",
          lambda s: (None, s.max_residual_mean_ratio), "intensities shifted"),
    Check("residual_std_ratio", "residual spread / noise sigma",
          lambda s: (s.min_residual_std_ratio, s.max_residual_std_ratio),
          "the residual does not fit the noise level (too low: nothing removed; too high: more "
          "than noise)"),
    Check("edge_correlation", "residual correlation with the image's fine edges",
          lambda s: (None, s.max_edge_correlation), "structure was removed or moved"),
    Check("output_noise_ratio", "noise level read in the output / in the input",
          lambda s: (None, s.max_output_noise_ratio), "the output holds noise-like texture"),
    Check("tissue_mean_change", "relative change of the tissue mean",
          lambda s: (None, s.max_tissue_mean_change), "the tissue mean changed"),
    Check("local_shift_ratio", "largest regional residual mean / noise sigma",
          lambda s: (None, s.max_local_shift_ratio), "a region was darkened or brightened"),
    Check("blob_fraction", "share of tissue with compact blobs in the residual",
          lambda s: (None, s.max_blob_fraction), "small structures were removed"),
)


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    a = a - a.mean()
    b = b - b.mean()
    den = float(np.sqrt((a * a).sum() * (b * b).sum()))
    return float((a * b).sum() / den) if den > 0 else 0.0


def _per_slice(fn: Callable[[np.ndarray], np.ndarray], vol: np.ndarray) -> np.ndarray:
    return np.stack([fn(s) for s in vol])


def measure(noisy: np.ndarray, denoised: np.ndarray) -> dict[str, float]:
    """The gate's figures (see the module docstring)."""
    x = np.atleast_3d(np.asarray(noisy, dtype=np.float32).T).T
    y = np.atleast_3d(np.asarray(denoised, dtype=np.float32).T).T
    if x.shape[0] > MAX_SLICES:
        idx = np.linspace(0, x.shape[0] - 1, MAX_SLICES).round().astype(int)
        x, y = x[idx], y[idx]
    scale = robust_scale(x)
    _, sigmas, measurable = noise_map_numpy(x / scale)
    sigma = float(np.median(sigmas[measurable])) * scale if measurable.any() else 0.0
    sigma_ref = max(sigma, 0.002 * scale)
    r = x - y
    smooth = _per_slice(lambda s: gaussian_filter(s, 1.0), y)
    tissue = smooth > 0.15 * scale
    if tissue.sum() < 64:
        tissue = np.ones_like(tissue)
    rt = r[tissue]
    hp = y - _per_slice(lambda s: gaussian_filter(s, 1.5), y)
    gy = np.gradient(y, axis=1)
    gx = np.gradient(y, axis=2)
    edge = max(abs(_corr(rt, hp[tissue])), abs(_corr(rt, gx[tissue])), abs(_corr(rt, gy[tissue])))
    # The scale-sensitive figures are read where the signal is well above the noise: below,
    # the magnitude's own bias (which a good denoiser removes) follows the anatomy.
    bright = tissue & (smooth > HIGH_SNR * sigma_ref)
    if bright.sum() < 0.05 * tissue.sum():
        bright = tissue
    # Noise left in (or added to) the output, read the way the input's was.
    _, out_sigmas, out_measurable = noise_map_numpy(y / scale)
    out_sigma = (float(np.median(out_sigmas[out_measurable])) * scale
                 if out_measurable.any() else 0.0)
    regional = _per_slice(lambda s: gaussian_filter(s, 5.0), r)
    local_shift = float(np.percentile(np.abs(regional[bright]), 99)) / sigma_ref
    # Blobs are looked for where the output is smooth: an erased lesion leaves the output
    # flat there, while a sharp edge leaves a thin line of residual that is not a lost structure.
    grad = np.hypot(np.gradient(smooth, axis=1), np.gradient(smooth, axis=2))
    flat = bright & (grad < 0.5 * sigma_ref)
    if flat.sum() < 0.05 * bright.sum():
        flat = bright
    fine = _per_slice(lambda s: gaussian_filter(s, 1.0), r)[flat]
    spread = 1.4826 * float(np.median(np.abs(fine - np.median(fine))))
    blobs = float((np.abs(fine) > BLOB_SIGMAS * spread).mean()) if spread > 0 else 0.0
    mean_in = float(x[tissue].mean())
    return {
        "sigma_estimate": sigma,
        "scale": scale,
        "noise_measurable": float(measurable.mean()),
        "residual_mean_ratio": abs(float(rt.mean())) / sigma_ref,
        "residual_std_ratio": float(rt.std()) / sigma_ref,
        "edge_correlation": edge,
        "output_noise_ratio": out_sigma / sigma_ref,
        "tissue_mean_change": abs(float(y[tissue].mean()) - mean_in) / max(abs(mean_in), 1e-12),
        "local_shift_ratio": local_shift,
        "blob_fraction": blobs,
        "tissue_fraction": float(tissue.mean()),
    }


def _message(check: Check, value: float, settings: GateThresholds) -> str:
    return f"{check.figure} is {value:.3g} ({check.bound_text(settings)}): {check.problem}"


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
    failed = [_message(c, figures[c.figure], settings) for c in CHECKS
              if not c.passes(figures[c.figure], settings)]
    if failed:
        return GateResult(False, "; ".join(failed), figures)
    return GateResult(True, "residual looks like noise", figures)
