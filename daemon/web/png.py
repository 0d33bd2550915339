"""Slices to PNG: grayscale, windowed, small images enlarged by whole pixels (no smoothing,
so what the page shows is what the pixels hold)."""

from __future__ import annotations

import io
import math

import numpy as np
from PIL import Image

MIN_SIDE = 256  # pixels on screen for the longer side of a small matrix


def window(image: np.ndarray) -> tuple[float, float]:
    """A display window from the image's own values (0.5th to 99.5th percentile)."""
    finite = image[np.isfinite(image)]
    if finite.size == 0:
        return 0.0, 1.0
    low, high = (float(v) for v in np.percentile(finite, [0.5, 99.5]))
    return (low, high) if high > low else (low, low + 1.0)


def residual_spread(residual: np.ndarray) -> float:
    """Half the width of a window centred on zero that holds 99.5 % of the residual."""
    finite = np.abs(residual[np.isfinite(residual)])
    spread = float(np.percentile(finite, 99.5)) if finite.size else 0.0
    return spread if spread > 0 else 1.0


def to_png(image: np.ndarray, low: float, high: float) -> bytes:
    scaled = np.clip((np.nan_to_num(image, nan=low) - low) / (high - low), 0.0, 1.0)
    pixels = (scaled * 255.0 + 0.5).astype(np.uint8)
    factor = max(1, math.ceil(MIN_SIDE / max(pixels.shape)))
    if factor > 1:
        pixels = np.kron(pixels, np.ones((factor, factor), dtype=np.uint8))
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()
