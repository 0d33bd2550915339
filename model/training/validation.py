"""Validation during training: fixed noisy volumes from the validation slices (in the gap
beside the test slab, never trained on, never tested on), run through the inference path.

The cases cover what the training data randomises, so the best checkpoint is chosen on more
than one contrast and noise kind: Rician noise at several levels, and at 5 % a vendor-zeroed
background, 8-coil sum-of-squares noise and a g-factor map. ``DomainValidator`` holds one set
of cases per domain (each training volume's validation slices, the MNI T2-like contrast, dead
leaves of a seed no run trains on seen through 5 mm slices) and scores the mean of the domains'
means, so that no one domain decides the checkpoint.
"""

from __future__ import annotations

import numpy as np
import torch

from denoised_node.model.inference import denoise_volume
from denoised_node.model.noise import add_coil_noise, add_rician, gfactor_field
from denoised_node.model.schedule import NoiseSchedule
from denoised_node.model.training.data import Split, foreground_mask
from denoised_node.model.training.quality import psnr, ssim


class Validator:
    """Fixed noisy validation volumes (slices in the gap, never trained on), fixed seeds."""

    def __init__(
        self,
        vol: np.ndarray,
        rows: tuple[int, int],
        levels: tuple[float, ...],
        in_slices: int,
        seed: int,
        noisy: np.ndarray | None = None,
        t2_like: np.ndarray | None = None,
        families: bool = False,
    ) -> None:
        """Simulated noise at ``levels``, or the real ``noisy`` volume of a pair; with
        ``families``, the 5 % cases of other contrasts and noise kinds too."""
        a, b = rows
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
                self.cases.append(
                    (f"{round(lvl * 100)}%", add_rician(self.clean, lvl * peak, rng), self.clean)
                )
        if families and noisy is None:
            s = 0.05 * peak
            zeroed = np.where(self.clean > 0.02 * peak, add_rician(self.clean, s, rng), 0.0)
            self.cases.append(
                (
                    "zeroed-5%",
                    zeroed.astype(np.float32),
                    np.where(zeroed > 0, self.clean, 0.0).astype(np.float32),
                )
            )
            self.cases.append(("chi8-5%", add_coil_noise(self.clean, s, 8, rng), self.clean))
            g = gfactor_field(self.clean.shape[1:])[None]
            self.cases.append(("gfactor-5%", add_coil_noise(self.clean, s * g, 1, rng), self.clean))
            if t2_like is not None:
                t2 = t2_like[lo:hi]
                self.cases.append(
                    ("t2like-5%", add_rician(t2, 0.05 * float(t2_like.max()), rng), t2)
                )
        self.range = peak

    def run(
        self, net: torch.nn.Module, schedule: NoiseSchedule, device: torch.device
    ) -> dict[str, float]:
        out: dict[str, float] = {}
        for key, noisy, clean in self.cases:
            c = clean[self.inner]
            mask = foreground_mask(clean)[self.inner]
            den = denoise_volume(net, noisy, schedule, device=device, batch_size=8)[self.inner]  # type: ignore[arg-type]
            out[f"psnr_mask_{key}"] = round(psnr(c, den, self.range, mask), 3)
            out[f"ssim_mask_{key}"] = round(ssim(c, den, self.range, mask), 4)
        out["psnr_mask_mean"] = round(
            float(np.mean([v for k, v in out.items() if k.startswith("psnr")])), 3
        )
        return out


VALIDATION_LEAVES_SEED = 7_000_001  # no training run draws its dead leaves from this seed
# The validation noise, the same for every run and seed, so that runs compare on one set.
VALIDATION_NOISE_SEED = 20261208
LEAVES_SLICE_MM = 5


def leaves_5mm_volume(slices: int = 8, size: int = 144) -> np.ndarray:
    """Dead leaves of the validation seed as a 2-D series of 5 mm slices: each slice the mean
    of five 1 mm slices (a box slice profile), so neighbours share little with the centre."""
    from denoised_node.model.training.dead_leaves import dead_leaves_volume

    gen = torch.Generator()
    gen.manual_seed(VALIDATION_LEAVES_SEED)
    fine = dead_leaves_volume(
        gen, torch.device("cpu"), (slices * LEAVES_SLICE_MM, size, size)
    ).numpy()
    thick = fine.reshape(slices, LEAVES_SLICE_MM, size, size).mean(axis=1)
    return (thick / max(float(thick.max()), 1e-6)).astype(np.float32)


