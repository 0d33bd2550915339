"""The denoising network, built from a plain config dict (``build_network(cfg)``); the
shipped architecture is ``hyperparameters.default_config``.

A checkpoint stores this dict in its model card, so loading needs nothing but the file; a key
an older card lacks takes its default from ``card.Architecture`` (the one home of those).

Shape of the model (2.5D, ``spatial_dims=2``): the input is ``in_slices`` neighbouring slices
as channels, ``(B, in_slices, H, W)``. A space-to-depth stem (pixel unshuffle by
``space_to_depth``) folds each 2x2 block into channels so the U-Net runs at half resolution
(four times fewer pixels: this is what makes a 256x256 slice fast enough on a CPU), and a
depth-to-space head unfolds the U-Net's output back to full resolution. The U-Net predicts the
noise residual; the output is the centre slice minus it. The U-Net's last convolution starts at
zero, so an untrained network is the identity.

``kind``:
- ``diffusion_unet``: MONAI ``DiffusionModelUNet``; its timestep input carries the noise level
  (see ``schedule.py``); attention only at the smallest level, through torch SDPA.
- ``basic_unet``: MONAI ``BasicUNet``, blind to the noise level: the plain baseline.

With ``spatial_dims=3`` the input is ``(B, 1, D, H, W)`` and the output the whole denoised
block ``(B, 1, D, H, W)``; the stem folds only H and W.

``noise_map_channel``: one more input channel carries the local noise level (the noise map of
``noise_map.py`` as a fraction of the timestep range) after the slices, so that noise that
varies across the slice (parallel imaging, coil shading) is removed where it is.
"""

from __future__ import annotations

import copy
import logging
from typing import Any

import torch
from torch import nn

from denoised_node.model.card import Architecture
from denoised_node.model.hyperparameters import KINDS

logger = logging.getLogger(__name__)


def _fold(x: torch.Tensor, r: int) -> torch.Tensor:
    """Space-to-depth over the last two axes: (B, C, [D,] H, W) -> (B, C*r*r, [D,] H/r, W/r)."""
    if r == 1:
        return x
    if x.ndim == 4:
        return nn.functional.pixel_unshuffle(x, r)
    b, c, d, h, w = x.shape
    y = x.permute(0, 2, 1, 3, 4).reshape(b * d, c, h, w)
    y = nn.functional.pixel_unshuffle(y, r)
    return y.reshape(b, d, c * r * r, h // r, w // r).permute(0, 2, 1, 3, 4)


def _unfold(x: torch.Tensor, r: int) -> torch.Tensor:
    if r == 1:
        return x
    if x.ndim == 4:
        return nn.functional.pixel_shuffle(x, r)
    b, c, d, h, w = x.shape
    y = x.permute(0, 2, 1, 3, 4).reshape(b * d, c, h, w)
    y = nn.functional.pixel_shuffle(y, r)
    return y.reshape(b, d, c // (r * r), h * r, w * r).permute(0, 2, 1, 3, 4)


class DenoiseNet(nn.Module):
    """Residual denoiser around a MONAI U-Net; see the module docstring."""

    def __init__(self, cfg: dict[str, Any]) -> None:
        super().__init__()
        cfg = copy.deepcopy(cfg)
        kind = cfg.get("kind")
        if kind not in KINDS:
            raise ValueError(f"unknown network kind {kind!r}; known: {', '.join(KINDS)}")
        self.cfg = cfg
        self.kind: str = kind
        arch = Architecture.from_dict(cfg)  # absent keys: the older checkpoints' defaults
        self.spatial_dims = arch.spatial_dims
        if self.spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, not {self.spatial_dims}")
        self.in_slices = arch.in_slices if self.spatial_dims == 2 else 1
        self.r = arch.space_to_depth
        self.conditioned = kind == "diffusion_unet"
        self.map_channel = arch.noise_map_channel
        # Ablation only: the timestep held at this value whatever the noise (t fixed).
        self.fixed_timestep: float | None = arch.fixed_timestep
        unet = dict(arch.unet)
        cin = (self.in_slices + int(self.map_channel)) * self.r * self.r
        cout = self.r * self.r
        if kind == "diffusion_unet":
            from monai.networks.nets import DiffusionModelUNet

            channels = tuple(unet.pop("channels"))
            self.levels = len(channels)
            self.net: nn.Module = DiffusionModelUNet(
                spatial_dims=self.spatial_dims,
                in_channels=cin,
                out_channels=cout,
                channels=channels,
                attention_levels=tuple(unet.pop("attention_levels")),
                use_flash_attention=True,  # torch scaled_dot_product_attention
                **unet,
            )
        else:
            from monai.networks.nets import BasicUNet

            self.levels = 5
            # norm: BasicUNet's default is instance norm, which makes the residual blind to the
            # input's scale; the fair plain baseline (DRUNet-style) uses none, with the map.
            self.net = BasicUNet(
                spatial_dims=self.spatial_dims,
                in_channels=cin,
                out_channels=cout,
                features=tuple(unet.pop("features")),
                **unet,
            )
            for p in self.net.final_conv.parameters():
                nn.init.zeros_(p)  # start as the identity, like DiffusionModelUNet's out conv

    @property
    def multiple(self) -> int:
        """Height and width must be multiples of this (the caller pads)."""
        return self.r * 2 ** (self.levels - 1)

    @property
    def input_channels(self) -> int:
        """Channels the caller passes: the slices (2.5D) or 1 (3D), plus the noise map."""
        return (self.in_slices if self.spatial_dims == 2 else 1) + int(self.map_channel)

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor | None = None) -> torch.Tensor:
        """``x``: (B, in_slices [+1 map], H, W), or (B, 1 [+1 map], D, H, W) in 3D."""
        m = self.multiple
        if x.shape[-1] % m or x.shape[-2] % m:
            raise ValueError(
                f"height and width must be multiples of {m}, got {tuple(x.shape[-2:])}"
            )
        if x.shape[1] != self.input_channels:
            raise ValueError(f"expected {self.input_channels} input channels, got {x.shape[1]}")
        if self.spatial_dims == 2:
            centre = x[:, self.in_slices // 2 : self.in_slices // 2 + 1]
        else:
            centre = x[:, :1]
        y = _fold(x, self.r)
        if self.conditioned:
            if timesteps is None:
                raise ValueError("this network is conditioned on the noise level: pass timesteps")
            if self.fixed_timestep is not None:
                timesteps = torch.full_like(timesteps, self.fixed_timestep)
            res = self.net(y, timesteps.to(y.dtype))
        else:
            res = self.net(y)
        return centre - _unfold(res, self.r)


def widen_input(state: dict[str, torch.Tensor], net: DenoiseNet) -> dict[str, torch.Tensor]:
    """Weights of a network without the noise-map channel, fitted to ``net`` (with it): the new
    channel's input weights are zero, so the widened network computes what the old one did."""
    own = net.state_dict()
    out = dict(state)
    for name, tensor in state.items():
        target = own.get(name)
        if target is None or target.shape == tensor.shape or tensor.ndim < 3:
            continue
        if (
            target.shape[0] == tensor.shape[0]
            and target.shape[1] > tensor.shape[1]
            and target.shape[2:] == tensor.shape[2:]
        ):
            grown = torch.zeros(target.shape, dtype=tensor.dtype)
            grown[:, : tensor.shape[1]] = tensor  # the map's channels come after the slices'
            out[name] = grown
    return out


def build_network(cfg: dict[str, Any]) -> DenoiseNet:
    """``Net(**cfg)``: the whole architecture comes from the config dict."""
    return DenoiseNet(cfg)


def count_parameters(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())
