"""How much of the error a run's network removes in tissue and in the background, on plain
patches of the MNI training blocks (Rician noise at one level, none of the synthesiser's
extras): ``python -m denoised_node.model.training.tissue_ratio RUN_DIR [--sigma 0.05]``.

Why: the training loss is taken over whole patches, where taking the Rician floor of the
background to zero is easy; a network can lower the loss that way long before it denoises
tissue, while validation (PSNR in the tissue mask) shows nothing. The ratio of the network's
squared error to the noisy input's, in tissue (clean > 0.04) and in the background, says
which it has learnt. Development diagnostic: it reads the run's last ``state.pt``.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np
import torch

TISSUE_LEVEL = 0.04  # of the normalised bright level


def plain_patches(in_slices: int, patch: int, sigma: float = 0.05, batches: int = 3,
                  batch_size: int = 12, maps: np.ndarray | None = None, holdout: int = 24,
                  gap: int = 8) -> list[Any]:
    """Fixed batches of plain patches of the MNI tissue maps' training blocks (or of ``maps``,
    (4, slices, rows, cols)): Rician noise at ``sigma``, none of the synthesiser's extras."""
    from denoised_node.model.training.data import Split, mni_maps
    from denoised_node.model.training.synth import SynthConfig, Synthesizer

    maps = mni_maps() if maps is None else maps
    blocks = [maps[:, a:b] for a, b in Split(maps.shape[1], holdout, gap).training_ranges()]
    plain = SynthConfig(
        patch=patch,
        in_slices=in_slices,
        sigma_range=(sigma, sigma * 1.001),
        dead_leaves_prob=0.0,
        procedural_prob=0.0,
        zero_fill_prob=0.0,
        partial_fourier_prob=0.0,
        coil_counts=(1,),
        gfactor_prob=0.0,
        zeroed_background_prob=0.0,
        twelve_bit_prob=0.0,
        gamma_prob=0.0,
        bias_prob=0.0,
        curve_prob=0.0,
        thick_prob=0.0,
        native_prob=1.0,
        axis_probs=(1.0, 0.0, 0.0),
        template_texture_prob=1.0,
    )
    synth = Synthesizer(blocks, plain, torch.device("cpu"), seed=3)
    return [synth.batch(batch_size) for _ in range(batches)]


def error_ratios(net: Any, patches: list[Any], amp: bool = False) -> tuple[float, float]:
    """Median over patches of (network's squared error / input's), in tissue and in the
    background; ``amp``: the network in bf16 autocast."""
    from denoised_node.model.schedule import NoiseSchedule
    from denoised_node.model.training.train import network_inputs

    half = net.in_slices // 2
    tissue: list[torch.Tensor] = []
    background: list[torch.Tensor] = []
    with torch.no_grad():
        for batch in patches:
            x, t = network_inputs(net, batch.noisy, NoiseSchedule())
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
                out = net(x, t).float()
            fg = (batch.clean > TISSUE_LEVEL).float()
            for mask, into in ((fg, tissue), (1 - fg, background)):
                err = ((out - batch.clean).pow(2) * mask).flatten(1).sum(1)
                base = (
                    ((batch.noisy[:, half : half + 1] - batch.clean).pow(2) * mask)
                    .flatten(1)
                    .sum(1)
                )
                into.append(err[base > 0] / base[base > 0])
    return float(torch.cat(tissue).median()), float(torch.cat(background).median())


def tissue_ratios(run_dir: Path, sigma: float = 0.05, batches: int = 3, batch_size: int = 12,
                  weights: str = "net", maps: np.ndarray | None = None) -> dict[str, float]:
    """``error_ratios`` of a run's last state on ``plain_patches`` of its patch size."""
    from denoised_node.model.network import build_network
    from denoised_node.model.training.train import _architecture, load_run_config

    cfg = load_run_config(run_dir)
    net = build_network(_architecture(cfg, None))
    state = torch.load(Path(run_dir) / "state.pt", map_location="cpu", weights_only=True)
    net.load_state_dict(state[weights])
    net.eval()
    patches = plain_patches(net.in_slices, cfg.patch, sigma, batches, batch_size, maps,
                            cfg.holdout, cfg.gap)
    tissue, background = error_ratios(net, patches)
    return {"step": int(state["step"]), "sigma": sigma, "tissue": tissue, "background": background}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--sigma", type=float, default=0.05)
    parser.add_argument("--weights", choices=("net", "ema"), default="net")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(tissue_ratios(args.run_dir, args.sigma, weights=args.weights))


if __name__ == "__main__":
    main()
