"""Does a network start to denoise tissue? A short training run scored by the tissue ratio.

A run's loss falls long before it denoises tissue (the Rician floor of the background is easy
to take to zero), so this study trains for a few hundred steps and prints, every 100 steps,
the median ratio of the network's squared error to the noisy input's in tissue and in the
background, on fixed plain MNI patches at 5 % Rician (``model.tissue_ratio``'s measure; 1.0 is
the identity). It is the measurement behind docs/model.md's "3.0 in training" start-up table:

    python -m benchmarks.model_start --weighting relative --lr 5e-4 --steps 1200
    python -m benchmarks.model_start --init default --weighting none --lr 1e-4 --steps 400

One thread, bf16 autocast where the CPU has it, the run's own synthesiser (``--mix full``: the
training mixture; ``plain``: MNI patches with the synthesiser's default extras).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from denoised_node.model.network import build_network, widen_input
from denoised_node.model.schedule import NoiseSchedule
from denoised_node.model.training.synth import Batch, SynthConfig
from denoised_node.model.training.tissue_ratio import error_ratios, plain_patches
from denoised_node.model.training.train import (
    TrainConfig,
    _architecture,
    _initial_weights,
    _sources,
    cpu_has_bf16,
    network_inputs,
    sample_weights,
    weighted_mse,
)

# 1.0's architecture: no noise-map channel, one global noise estimate per slice.
ARCHITECTURE_1_0 = {
    "in_slices": 5,
    "kind": "diffusion_unet",
    "space_to_depth": 2,
    "spatial_dims": 2,
    "unet": {
        "attention_levels": [False, False, False, True],
        "channels": [48, 64, 96, 96],
        "norm_num_groups": 16,
        "num_head_channels": 32,
        "num_res_blocks": 1,
    },
}
WARMUP_STEPS = 100
BATCH = 12


def tissue_and_background(net: torch.nn.Module, patches: list[Batch],
                          amp: bool) -> tuple[float, float]:
    """``tissue_ratio.error_ratios`` in eval mode, back to training after."""
    net.eval()
    ratios = error_ratios(net, patches, amp)
    net.train()
    return ratios


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--weighting", default="relative", choices=("relative", "inverse_variance", "none")
    )
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--patch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--mix", default="full", choices=("full", "plain"))
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--architecture-1-0", action="store_true", help="1.0's network (no noise-map channel)"
    )
    parser.add_argument("--init", help="start from this checkpoint ('default' = the shipped model)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    full = args.mix == "full"
    cfg = TrainConfig(
        run_dir=Path("unused"),
        patch=args.patch,
        seed=args.seed,
        loss_weighting=args.weighting,
        volumes=["mni152-t1", "mni152-scalp", "inia19-macaque"] if full else ["mni152-t1"],
        dead_leaves_prob=SynthConfig.dead_leaves_prob if full else 0.0,
        procedural_prob=SynthConfig.procedural_prob if full else 0.0,
        arch=ARCHITECTURE_1_0 if args.architecture_1_0 else None,
    )
    start = _initial_weights(args.init, "diffusion_unet") if args.init else None
    net = build_network(_architecture(cfg, start))
    if start is not None:
        net.load_state_dict(widen_input(start[1], net))
    net.train()
    source, *_ = _sources(cfg, net.in_slices, torch.device("cpu"))
    patches = plain_patches(net.in_slices, patch=64, batches=2, batch_size=BATCH)
    amp = cpu_has_bf16()
    opt = torch.optim.Adam(net.parameters(), lr=args.lr)
    began = time.perf_counter()
    tissue, background = tissue_and_background(net, patches, amp)
    print(
        json.dumps({"step": 0, "tissue": round(tissue, 3), "background": round(background, 3)}),
        flush=True,
    )
    for step in range(1, args.steps + 1):
        for group in opt.param_groups:
            group["lr"] = args.lr * min(1.0, step / WARMUP_STEPS)
        batch = source.batch(BATCH)
        x, t = network_inputs(net, batch.noisy, NoiseSchedule())
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            pred = net(x, t)
        loss = weighted_mse(
            pred.float(), batch.clean, sample_weights(batch.noisy, batch.clean, batch.sigma, cfg)
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = float(torch.nn.utils.clip_grad_norm_(net.parameters(), cfg.grad_clip))
        opt.step()
        if step % 100 == 0:
            tissue, background = tissue_and_background(net, patches, amp)
            print(
                json.dumps(
                    {
                        "step": step,
                        "seconds": round(time.perf_counter() - began),
                        "loss": float(loss.detach()),
                        "grad_norm": round(grad_norm, 3),
                        "tissue": round(tissue, 3),
                        "background": round(background, 3),
                    }
                ),
                flush=True,
            )


if __name__ == "__main__":
    main()
