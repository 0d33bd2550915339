"""model/network.py: the networks' shapes, the identity they start as, SDPA attention, the
noise-map channel and widening onto it, the fixed-timestep ablation."""

from __future__ import annotations

import pytest
import torch

from denoised_node.model.hyperparameters import default_config
from denoised_node.model.network import build_network
from tests.fixtures.tiny_model import TINY


@pytest.mark.parametrize("kind", ["diffusion_unet", "basic_unet"])
def test_untrained_network_is_identity_on_the_centre_slice(kind: str) -> None:
    cfg = default_config(kind)
    net = build_network(cfg).eval()
    x = torch.rand(2, net.input_channels, 64, 64)  # the slices, then the noise map
    with torch.no_grad():
        y = net(x, torch.tensor([10.0, 500.0]))
    assert y.shape == (2, 1, 64, 64)
    torch.testing.assert_close(y, x[:, cfg["in_slices"] // 2 : cfg["in_slices"] // 2 + 1])


def test_default_network_uses_sdpa_attention_at_the_smallest_level_only() -> None:
    cfg = default_config()
    assert cfg["unet"]["attention_levels"] == [False, False, False, True]
    net = build_network(cfg)
    flags = [m.use_flash_attention for m in net.modules() if hasattr(m, "use_flash_attention")]
    assert flags and all(flags)


def test_3d_variant_shapes() -> None:
    cfg = {**TINY, "spatial_dims": 3, "unet": {**TINY["unet"]}}
    net = build_network(cfg).eval()
    x = torch.rand(1, 1, 4, 32, 32)
    with torch.no_grad():
        assert net(x, torch.tensor([100.0])).shape == x.shape


def test_network_refuses_sizes_it_cannot_take() -> None:
    net = build_network(TINY)
    with pytest.raises(ValueError, match="multiples"):
        net(torch.rand(1, 3, 30, 32), torch.tensor([1.0]))


def test_map_channel_is_counted_and_checked() -> None:
    net = build_network({**TINY, "noise_estimator": "noise_map", "noise_map_channel": True})
    assert net.input_channels == TINY["in_slices"] + 1
    with pytest.raises(ValueError, match="input channels"):
        net(torch.rand(1, TINY["in_slices"], 32, 32), torch.tensor([1.0]))


def test_widened_network_computes_what_the_old_one_did() -> None:
    from denoised_node.model.network import widen_input

    old = build_network(TINY).eval()
    for p in old.parameters():  # not the identity: a zero last conv would hide a mistake
        torch.nn.init.normal_(p, std=0.05)
    new = build_network({**TINY, "noise_estimator": "noise_map", "noise_map_channel": True}).eval()
    new.load_state_dict(widen_input(old.state_dict(), new))
    x = torch.rand(2, TINY["in_slices"], 32, 32)
    t = torch.tensor([100.0, 700.0])
    with torch.no_grad():
        torch.testing.assert_close(new(torch.cat([x, torch.rand(2, 1, 32, 32)], 1), t), old(x, t))


def test_fixed_timestep_ablation_ignores_the_noise_level() -> None:
    net = build_network({**TINY, "fixed_timestep": 699}).eval()
    for p in net.parameters():
        torch.nn.init.normal_(p, std=0.05)
    x = torch.rand(1, TINY["in_slices"], 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(net(x, torch.tensor([10.0])), net(x, torch.tensor([900.0])))


def test_an_older_cards_architecture_reads_as_the_1x_models_were_built() -> None:
    """One home for the defaults of keys older cards lack (card.Architecture); a new run's
    architecture is hyperparameters.default_config, which states every key."""
    from denoised_node.model.card import Architecture
    from denoised_node.model.hyperparameters import HYPERPARAMETERS

    old = Architecture.from_dict({"kind": "diffusion_unet", "unet": {"channels": [8]}})
    assert (old.in_slices, old.space_to_depth, old.noise_estimator, old.noise_map_channel,
            old.noise_map_factor, old.fixed_timestep) == (1, 1, "haar_mad", False, 1.0, None)
    new = Architecture.from_dict(default_config())
    assert (new.in_slices, new.space_to_depth, new.noise_estimator) == (
        HYPERPARAMETERS.in_slices, HYPERPARAMETERS.space_to_depth, HYPERPARAMETERS.noise_estimator)
    net = build_network({k: v for k, v in TINY.items()
                         if k not in ("in_slices", "space_to_depth", "noise_map_channel")})
    assert (net.in_slices, net.r, net.map_channel) == (1, 1, False)
