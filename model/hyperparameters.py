"""The model's hyperparameters, each number written once: the shipped architecture, the noise
schedule, the training samples' and a training run's defaults.

Everything else reads them from here: ``network.default_config`` (the architecture a new run
builds), ``schedule.NoiseSchedule`` (its defaults), the training configs (``train.TrainConfig``,
``synth.SynthConfig``, ``data.SamplerConfig``) and inference (the 3D block depth). A loaded
checkpoint does not: its card carries the architecture and schedule it was trained with.
The inference knobs a node configures (batch size, mixed precision, passes, planes) have
their home in the ``[model]`` settings (config/settings.py), which ``Denoiser.load`` reads.

Torch-free (standard library only), so anything may import it.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Hyperparameters:
    # Architecture (see network.py for what each key does).
    kind: str = "diffusion_unet"
    spatial_dims: int = 2
    in_slices: int = 5  # neighbouring slices in, as channels (2.5D)
    space_to_depth: int = 2
    noise_estimator: str = "noise_map"
    noise_map_channel: bool = True
    block_depth: int = 16  # slices per block of a 3D network
    # The noise schedule (schedule.py): noise sigma, relative to the image's scale, mapped
    # log-linearly onto timesteps 0 .. num_steps - 1.
    sigma_min: float = 0.002
    sigma_max: float = 0.2
    num_steps: int = 1000
    # Training samples (synth.py, data.py, train.py).
    patch: int = 128
    sigma_range: tuple[float, float] = (0.005, 0.12)  # Rician sigma, fraction of the clean max
    axis_probs: tuple[float, float, float] = (0.6, 0.2, 0.2)  # axial, coronal, sagittal


HYPERPARAMETERS = Hyperparameters()


@dataclass(frozen=True)
class Training:
    """A training run's defaults (train.TrainConfig and the `train` command read them)."""

    batch_size: int = 12
    lr: float = 1e-3
    warmup: int = 300  # steps before the cosine decay
    seed: int = 20240611
    threads: int = 1
    val_every: int = 250
    # The central test slab never trained on, and the slices either side of it, also never
    # trained on (evaluation reads the same slab).
    holdout: int = 24
    gap: int = 8


TRAINING = Training()
# How a training sample's squared error is weighed (train.sample_weights says what each does).
LOSS_WEIGHTINGS = ("relative", "inverse_variance", "none")

# The U-Net inside each kind of network.
UNETS: dict[str, dict[str, Any]] = {
    "diffusion_unet": {
        "channels": [48, 64, 96, 96],
        "attention_levels": [False, False, False, True],
        "num_res_blocks": 1,
        "num_head_channels": 32,
        "norm_num_groups": 16,
    },
    # 2.94 M parameters, like ours; no normalisation (DRUNet-style: instance norm would make
    # its residual blind to the input's scale), told the noise level by the map.
    "basic_unet": {"features": [48, 64, 96, 176, 240, 48], "norm": None},
}
KINDS = tuple(UNETS)


def default_config(kind: str = HYPERPARAMETERS.kind) -> dict[str, Any]:
    """The architecture of the shipped model (and of its plain baseline), as the config dict
    ``network.build_network`` takes and a model card stores."""
    if kind not in UNETS:
        raise ValueError(f"unknown network kind {kind!r}; known: {', '.join(KINDS)}")
    h = HYPERPARAMETERS
    return {
        "kind": kind,
        "spatial_dims": h.spatial_dims,
        "in_slices": h.in_slices,
        "space_to_depth": h.space_to_depth,
        "noise_estimator": h.noise_estimator,
        "noise_map_channel": h.noise_map_channel,
        "unet": copy.deepcopy(UNETS[kind]),
    }
