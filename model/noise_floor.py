"""Is there noise for this model to remove? The series' noise reading against the model's floor.

Below some noise level a denoiser makes images worse: it changes structure more than it takes
out noise (2.0 loses 1-25 dB on inputs with under 0.5-1 % noise). Each model's floor is
measured on validation (``noise_floor_study``) and stored in its card's intended use as
``noise_floor_percent``: the reading below which the node leaves a stack alone. The reading is
the noise map's median over a stack's slices as a percentage of the stack's bright level
(``noise.robust_scale``), the same normalisation inference uses; the floor is measured with
this very function, so the figure and the decision cannot drift apart.

The reading over-reads fine structure as noise (3 % on a noise-free macaque template), so a
floor cannot catch every clean series; what it catches is a series the model is known to
harm.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

# torch-free at import: the node's pipeline imports this module before any model is loaded.
FLOOR_KEY = "noise_floor_percent"  # in the card's intended_use
READ_SLICES = 16  # slices read, evenly spaced: the reading is a median, 16 are plenty


def noise_reading_percent(volume: np.ndarray) -> float | None:
    """The stack's noise as a percentage of its bright level: the median over the slices that
    read any noise; 0 where none does (a noise-free image: smooth, or zeroed blocks and flat
    ones only); None for slices too small for the map (under 32 pixels a side)."""
    import torch

    from denoised_node.model.noise import robust_scale
    from denoised_node.model.noise_map import noise_map

    vol = np.asarray(volume, dtype=np.float32)
    if vol.ndim == 2:
        vol = vol[None]
    scale = robust_scale(vol)
    picks = np.unique(
        np.linspace(0, vol.shape[0] - 1, min(READ_SLICES, vol.shape[0])).round().astype(int)
    )
    slices = np.ascontiguousarray(vol[picks] / np.float32(scale))
    # The map needs at least one tile; smaller images are not read.
    if min(slices.shape[1:]) < 32:
        return None
    sigma = noise_map(torch.from_numpy(slices)).sigma.numpy()
    read = sigma[sigma > 0]
    return float(np.median(read)) * 100.0 if read.size else 0.0


def under_noise_floor(volume: np.ndarray, intended_use: Mapping[str, Any]) -> str | None:
    """Why the model should leave this stack alone (its noise is under the model's floor), or
    None: no floor in the card, the reading unmeasurable, or enough noise."""
    floor = intended_use.get(FLOOR_KEY)
    if floor is None:
        return None
    reading = noise_reading_percent(volume)
    if reading is None or reading >= float(floor):
        return None
    return (
        f"noise reads {reading:.2f} % of the bright level, under the {float(floor):g} % below "
        "which "
        f"this model makes images worse (its card's {FLOOR_KEY})"
    )
