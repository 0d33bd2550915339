"""Move a 1.x checkpoint (one Haar MAD figure per slice) onto the noise map, without training.

``python -m denoised_node.model.training.widen SRC DST --factor 0.75`` widens the first
convolution with zeros for the map channel (the network computes what it did) and records
``noise_map_factor``, which puts the map's reading on the scale of the estimator the weights
were trained with.
This is how ``dn-unet25d-2.0`` was made from ``unet25d-1.0`` (factor chosen on validation).
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

from denoised_node.model.card import resolve_checkpoint
from denoised_node.model.checkpoint import ModelCard, read_checkpoint, write_checkpoint
from denoised_node.model.network import build_network, widen_input
from denoised_node.model.training.train import initial_lineage


def widen(src: str, dst: Path, factor: float, version: str = "2.0") -> ModelCard:
    card, tensors = read_checkpoint(resolve_checkpoint(src))
    arch = {**card.architecture, "noise_estimator": "noise_map", "noise_map_channel": True,
            "noise_map_factor": factor}
    net = build_network(arch)
    net.load_state_dict(widen_input({k: v.float() for k, v in tensors.items()}, net))
    training = {
        "data": card.training.get("data"),
        "steps": 0,
        "note": "the source's weights with the noise-map reading: first convolution widened with "
                "zeros for the map channel, no further training",
        "initialised_from": initial_lineage(card),
        "commands": [f"python -m denoised_node.model.training.widen {src} {dst} --factor {factor}"],
    }
    normalisation = {**card.normalisation, "sigma_estimator":
                     f"noise_map.noise_map on the normalised slice x {factor}; timestep from its "
                     "median, map channel from the map"}
    new = replace(card, version=version, architecture=arch, training=training,
                  normalisation=normalisation, metrics={})
    return write_checkpoint(dst, net.state_dict(), new)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("src")
    parser.add_argument("dst", type=Path)
    parser.add_argument("--factor", type=float, default=0.75)
    args = parser.parse_args()
    print(widen(args.src, args.dst, args.factor).identity)


if __name__ == "__main__":
    main()