class DomainValidator:
    """One ``Validator`` per domain; the score is the mean over domains of each domain's mean
    PSNR. Keys: ``psnr_mask_<domain>:<case>``, ``psnr_mask_<domain>`` (the domain's mean) and
    ``psnr_mask_mean``; with a single domain the case keys are plain ``psnr_mask_<case>``."""

    def __init__(self, domains: dict[str, Validator]) -> None:
        if not domains:
            raise ValueError("no validation domain")
        self.domains = domains

    def run(
        self, net: torch.nn.Module, schedule: NoiseSchedule, device: torch.device
    ) -> dict[str, float]:
        if len(self.domains) == 1:
            return next(iter(self.domains.values())).run(net, schedule, device)
        out: dict[str, float] = {}
        means = []
        for name, validator in self.domains.items():
            metrics = validator.run(net, schedule, device)
            mean = metrics.pop("psnr_mask_mean")
            means.append(mean)
            for key, value in metrics.items():
                kind, case = key.split("_mask_", 1)
                out[f"{kind}_mask_{name}:{case}"] = value
            out[f"psnr_mask_{name}"] = mean
        out["psnr_mask_mean"] = round(float(np.mean(means)), 3)
        return out


def domain_validator(
    names: list[str],
    vols: list[np.ndarray],
    t2_like: np.ndarray | None,
    in_slices: int,
    seed: int,
    *,
    levels: tuple[float, ...] = (0.01, 0.05, 0.09),
    holdout: int = 24,
    gap: int = 8,
    leaves: bool = True,
    families: bool = True,
) -> DomainValidator:
    """The validation domains: each volume's validation slices (the MNI T1's also as the T2-like
    contrast), and dead leaves of the validation seed as 5 mm slices."""
    domains: dict[str, Validator] = {}
    for name, vol in zip(names, vols):
        rows = Split(vol.shape[0], holdout, gap).validation
        domains[name] = Validator(vol, rows, levels, in_slices, seed, families=families)
        if name == "mni152-t1" and t2_like is not None:
            domains["mni152-t2like"] = Validator(
                t2_like, rows, levels, in_slices, seed, families=families
            )
    if leaves:
        vol = leaves_5mm_volume()
        domains["leaves-5mm"] = Validator(
            vol, (2, vol.shape[0] - 2), levels, in_slices, seed, families=families
        )
    return DomainValidator(domains)


def validate_checkpoint(checkpoint: str, device: str = "cpu", seed: int = VALIDATION_NOISE_SEED,
                        noise_map_factors: tuple[float, ...] = ()) -> dict[str, float]:
    """A checkpoint (a path or a shipped name) scored on the default recipe's validation
    domains, exactly as a run of that recipe scores its own checkpoints (same cases and noise
    seed): what "beats 2.0 on every domain" is measured by. With ``noise_map_factors``, once
    per factor the noise map's reading is multiplied by (keys prefixed ``x<factor>/``)."""
    from denoised_node.model.card import resolve_checkpoint
    from denoised_node.model.inference import Denoiser
    from denoised_node.model.training.data import load_mni_t2_like, load_named_volume

    names = ["mni152-t1", "mni152-scalp", "inia19-macaque"]
    den = Denoiser.load(resolve_checkpoint(checkpoint), device=device)
    validator = domain_validator(names, [load_named_volume(n) for n in names], load_mni_t2_like(),
                                 den.net.in_slices, seed)
    if not noise_map_factors:
        return validator.run(den.net, den.schedule, torch.device(device))
    # The noise-map factor is chosen here, on validation: each factor's scores, prefixed.
    out: dict[str, float] = {}
    for factor in noise_map_factors:
        den.net.cfg["noise_map_factor"] = float(factor)
        for key, value in validator.run(den.net, den.schedule, torch.device(device)).items():
            out[f"x{factor:g}/{key}"] = value
    return out
