"""Model package: network shapes, noise and schedule, checkpoints, inference padding."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from denoised_node.model import inference
from denoised_node.model.checkpoint import ModelCard, read_checkpoint, write_checkpoint
from denoised_node.model.errors import (
    CheckpointInvalidError,
    CheckpointMismatchError,
    CheckpointNotFoundError,
    DeviceUnavailableError,
    InputVolumeError,
    ModelError,
)
from denoised_node.model.hyperparameters import HYPERPARAMETERS, default_config
from denoised_node.model.inference import Denoiser, planes_for
from denoised_node.model.network import build_network
from denoised_node.model.noise import add_rician, estimate_sigma, robust_scale
from denoised_node.model.schedule import NoiseSchedule

TINY: dict[str, Any] = {
    "kind": "diffusion_unet",
    "spatial_dims": 2,
    "in_slices": 3,
    "space_to_depth": 2,
    "unet": {
        "channels": [16, 16],
        "attention_levels": [False, True],
        "num_res_blocks": 1,
        "num_head_channels": 16,
        "norm_num_groups": 8,
    },
}


def tiny_checkpoint(path: Path, *, perturb: bool = True, sidecar: bool = False) -> ModelCard:
    torch.manual_seed(0)
    net = build_network(TINY)
    if perturb:  # leave the identity so outputs depend on the weights
        with torch.no_grad():
            for p in net.parameters():
                p.add_(0.01 * torch.randn_like(p))
    card = ModelCard(name="tiny", version="0.0", architecture=TINY, schedule=NoiseSchedule().to_dict())
    return write_checkpoint(path, net.state_dict(), card, sidecar=sidecar)


@pytest.fixture
def tiny(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.safetensors"
    tiny_checkpoint(path)
    return path


def phantom(slices: int, rows: int, cols: int, sigma: float = 0.03, seed: int = 0) -> np.ndarray:
    yy, xx = np.mgrid[:rows, :cols]
    disc = (((yy - rows / 2) / (0.4 * rows)) ** 2 + ((xx - cols / 2) / (0.4 * cols)) ** 2 < 1).astype(np.float32)
    vol = np.stack([disc * (0.6 + 0.3 * np.sin(xx / 7.0 + k)) for k in range(slices)]).astype(np.float32)
    return add_rician(vol, sigma, np.random.default_rng(seed)) * 1000.0


# --- network -------------------------------------------------------------------------------


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


# --- noise and schedule --------------------------------------------------------------------


def test_sigma_estimate_on_white_noise() -> None:
    rng = np.random.default_rng(1)
    img = rng.normal(5.0, 0.2, (256, 256)).astype(np.float32)
    assert estimate_sigma(img) == pytest.approx(0.2, rel=0.05)


def test_rician_noise_is_magnitude() -> None:
    rng = np.random.default_rng(2)
    out = add_rician(np.zeros((64, 64), np.float32), 1.0, rng)
    assert out.min() >= 0
    assert out.mean() == pytest.approx(np.sqrt(np.pi / 2), rel=0.05)  # Rayleigh mean


def test_schedule_is_monotone_and_invertible() -> None:
    s = NoiseSchedule()
    sig = np.array([0.005, 0.01, 0.03, 0.09, 0.15])
    t = s.timestep(sig)
    assert np.all(np.diff(t) > 0) and t.min() >= 0 and t.max() <= 999
    np.testing.assert_allclose(s.sigma(t), sig, rtol=1e-4)
    assert s.timestep(1e-9) == 0 and s.timestep(10.0) == 999


def test_robust_scale_ignores_hot_pixels() -> None:
    vol = np.ones((4, 32, 32), np.float32)
    vol[0, 0, 0] = 1e6
    assert robust_scale(vol) == pytest.approx(1.0)


# --- checkpoints ---------------------------------------------------------------------------


def test_checkpoint_round_trip(tiny: Path) -> None:
    card, tensors = read_checkpoint(tiny)
    assert card.architecture == TINY and card.weights_dtype == "float16"
    den = Denoiser.load(tiny, device="cpu")
    assert den.identity == f"dn-tiny-0.0-{card.sha256[:12]}"
    assert den.card == card and den.device == torch.device("cpu")


def test_a_checkpoint_loads_with_its_cards_architecture_and_schedule(tmp_path: Path) -> None:
    """Not the defaults: the card's in_slices and noise schedule win."""
    net = build_network(TINY)
    schedule = NoiseSchedule(sigma_min=0.001, sigma_max=0.4, num_steps=500)
    card = ModelCard(name="tiny", version="0.1", architecture=TINY, schedule=schedule.to_dict())
    write_checkpoint(tmp_path / "t.safetensors", net.state_dict(), card)
    den = Denoiser.load(tmp_path / "t.safetensors", device="cpu")
    assert den.net.in_slices == TINY["in_slices"] != HYPERPARAMETERS.in_slices
    assert den.schedule == schedule != NoiseSchedule()


