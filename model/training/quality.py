"""Image quality figures: PSNR and SSIM (whole image and inside a mask) and HFEN (the node's
own counters are daemon/web/metrics.py)."""

from __future__ import annotations

import numpy as np


def psnr(
    clean: np.ndarray, test: np.ndarray, data_range: float, mask: np.ndarray | None = None
) -> float:
    err = (np.asarray(test, np.float64) - np.asarray(clean, np.float64)) ** 2
    mse = float(err[mask].mean() if mask is not None else err.mean())
    return float("inf") if mse == 0 else 10.0 * np.log10(data_range**2 / mse)


def ssim(
    clean: np.ndarray, test: np.ndarray, data_range: float, mask: np.ndarray | None = None
) -> float:
    """Mean 2D SSIM over slices (the map averaged inside the mask when one is given)."""
    from skimage.metrics import structural_similarity

    c3, t3 = np.atleast_3d(clean.T).T, np.atleast_3d(test.T).T
    m3 = None if mask is None else np.atleast_3d(mask.T).T
    vals = []
    for i in range(c3.shape[0]):
        _, smap = structural_similarity(c3[i], t3[i], data_range=data_range, full=True)
        if m3 is None:
            vals.append(float(smap.mean()))
        elif m3[i].any():
            vals.append(float(smap[m3[i]].mean()))
    return float(np.mean(vals)) if vals else float("nan")


def hfen(clean: np.ndarray, test: np.ndarray, sigma: float = 1.5) -> float:
    """High-frequency error norm: ||LoG(test) - LoG(clean)|| / ||LoG(clean)|| per 2D slice."""
    from scipy.ndimage import gaussian_laplace

    c3, t3 = np.atleast_3d(clean.T).T, np.atleast_3d(test.T).T
    num = den = 0.0
    for i in range(c3.shape[0]):
        lc = gaussian_laplace(c3[i].astype(np.float64), sigma)
        lt = gaussian_laplace(t3[i].astype(np.float64), sigma)
        num += float(((lt - lc) ** 2).sum())
        den += float((lc**2).sum())
    return float(np.sqrt(num / den)) if den > 0 else float("nan")
