"""How much several planes gain as slices get thicker: the measurement behind
``inference.ISOTROPY_LIMIT``.

The held-out slab of the MNI152 T1 template with its gaps (never trained on) is resampled to
thicker slices (linear interpolation, 1 mm pixels kept), Rician noise is added and the model
denoises it with 1, 2 and 3 planes; PSNR in the mask on the slab. Run it as
``python -m benchmarks.planes_study [--checkpoint C] [--level 5] [--threads N]``.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import numpy as np

from denoised_node.model.inference import PLANE_CHOICES, Denoiser, denoise_volume
from denoised_node.model.noise import add_rician
from denoised_node.model.training.data import Split, foreground_mask, load_mni_t1
from denoised_node.model.training.quality import psnr

SLICE_SPACINGS_MM = (1.0, 1.25, 1.5, 2.0, 3.0)


@dataclass(frozen=True)
class SpacingRow:
    slice_spacing_mm: float
    slices: int
    psnr_mask_by_planes: dict[int, float]


def planes_by_spacing(den: Denoiser, level: float = 0.05, holdout: int = 24, gap: int = 8,
                      spacings: tuple[float, ...] = SLICE_SPACINGS_MM, seed: int = 5,
                      volume: np.ndarray | None = None) -> list[SpacingRow]:
    """``volume``: a 1 mm isotropic clean volume (default: the MNI152 T1 template)."""
    from scipy.ndimage import zoom

    vol = load_mni_t1() if volume is None else volume
    peak = float(vol.max())
    a, b = Split(vol.shape[0], holdout, gap).test
    block = vol[a - gap : b + gap]
    rows = []
    for spacing in spacings:
        clean = zoom(block, (1 / spacing, 1, 1), order=1).astype(np.float32)
        margin = max(2, round(gap / spacing))  # score the slab, not the resampled gaps
        inner = slice(margin, clean.shape[0] - margin)
        mask = foreground_mask(clean)[inner]
        noisy = add_rician(clean, level * peak, np.random.default_rng(seed))
        scores = {}
        for planes in PLANE_CHOICES:
            out = denoise_volume(den.net, noisy, den.schedule, device=den.device,
                                 batch_size=den.batch_size, planes=planes)
            scores[planes] = psnr(clean[inner], out[inner], peak, mask)
        rows.append(SpacingRow(spacing, clean.shape[0], scores))
    return rows


def to_markdown(rows: list[SpacingRow]) -> str:
    lines = [
        "| slice spacing | "
        + " | ".join(f"{p} plane{'s' if p > 1 else ''}" for p in PLANE_CHOICES)
        + " |",
        "|---|" + "---|" * len(PLANE_CHOICES),
    ]
    for row in rows:
        best = max(row.psnr_mask_by_planes.values())
        cells = [
            f"**{v:.2f}**" if v == best else f"{v:.2f}" for v in row.psnr_mask_by_planes.values()
        ]
        lines.append(f"| {row.slice_spacing_mm:g} mm | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    import torch

    parser = argparse.ArgumentParser(prog="python -m benchmarks.planes_study", description=__doc__)
    parser.add_argument("--checkpoint", default="default")
    parser.add_argument("--level", type=float, default=5.0, help="Rician noise, % of the max")
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    den = Denoiser.load(args.checkpoint, device="cpu", tta=1)
    print(f"{den.identity}, Rician noise {args.level:g} %, PSNR in the mask (dB)")
    print(to_markdown(planes_by_spacing(den, level=args.level / 100)))


if __name__ == "__main__":
    main()
