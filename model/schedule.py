"""The noise schedule: how a noise level becomes the U-Net's timestep and back.

The diffusion U-Net's timestep input normally says how much noise a diffusion step added;
here it says how much noise the scan has. The noise sigma, relative to the image's intensity
scale (see ``noise.robust_scale``), is mapped log-linearly onto [0, num_steps - 1]:

    t = (num_steps - 1) * (ln sigma - ln sigma_min) / (ln sigma_max - ln sigma_min), clipped,

a continuous (float) timestep that the sinusoidal embedding takes as is. A log scale gives
low noise levels (1-3 %) as much room in the embedding as high ones.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from denoised_node.model.hyperparameters import HYPERPARAMETERS


@dataclass(frozen=True)
class NoiseSchedule:
    sigma_min: float = HYPERPARAMETERS.sigma_min
    sigma_max: float = HYPERPARAMETERS.sigma_max
    num_steps: int = HYPERPARAMETERS.num_steps
    kind: str = "log"

    def __post_init__(self) -> None:
        if self.kind != "log":
            raise ValueError(f"unknown noise schedule kind {self.kind!r}")
        if not 0 < self.sigma_min < self.sigma_max:
            raise ValueError("the noise schedule needs 0 < sigma_min < sigma_max")

    def timestep(self, sigma: float | np.ndarray) -> np.ndarray:
        s = np.maximum(np.asarray(sigma, dtype=np.float64), 1e-12)
        frac = (np.log(s) - math.log(self.sigma_min)) / (
            math.log(self.sigma_max) - math.log(self.sigma_min)
        )
        return (np.clip(frac, 0.0, 1.0) * (self.num_steps - 1)).astype(np.float32)

    def timestep_torch(self, sigma: torch.Tensor) -> torch.Tensor:
        """``timestep`` on a tensor, on its device (no host round trip in training)."""
        s = sigma.float().clamp_min(1e-12)
        frac = (torch.log(s) - math.log(self.sigma_min)) / (
            math.log(self.sigma_max) - math.log(self.sigma_min)
        )
        return frac.clamp(0.0, 1.0) * (self.num_steps - 1)

    def sigma(self, timestep: float | np.ndarray) -> np.ndarray:
        frac = np.asarray(timestep, dtype=np.float64) / (self.num_steps - 1)
        return np.exp(
            math.log(self.sigma_min) + frac * (math.log(self.sigma_max) - math.log(self.sigma_min))
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> NoiseSchedule:
        return cls(**d)
