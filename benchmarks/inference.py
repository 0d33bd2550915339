"""Inference speed: slices/s of the shipped model against the plain U-Net baseline (MONAI
BasicUNet of the same parameter count, same stem, same batching), at 256x256 and 512x512."""

from __future__ import annotations

from functools import partial

import numpy as np
import torch

from benchmarks.common import Row, timed

SECTION = "inference"
# A near-isotropic volume is denoised in several planes (model.planes), a thick-slice one in
# its acquisition plane only: both are timed.
ISOTROPIC = (1.0, 1.0, 1.0)


def _volume(slices: int, size: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size] / size
    head = ((yy - 0.5) ** 2 + (xx - 0.5) ** 2 < 0.16) * 900.0
    detail = 120.0 * np.sin(40 * xx) * np.cos(33 * yy) * (head > 0)
    clean = np.repeat((head + detail)[None], slices, axis=0)
    noise = rng.normal(0, 25, clean.shape) + 1j * rng.normal(0, 25, clean.shape)
    return np.abs(clean + noise).astype(np.float32)


def _rate(denoise, volume: np.ndarray) -> float:  # type: ignore[no-untyped-def]
    denoise(volume[:2])  # warm-up: allocator and kernels
    return len(volume) / timed(lambda: denoise(volume))


def inference_rows(device: str = "cpu", threads: int = 2) -> list[Row]:
    from denoised_node.model.hyperparameters import default_config
    from denoised_node.model.inference import Denoiser, Spacing, denoise_volume
    from denoised_node.model.network import build_network, count_parameters

    if device == "cpu":
        torch.set_num_threads(threads)
    ours = Denoiser.load("default", device=device, batch_size=8)
    baseline = build_network(default_config("basic_unet")).eval().to(ours.device)
    where = (torch.cuda.get_device_name(ours.device) if ours.device.type == "cuda"
             else f"CPU, {torch.get_num_threads()} threads")
    rows = []
    cases: list[tuple[int, int, Spacing | None]] = [(256, 24, None), (512, 8, None)]
    if ours.planes > 1:
        cases.insert(1, (256, 24, ISOTROPIC))
    for size, slices, spacing in cases:
        volume = _volume(slices, size)
        planes = ours.planes_for(volume.shape, spacing)
        mine = _rate(partial(ours.denoise, spacing=spacing), volume)

        def plain(v: np.ndarray, spacing: Spacing | None = spacing) -> np.ndarray:
            with torch.inference_mode():  # the same planes as ours get, warm-up included
                return denoise_volume(baseline, v, ours.schedule, device=ours.device,
                                      batch_size=8, amp=ours.amp, tta=ours.tta,
                                      planes=ours.planes_for(v.shape, spacing))

        base = _rate(plain, volume)
        shape = "1 mm isotropic" if spacing else "thick slices"
        rows.append(Row(SECTION, f"{size}x{size} {shape} slices/s ({where})", mine, "slices/s",
                        {"plain U-Net": base},
                        f"{1 / mine:.3f} s per slice; TTA {ours.tta}, {planes} plane(s); "
                        f"{count_parameters(ours.net) / 1e6:.2f} M vs "
                        f"{count_parameters(baseline) / 1e6:.2f} M parameters"))
    return rows
