"""The classical baselines the evaluation compares the network with: NLM and BM4D. One home
for both, used by evaluate.py (the T1/T2 slab) and families.py (the held-out families)."""

from __future__ import annotations

import numpy as np


def nlm_denoise(noisy: np.ndarray, sigma: float, h_factor: float) -> np.ndarray:
    """Non-local means slice by slice (scikit-image), h a multiple of the noise sigma."""
    from skimage.restoration import denoise_nl_means

    return np.stack(
        [
            denoise_nl_means(
                s, h=h_factor * sigma, sigma=sigma, patch_size=5, patch_distance=6, fast_mode=True
            )
            for s in noisy
        ]
    ).astype(np.float32)


def bm4d_denoise(noisy: np.ndarray, sigma: float) -> np.ndarray:
    """BM4D on the whole volume (the bm4d package of the train extra)."""
    import bm4d

    return np.asarray(bm4d.bm4d(noisy, sigma), dtype=np.float32)