def test_every_default_hyperparameter_comes_from_one_place() -> None:
    from denoised_node.model.data import SamplerConfig
    from denoised_node.model.synth import SynthConfig
    from denoised_node.model.train import TrainConfig

    h = HYPERPARAMETERS
    cfg = default_config()
    assert cfg["kind"] == h.kind and default_config("basic_unet")["kind"] == "basic_unet"
    assert (cfg["spatial_dims"], cfg["in_slices"], cfg["space_to_depth"]) == (
        h.spatial_dims, h.in_slices, h.space_to_depth)
    assert (cfg["noise_estimator"], cfg["noise_map_channel"]) == (
        h.noise_estimator, h.noise_map_channel)
    assert NoiseSchedule() == NoiseSchedule(h.sigma_min, h.sigma_max, h.num_steps)
    train = TrainConfig(run_dir=Path("run"))
    assert (train.kind, train.patch, train.sigma_range) == (h.kind, h.patch, h.sigma_range)
    for sampler in (SynthConfig(), SamplerConfig()):
        assert (sampler.patch, sampler.in_slices, sampler.sigma_range, sampler.axis_probs) == (
            h.patch, h.in_slices, h.sigma_range, h.axis_probs)
    from denoised_node.daemon.cli_model import evaluate_command, train_command
    from denoised_node.model.evaluate import EvalConfig

    options = {p.name: p.default for p in train_command.params}
    for name in ("kind", "batch_size", "patch", "lr", "seed", "threads", "val_every", "holdout",
                 "gap", "warmup"):
        assert options[name] == getattr(train, name), name
    evaluation = {p.name: p.default for p in evaluate_command.params}
    assert (evaluation["holdout"], evaluation["gap"]) == (train.holdout, train.gap)
    assert (EvalConfig().holdout, EvalConfig().gap) == (train.holdout, train.gap)
    cfg["unet"]["channels"].append(1)  # a copy: the defaults stay as they were
    assert default_config()["unet"]["channels"] != cfg["unet"]["channels"]


def test_denoiser_defaults_are_the_model_settings_defaults() -> None:
    import inspect

    from denoised_node.config.settings import ModelSettings

    node = ModelSettings()
    params = inspect.signature(Denoiser.load).parameters
    for name in ("checkpoint", "device", "batch_size", "amp", "threads"):
        assert params[name].default == getattr(node, name), name
    assert inference.TTA_CHOICES == (1, 2, 4, 8) and inference.PLANE_CHOICES == (1, 2, 3)


