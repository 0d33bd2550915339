"""Measure a model's noise floor on validation: the figure behind ``noise_floor_percent``.

Each validation domain's slices (those a run validates on, never trained or tested on) get
Rician noise at low levels, and no noise at all; for each case the noise reading that the node
would take (``noise_floor.noise_reading_percent``) and the model's PSNR gain in the mask. The
floor is the lowest reading at and above which every case gains at least ``MIN_GAIN_DB``: a
series that reads under it is one the model is seen to harm or barely help. A noise-free input
counts as harmed when the model changes it at all (its own PSNR is infinite).

    denoised-node evaluate --noise-floor [--checkpoint C] [--threads 1]
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from denoised_node.model.noise import add_rician
from denoised_node.model.noise_floor import noise_reading_percent
from denoised_node.model.training.data import foreground_mask
from denoised_node.model.training.quality import psnr
from denoised_node.model.training.validation import VALIDATION_NOISE_SEED, domain_validator

LEVELS_PERCENT = (0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0)
MIN_GAIN_DB = 0.5  # "helps": at least this much better than the input
FLOOR_STEP_PERCENT = 0.05  # the floor is rounded up to this


@dataclass(frozen=True)
class FloorCase:
    domain: str
    level_percent: float
    reading_percent: float | None
    gain_db: float  # -inf: a noise-free input that the model changed

    @property
    def helps(self) -> bool:
        return self.gain_db >= MIN_GAIN_DB

    def as_json(self) -> dict[str, object]:
        """JSON has no infinities: a noise-free input's gain is null, with ``changed``."""
        finite = math.isfinite(self.gain_db)
        return {
            "domain": self.domain,
            "level_percent": self.level_percent,
            "reading_percent": self.reading_percent,
            "gain_db": self.gain_db if finite else None,
            "changed": None if finite else self.gain_db < 0,
        }


def floor_from_cases(cases: list[FloorCase]) -> float:
    """The lowest reading at and above which every case helps (0 when every case helps)."""
    harmed = [c.reading_percent for c in cases if not c.helps and c.reading_percent is not None]
    if not harmed:
        return 0.0
    top = max(harmed)
    return round(math.floor(top / FLOOR_STEP_PERCENT + 1) * FLOOR_STEP_PERCENT, 4)


def measure_cases(checkpoint: str, device: str = "cpu",
                  levels_percent: tuple[float, ...] = LEVELS_PERCENT) -> list[FloorCase]:
    """Every validation domain at every level: the reading and the gain."""
    from denoised_node.model.card import resolve_checkpoint
    from denoised_node.model.inference import Denoiser, denoise_volume
    from denoised_node.model.training.data import load_mni_t2_like, load_named_volume

    names = ["mni152-t1", "mni152-scalp", "inia19-macaque"]
    den = Denoiser.load(resolve_checkpoint(checkpoint), device=device)
    validator = domain_validator(
        names,
        [load_named_volume(n) for n in names],
        load_mni_t2_like(),
        den.net.in_slices,
        VALIDATION_NOISE_SEED,
        levels=(),
        families=False,
    )
    cases = []
    for domain, val in validator.domains.items():
        rng = np.random.default_rng(VALIDATION_NOISE_SEED)
        clean = val.clean
        inner = val.inner
        mask = foreground_mask(clean)[inner]
        for level in levels_percent:
            noisy = clean.copy() if level == 0 else add_rician(clean, level / 100 * val.range, rng)
            out = denoise_volume(
                den.net, noisy, den.schedule, device=torch.device(device), batch_size=8
            )
            after = psnr(clean[inner], out[inner], val.range, mask)
            before = psnr(clean[inner], noisy[inner], val.range, mask)
            gain = (
                after - before
                if math.isfinite(before)
                else (math.inf if not math.isfinite(after) else -math.inf)
            )
            cases.append(FloorCase(domain, level, noise_reading_percent(noisy[inner]), gain))
    return cases


def report(cases: list[FloorCase]) -> str:
    """A Markdown table (gain in dB, the reading in brackets) and the floor."""
    domains = list(dict.fromkeys(c.domain for c in cases))
    levels = list(dict.fromkeys(c.level_percent for c in cases))
    by = {(c.domain, c.level_percent): c for c in cases}
    lines = ["| Rician sigma | " + " | ".join(domains) + " |", "|---" * (len(domains) + 1) + "|"]
    for level in levels:
        cells = []
        for domain in domains:
            case = by[(domain, level)]
            gain = (
                "changed"
                if case.gain_db == -math.inf
                else ("unchanged" if case.gain_db == math.inf else f"{case.gain_db:+.2f}")
            )
            read = "unread" if case.reading_percent is None else f"{case.reading_percent:.2f} %"
            cells.append(f"{gain} ({read})")
        lines.append(f"| {level:g} % | " + " | ".join(cells) + " |")
    floor = floor_from_cases(cases)
    lines.append("")
    lines.append(
        f"noise floor: {floor:g} % (every case reading at or above it gains >= {MIN_GAIN_DB} dB)"
    )
    return "\n".join(lines)
