"""Validation during training: fixed noisy volumes from the validation slices (in the gap
beside the test slab, never trained on, never tested on), run through the inference path.

The cases cover what the training data randomises, so the best checkpoint is chosen on more
than one contrast and noise kind: Rician noise on the T1 template at several levels, and at 5 %
a T2-like contrast, a vendor-zeroed background, 8-coil sum-of-squares noise and a g-factor map.
"""

from __future__ import annotations

import numpy as np
import torch

from .data import Split, foreground_mask
from .inference import denoise_volume
from .quality import psnr, ssim
from .noise import add_coil_noise, add_rician, gfactor_field
from .schedule import NoiseSchedule


class Validator:
    """Fixed noisy validation volumes (slices in the gap, never trained on), fixed seeds."""

    def __init__(
        self,
        vol: np.ndarray,
        split: Split,
        levels: tuple[float, ...],
        in_slices: int,
        seed: int,
        noisy: np.ndarray | None = None,
        t2_like: np.ndarray | None = None,
        families: bool = False,
    ) -> None:
        """Simulated noise at ``levels``, or the real ``noisy`` volume of a pair; with
        ``families``, the 5 % cases of other contrasts and noise kinds too."""
        a, b = split.validation
        half = in_slices // 2
        lo, hi = max(0, a - half), min(vol.shape[0], b + half)
        self.clean = vol[lo:hi]
        self.inner = slice(a - lo, b - lo)
        rng = np.random.default_rng(seed)
        peak = float(vol.max())
        self.cases: list[tuple[str, np.ndarray, np.ndarray]] = []
        if noisy is not None:
            self.cases.append(("paired", noisy[lo:hi], self.clean))
        else:
            for lvl in levels:
                self.cases.append((f"{round(lvl * 100)}%", add_rician(self.clean, lvl * peak, rng), self.clean))
        if families and noisy is None:
            s = 0.05 * peak
            zeroed = np.where(self.clean > 0.02 * peak, add_rician(self.clean, s, rng), 0.0)
            self.cases.append(("zeroed-5%", zeroed.astype(np.float32), np.where(zeroed > 0, self.clean, 0.0).astype(np.float32)))
            self.cases.append(("chi8-5%", add_coil_noise(self.clean, s, 8, rng), self.clean))
            g = gfactor_field(self.clean.shape[1:])[None]
            self.cases.append(("gfactor-5%", add_coil_noise(self.clean, s * g, 1, rng), self.clean))
            if t2_like is not None:
                t2 = t2_like[lo:hi]
                self.cases.append(("t2like-5%", add_rician(t2, 0.05 * float(t2_like.max()), rng), t2))
        self.range = peak

    def run(self, net: torch.nn.Module, schedule: NoiseSchedule, device: torch.device) -> dict[str, float]:
        out: dict[str, float] = {}
        for key, noisy, clean in self.cases:
            c = clean[self.inner]
            mask = foreground_mask(clean)[self.inner]
            den = denoise_volume(net, noisy, schedule, device=device, batch_size=8)[self.inner]  # type: ignore[arg-type]
            out[f"psnr_mask_{key}"] = round(psnr(c, den, self.range, mask), 3)
            out[f"ssim_mask_{key}"] = round(ssim(c, den, self.range, mask), 4)
        out["psnr_mask_mean"] = round(float(np.mean([v for k, v in out.items() if k.startswith("psnr")])), 3)
        return out