def test_hyperparameters_and_config_import_without_torch() -> None:
    import subprocess
    import sys

    code = ("import sys, denoised_node.config.settings, denoised_node.model.hyperparameters; "
            "sys.exit('torch' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_tampered_weights_are_refused(tiny: Path) -> None:
    data = bytearray(tiny.read_bytes())
    data[-10] ^= 0xFF  # inside the last tensor's bytes
    tiny.write_bytes(bytes(data))
    with pytest.raises(CheckpointMismatchError, match="altered"):
        Denoiser.load(tiny, device="cpu")


def test_card_that_does_not_fit_the_weights_is_refused(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    path = tmp_path / "t.safetensors"
    card = tiny_checkpoint(path)
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    bad = json.loads(meta["denoised_node_card"])
    bad["architecture"]["unet"]["channels"] = [16, 32]
    meta["denoised_node_card"] = json.dumps(bad)
    save_file(load_file(str(path)), str(path), metadata=meta)
    assert read_checkpoint(path)[0].sha256 == card.sha256
    with pytest.raises(CheckpointMismatchError, match="do not fit"):
        Denoiser.load(path, device="cpu")


def test_sidecar_pins_the_file(tmp_path: Path) -> None:
    path = tmp_path / "s.safetensors"
    tiny_checkpoint(path, sidecar=True)
    Denoiser.load(path, device="cpu")
    tiny_checkpoint(path, perturb=False)  # replaced, sidecar stale
    (tmp_path / "s.json").write_text((tmp_path / "s.json").read_text())
    with pytest.raises(CheckpointMismatchError, match="sha256"):
        Denoiser.load(path, device="cpu")


def test_missing_and_foreign_files_are_refused(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    with pytest.raises(CheckpointNotFoundError, match="does not exist"):
        Denoiser.load(tmp_path / "nope.safetensors", device="cpu")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x80\x04not a checkpoint")
    with pytest.raises(CheckpointInvalidError):
        Denoiser.load(junk, device="cpu")
    bare = tmp_path / "bare.safetensors"
    save_file({"w": torch.zeros(2)}, str(bare))
    with pytest.raises(CheckpointInvalidError, match="no model card"):
        Denoiser.load(bare, device="cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a host without CUDA")
def test_unavailable_device_is_refused(tiny: Path) -> None:
    with pytest.raises(DeviceUnavailableError, match="cuda:1"):
        Denoiser.load(tiny, device="cuda:1")
    assert issubclass(DeviceUnavailableError, ModelError)


# --- inference -----------------------------------------------------------------------------


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
        np.testing.assert_allclose(out, one_by_one, rtol=1e-4, atol=1e-4)  # conv sums differ by batch


def test_identity_network_returns_the_input(tmp_path: Path) -> None:
    path = tmp_path / "id.safetensors"
    tiny_checkpoint(path, perturb=False)
    vol = phantom(2, 40, 40)
    np.testing.assert_allclose(Denoiser.load(path, device="cpu").denoise(vol), vol, rtol=1e-5, atol=1e-3)


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
    card = ModelCard(name="tiny3d", version="0.0", architecture=cfg, schedule=NoiseSchedule().to_dict())
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


def test_publish_keeps_the_weights_and_merges_the_record(tiny: Path, tmp_path: Path) -> None:
    from denoised_node.model.checkpoint import publish

    src_card, _ = read_checkpoint(tiny)
    dst = tmp_path / "shipped" / "default.safetensors"
    card = publish(tiny, dst, training={"machine": "test"}, metrics={"eval": {"psnr": 1.0}})
    assert card.sha256 == src_card.sha256 and card.training["machine"] == "test"
    assert json.loads(dst.with_suffix(".json").read_text())["card"]["metrics"]["eval"]["psnr"] == 1.0
    assert Denoiser.load(dst, device="cpu").identity == src_card.identity
    use = {"body_parts": ["KNEE"], "slice_thickness_mm": [2, 4]}
    again = publish(dst, tmp_path / "knee.safetensors", intended_use=use)
    assert again.intended_use == use and again.sha256 == src_card.sha256
    assert publish(tmp_path / "knee.safetensors", tmp_path / "kept.safetensors").intended_use == use


def test_planes_apply_to_near_isotropic_volumes_only() -> None:
    assert planes_for((40, 64, 64), (1.0, 1.0, 1.0), 3) == 3
    assert planes_for((40, 64, 64), (1.2, 0.95, 0.95), 2) == 2
    assert planes_for((40, 64, 64), (5.0, 0.9, 0.9), 3) == 1  # thick slices
    assert planes_for((40, 64, 64), (1.5, 1.0, 1.0), 3) == 1  # beyond ISOTROPY_LIMIT
    assert planes_for((40, 64, 64), None, 3) == 1  # spacing unknown
    assert planes_for((8, 64, 64), (1.0, 1.0, 1.0), 3) == 1  # too few slices for the other planes
    assert planes_for((40, 64, 64), (0.0, 1.0, 1.0), 3) == 1
    assert planes_for((40, 64, 64), (1.0, 1.0, 1.0), 1) == 1


def test_several_planes_average_the_network_run_along_each_axis(tiny: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
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
    np.testing.assert_allclose(den.denoise(vol, spacing=iso), np.mean(by_plane, axis=0), rtol=1e-4, atol=1e-4)
    two = Denoiser.load(tiny, device="cpu", planes=2).denoise(vol, spacing=iso)
    np.testing.assert_allclose(two, np.mean(by_plane[:2], axis=0), rtol=1e-4, atol=1e-4)
    # Thick slices (or no spacing): the acquisition plane only.
    np.testing.assert_allclose(den.denoise(vol, spacing=(4.0, 1.0, 1.0)), by_plane[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(den.denoise(vol), by_plane[0], rtol=1e-5, atol=1e-5)


def test_several_planes_read_the_noise_level_lower(tiny: Path) -> None:
    """Each plane is smoothed less, since the average takes out much of its error."""
    seen: dict[int, list[float]] = {}
    vol = phantom(18, 20, 22)
    for planes in (1, 3):
        den = Denoiser.load(tiny, device="cpu", planes=planes, batch_size=32)
        forward = den.net.forward
        calls: list[float] = []

        def record(x: torch.Tensor, t: torch.Tensor, forward: Any = forward, calls: list[float] = calls) -> torch.Tensor:
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


def test_widen_moves_a_1x_checkpoint_onto_the_noise_map(tmp_path: Path) -> None:
    from denoised_node.model.inference import noise_inputs
    from denoised_node.model.widen import widen

    net = build_network(TINY).eval()
    src = tmp_path / "old.safetensors"
    write_checkpoint(src, net.state_dict(), ModelCard(name="tiny", version="1.0", architecture=TINY,
                                                      schedule=NoiseSchedule().to_dict()))
    card = widen(str(src), tmp_path / "new.safetensors", 0.75)
    assert card.version == "2.0" and card.architecture["noise_map_factor"] == 0.75
    assert card.training["initialised_from"]["identity"].startswith("dn-tiny-1.0-")
    new = Denoiser.load(tmp_path / "new.safetensors", device="cpu", planes=1)
    vol = phantom(3, 64, 64) / 1000.0
    t_new, local = noise_inputs(new.net, vol, NoiseSchedule())
    plain = build_network({**card.architecture, "noise_map_factor": 1.0})
    t_plain, _ = noise_inputs(plain, vol, NoiseSchedule())
    sched = NoiseSchedule()
    np.testing.assert_allclose(sched.sigma(t_new), 0.75 * sched.sigma(t_plain), rtol=1e-4)
    assert local is not None
