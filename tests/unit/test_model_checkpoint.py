"""model/checkpoint.py, model/hyperparameters.py and model/training/widen.py: weights with their
model card, one home for every default, what is refused (tampered, mismatched, missing, foreign),
publishing and widening a 1.x checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

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
    ModelError,
)
from denoised_node.model.hyperparameters import HYPERPARAMETERS, default_config
from denoised_node.model.inference import Denoiser
from denoised_node.model.network import build_network
from denoised_node.model.schedule import NoiseSchedule
from tests.fixtures.tiny_model import TINY, phantom, tiny_checkpoint


def test_checkpoint_round_trip(tiny: Path) -> None:
    card, _tensors = read_checkpoint(tiny)
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
    from denoised_node.model.training.data import SamplerConfig
    from denoised_node.model.training.synth import SynthConfig
    from denoised_node.model.training.train import TrainConfig

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
    from denoised_node.daemon.cli.model_commands import evaluate_command, train_command
    from denoised_node.model.training.evaluate import EvalConfig

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


def test_publish_keeps_the_weights_and_merges_the_record(tiny: Path, tmp_path: Path) -> None:
    from denoised_node.model.checkpoint import publish

    src_card, _ = read_checkpoint(tiny)
    dst = tmp_path / "shipped" / "default.safetensors"
    card = publish(tiny, dst, training={"machine": "test"}, metrics={"eval": {"psnr": 1.0}})
    assert card.sha256 == src_card.sha256 and card.training["machine"] == "test"
    assert (
        json.loads(dst.with_suffix(".json").read_text())["card"]["metrics"]["eval"]["psnr"] == 1.0
    )
    assert Denoiser.load(dst, device="cpu").identity == src_card.identity
    use = {"body_parts": ["KNEE"], "slice_thickness_mm": [2, 4]}
    again = publish(dst, tmp_path / "knee.safetensors", intended_use=use)
    assert again.intended_use == use and again.sha256 == src_card.sha256
    assert publish(tmp_path / "knee.safetensors", tmp_path / "kept.safetensors").intended_use == use


def test_widen_moves_a_1x_checkpoint_onto_the_noise_map(tmp_path: Path) -> None:
    from denoised_node.model.inference import noise_inputs
    from denoised_node.model.training.widen import widen

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
