"""model/inference.py: the Denoiser on any size, deterministic and batch-independent, test-time
augmentation, the 3D variant, refused volumes, several planes, the noise-map model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from denoised_node.model import inference
from denoised_node.model.checkpoint import ModelCard, write_checkpoint
from denoised_node.model.errors import (
    InputVolumeError,
)
from denoised_node.model.inference import Denoiser, planes_for
from denoised_node.model.network import build_network
from denoised_node.model.schedule import NoiseSchedule
from tests.fixtures.tiny_model import TINY, phantom, tiny_checkpoint


@pytest.mark.parametrize("shape", [(3, 270, 270), (2, 320, 260), (1, 37, 45), (5, 16, 16)])
def test_any_size_is_padded_and_cropped_back(tiny: Path, shape: tuple[int, int, int]) -> None:
    den = Denoiser.load(tiny, device="cpu", batch_size=2)
    vol = phantom(*shape)
    calls: list[tuple[int, int]] = []
    out = den.denoise(vol, progress=lambda done, total: calls.append((done, total)))
    assert out.shape == vol.shape and out.dtype == np.float32
    assert calls[-1] == (shape[0], shape[0])
    assert np.isfinite(out).all()


def test_denoise_is_deterministic(tiny: Path) -> None:
    den = Denoiser.load(tiny, device="cpu")
    vol = phantom(3, 64, 64)
    a, b = den.denoise(vol), Denoiser.load(tiny, device="cpu").denoise(vol)
    np.testing.assert_array_equal(a, b)


def test_batches_land_on_their_own_slices(tiny: Path) -> None:
    """Batches are queued one ahead of their copy back: every batch size gives the same volume."""
    vol = phantom(7, 48, 48)
    one_by_one = Denoiser.load(tiny, device="cpu", batch_size=1).denoise(vol)
    for batch_size in (2, 3, 7, 16):
        out = Denoiser.load(tiny, device="cpu", batch_size=batch_size).denoise(vol)
        np.testing.assert_allclose(
            out, one_by_one, rtol=1e-4, atol=1e-4
        )  # conv sums differ by batch


def test_identity_network_returns_the_input(tmp_path: Path) -> None:
    path = tmp_path / "id.safetensors"
    tiny_checkpoint(path, perturb=False)
    vol = phantom(2, 40, 40)
    np.testing.assert_allclose(
        Denoiser.load(path, device="cpu").denoise(vol), vol, rtol=1e-5, atol=1e-3
    )


@pytest.mark.parametrize("tta", [1, 2, 4, 8])
def test_test_time_augmentation(tiny: Path, tta: int) -> None:
    den = Denoiser.load(tiny, device="cpu", tta=tta)
    vol = phantom(2, 48, 80)
    out = den.denoise(vol)
    assert out.shape == vol.shape and np.isfinite(out).all()


def test_tta_defaults_and_refusal(tiny: Path) -> None:
    assert Denoiser.load(tiny, device="cpu").tta == 1
    with pytest.raises(ValueError, match="tta"):
        Denoiser.load(tiny, device="cpu", tta=3)


def test_3d_variant_denoises_a_volume(tmp_path: Path) -> None:
    cfg = {**TINY, "spatial_dims": 3, "block_depth": 4}
    torch.manual_seed(0)
    card = ModelCard(
        name="tiny3d", version="0.0", architecture=cfg, schedule=NoiseSchedule().to_dict()
    )
    path = tmp_path / "t3.safetensors"
    write_checkpoint(path, build_network(cfg).state_dict(), card)
    vol = phantom(7, 36, 40)
    out = Denoiser.load(path, device="cpu").denoise(vol)
    np.testing.assert_allclose(out, vol, rtol=1e-5, atol=1e-3)  # zero-initialised: the identity


def test_bad_volumes_are_refused(tiny: Path) -> None:
    den = Denoiser.load(tiny, device="cpu")
    with pytest.raises(InputVolumeError):
        den.denoise(np.zeros((1, 1, 4, 4), np.float32))
    bad = phantom(1, 16, 16)
    bad[0, 0, 0] = np.nan
    with pytest.raises(InputVolumeError, match="NaN"):
        den.denoise(bad)


def test_planes_apply_to_near_isotropic_volumes_only() -> None:
    assert planes_for((40, 64, 64), (1.0, 1.0, 1.0), 3) == 3
    assert planes_for((40, 64, 64), (1.2, 0.95, 0.95), 2) == 2
    assert planes_for((40, 64, 64), (5.0, 0.9, 0.9), 3) == 1  # thick slices
    assert planes_for((40, 64, 64), (1.5, 1.0, 1.0), 3) == 1  # beyond ISOTROPY_LIMIT
    assert planes_for((40, 64, 64), None, 3) == 1  # spacing unknown
    assert planes_for((8, 64, 64), (1.0, 1.0, 1.0), 3) == 1  # too few slices for the other planes
    assert planes_for((40, 64, 64), (0.0, 1.0, 1.0), 3) == 1
    assert planes_for((40, 64, 64), (1.0, 1.0, 1.0), 1) == 1


def test_several_planes_average_the_network_run_along_each_axis(
    tiny: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(inference, "PLANE_SIGMA_FACTOR", {1: 1.0, 2: 1.0, 3: 1.0})  # compared below
    den = Denoiser.load(tiny, device="cpu", planes=3)
    # Offset below zero so that no clamp at zero (after the average) hides a difference.
    vol = phantom(20, 24, 28) - 1.0
    iso = (1.0, 1.0, 1.0)
    single = Denoiser.load(tiny, device="cpu", planes=1)
    by_plane = [
        single.denoise(vol),
        single.denoise(np.ascontiguousarray(vol.transpose(1, 0, 2))).transpose(1, 0, 2),
        single.denoise(np.ascontiguousarray(vol.transpose(2, 0, 1))).transpose(1, 2, 0),
    ]
    # The scale is the volume's whatever the axis order, so the mean of the three runs is exact.
    np.testing.assert_allclose(
        den.denoise(vol, spacing=iso), np.mean(by_plane, axis=0), rtol=1e-4, atol=1e-4
    )
    two = Denoiser.load(tiny, device="cpu", planes=2).denoise(vol, spacing=iso)
    np.testing.assert_allclose(two, np.mean(by_plane[:2], axis=0), rtol=1e-4, atol=1e-4)
    # Thick slices (or no spacing): the acquisition plane only.
    np.testing.assert_allclose(
        den.denoise(vol, spacing=(4.0, 1.0, 1.0)), by_plane[0], rtol=1e-5, atol=1e-5
    )
    np.testing.assert_allclose(den.denoise(vol), by_plane[0], rtol=1e-5, atol=1e-5)


def test_several_planes_read_the_noise_level_lower(tiny: Path) -> None:
    """Each plane is smoothed less, since the average takes out much of its error."""
    seen: dict[int, list[float]] = {}
    vol = phantom(18, 20, 22)
    for planes in (1, 3):
        den = Denoiser.load(tiny, device="cpu", planes=planes, batch_size=32)
        forward = den.net.forward
        calls: list[float] = []

        def record(
            x: torch.Tensor, t: torch.Tensor, forward: Any = forward, calls: list[float] = calls
        ) -> torch.Tensor:
            calls.append(float(t[0]))
            return forward(x, t)

        den.net.forward = record  # type: ignore[method-assign]
        den.denoise(vol, spacing=(1.0, 1.0, 1.0))
        seen[planes] = calls
    assert len(seen[1]) == 1 and len(seen[3]) == 3  # one batch per plane
    expected = NoiseSchedule().timestep(np.float32(inference.PLANE_SIGMA_FACTOR[3] * 0.05))
    below = NoiseSchedule().timestep(np.float32(0.05))
    assert seen[3][0] == pytest.approx(seen[1][0] - (below - expected), abs=0.05)


def test_several_planes_report_progress_in_the_volumes_slices(tiny: Path) -> None:
    den = Denoiser.load(tiny, device="cpu", planes=3, batch_size=4)
    seen: list[tuple[int, int]] = []
    den.denoise(phantom(18, 20, 22), progress=lambda done, total: seen.append((done, total)),
                spacing=(1.0, 1.0, 1.0))
    assert {total for _, total in seen} == {18}
    assert [done for done, _ in seen] == sorted(done for done, _ in seen)
    assert seen[-1] == (18, 18) and len(seen) > 3


def test_planes_defaults_and_refusal(tiny: Path) -> None:
    assert Denoiser.load(tiny, device="cpu").planes == 2
    with pytest.raises(ValueError, match="planes"):
        Denoiser.load(tiny, device="cpu", planes=4)


def test_noise_map_model_denoises_a_zeroed_background_series(tmp_path: Path) -> None:
    """A 2.x model reads the noise where the background is zeroed (t > 0, map present)."""
    from denoised_node.model.inference import noise_inputs
    from denoised_node.model.schedule import NoiseSchedule

    net = build_network({**TINY, "noise_estimator": "noise_map", "noise_map_channel": True}).eval()
    vol = phantom(3, 64, 64) / 1000.0
    vol[:, :, :12] = 0.0
    t, local = noise_inputs(net, vol, NoiseSchedule())
    assert (t > 300).all() and local is not None and local.shape == vol.shape
    path = tmp_path / "m.safetensors"
    write_checkpoint(path, net.state_dict(), ModelCard(name="m", version="2", architecture=net.cfg,
                                                        schedule=NoiseSchedule().to_dict()))
    den = Denoiser.load(path, device="cpu", planes=1)
    assert den.denoise(vol * 1000.0).shape == vol.shape
