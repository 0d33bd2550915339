"""A tiny training run on synthetic data covers train.py: steps, validation, export, resume."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from denoised_node.model.inference import Denoiser
from denoised_node.model.training.train import TrainConfig, train

TINY = {
    "kind": "diffusion_unet",
    "spatial_dims": 2,
    "in_slices": 3,
    "space_to_depth": 2,
    "unet": {"channels": [8, 16], "attention_levels": [False, True], "num_res_blocks": 1,
             "num_head_channels": 16, "norm_num_groups": 8},
}


@pytest.fixture
def volume(tmp_path: Path) -> Path:
    nib = pytest.importorskip("nibabel")
    rng = np.random.default_rng(0)
    zz, yy, xx = np.mgrid[:40, :40, :40]
    ball = ((zz - 20) ** 2 + (yy - 20) ** 2 + (xx - 20) ** 2 < 17**2).astype(np.float32)
    data = ball * (0.5 + 0.5 * (np.sin(xx / 3.0) > 0)) + 0.01 * rng.random((40, 40, 40))
    path = tmp_path / "phantom.nii.gz"
    nib.save(nib.Nifti1Image(data.astype(np.float32), np.eye(4)), str(path))
    return path


@pytest.mark.parametrize("kind", ["diffusion_unet", "basic_unet"])
def test_tiny_training_run_and_resume(tmp_path: Path, volume: Path, kind: str) -> None:
    arch = (
        TINY
        if kind == "diffusion_unet"
        else {**TINY, "kind": "basic_unet", "unet": {"features": [8, 8, 8, 8, 8, 8]}}
    )
    cfg = TrainConfig(
        run_dir=tmp_path / "run",
        kind=kind,
        name="tiny",
        volumes=[str(volume)],
        steps=4,
        batch_size=2,
        patch=32 if kind == "diffusion_unet" else 64,
        warmup=2,
        val_every=2,
        log_every=1,
        holdout=8,
        gap=4,
        val_noise=(0.05,),
        arch=arch,
        threads=1,
    )
    reported: list[tuple[int, int]] = []
    best = train(cfg, progress=lambda done, total: reported.append((done, total)))
    assert reported == [(1, 4), (2, 4), (3, 4), (4, 4)]  # what the CLI's bar draws
    lines = [
        json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    ]
    assert [m["step"] for m in lines] == [2, 4]
    # One domain per training volume and the 5 mm dead leaves; the score is their mean.
    assert "psnr_mask_phantom:5%" in lines[0] and "ssim_mask_phantom:5%" in lines[0]
    domains = [lines[0]["psnr_mask_phantom"], lines[0]["psnr_mask_leaves-5mm"]]
    assert lines[0]["psnr_mask_mean"] == pytest.approx(np.mean(domains), abs=1e-3)
    den = Denoiser.load(best, device="cpu")
    assert den.card.training["steps"] in (2, 4) and den.card.architecture == arch
    sources = den.card.training["sources"]  # the card names every source of its data
    assert set(sources) == {str(volume), "dead leaves", "organ-like volumes"}
    vol = np.random.default_rng(1).random((3, 40, 40)).astype(np.float32)
    assert den.denoise(vol).shape == vol.shape

    cfg.steps = 6
    with pytest.raises(FileExistsError):
        train(cfg)
    train(cfg, resume=True)
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert json.loads(lines[-1])["step"] == 6


def test_train_cli_on_a_real_pair(tmp_path: Path, volume: Path) -> None:
    import nibabel as nib
    from click.testing import CliRunner

    from denoised_node.daemon.cli.model_commands import train_command
    from denoised_node.model.noise import add_rician

    img = nib.load(str(volume))
    clean = np.asarray(img.get_fdata(), dtype=np.float32)
    noisy_path = tmp_path / "noisy.nii.gz"
    nib.save(
        nib.Nifti1Image(add_rician(clean, 0.04, np.random.default_rng(3)), img.affine),
        str(noisy_path),
    )
    run = tmp_path / "cli-run"
    args = [
        "--run-dir",
        str(run),
        "--pair",
        str(noisy_path),
        str(volume),
        "--steps",
        "1",
        "--batch-size",
        "1",
        "--patch",
        "32",
        "--val-every",
        "1",
        "--device",
        "cpu",
        "--holdout",
        "8",
        "--gap",
        "4",
    ]
    res = CliRunner().invoke(train_command, args)
    assert res.exit_code == 0, res.output
    metrics = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert "psnr_mask_paired" in metrics
    card = Denoiser.load(run / "best.safetensors", device="cpu").card
    assert card.training["noise"] == {"kind": "real pairs"}
    assert card.training["commands"][0].startswith("denoised-node train")
    again = CliRunner().invoke(train_command, args)
    assert again.exit_code != 0 and "--resume" in again.output


def test_fine_tuning_starts_from_the_given_weights(tmp_path: Path, volume: Path) -> None:
    from denoised_node.model.checkpoint import read_checkpoint

    base = TrainConfig(
        run_dir=tmp_path / "base",
        name="tiny",
        volumes=[str(volume)],
        steps=2,
        batch_size=2,
        patch=32,
        warmup=1,
        val_every=2,
        holdout=8,
        gap=4,
        val_noise=(0.05,),
        arch=TINY,
        threads=1,
    )
    start = train(base)
    # lr 0: the fine-tuned run must export exactly the weights it started from, moved onto the
    # noise-map inputs (a 1.x model reads one Haar figure per slice): the map's input weights
    # are zero, so it computes what the start did.
    tuned = TrainConfig(
        run_dir=tmp_path / "tuned",
        name="tiny",
        volumes=[str(volume)],
        steps=2,
        batch_size=2,
        patch=32,
        lr=0.0,
        warmup=1,
        val_every=2,
        holdout=8,
        gap=4,
        val_noise=(0.05,),
        threads=1,
        init_from=str(start),
    )
    out = train(tuned)
    (card_a, a), (card_b, b) = read_checkpoint(start), read_checkpoint(out)
    assert card_b.architecture == {
        **TINY,
        "noise_estimator": "noise_map",
        "noise_map_channel": True,
    }
    assert card_b.training["initialised_from"]["identity"] == card_a.identity
    assert card_b.training["initialised_from"]["steps"] == 2
    for k in a:
        old, new = a[k].numpy(), b[k].numpy()
        if old.shape == new.shape:
            assert np.array_equal(old, new), k
        else:  # the first convolution, widened by the map's channels
            assert np.array_equal(new[:, : old.shape[1]], old) and not new[:, old.shape[1]:].any()

    # resumed, it keeps its own weights and still records where they started
    tuned.steps, tuned.lr = 4, 1e-3
    train(tuned, resume=True)
    card_c, _ = read_checkpoint(tmp_path / "tuned" / "last.safetensors")
    assert (
        card_c.training["steps"] == 4
        and card_c.training["initialised_from"]["identity"] == card_a.identity
    )

    wrong = TrainConfig(
        run_dir=tmp_path / "wrong",
        kind="basic_unet",
        volumes=[str(volume)],
        steps=1,
        init_from=str(start),
    )
    with pytest.raises(ValueError, match="diffusion_unet"):
        train(wrong)


def test_3d_variant_trains_and_denoises(tmp_path: Path, volume: Path) -> None:
    arch = {**TINY, "spatial_dims": 3, "block_depth": 4, "noise_estimator": "noise_map",
            "noise_map_channel": True}
    cfg = TrainConfig(
        run_dir=tmp_path / "run3d",
        name="tiny3d",
        volumes=[str(volume)],
        steps=2,
        batch_size=1,
        patch=32,
        warmup=1,
        val_every=2,
        holdout=8,
        gap=4,
        val_noise=(0.05,),
        arch=arch,
        threads=1,
    )
    best = train(cfg)
    den = Denoiser.load(best, device="cpu")
    vol = np.random.default_rng(2).random((6, 32, 32)).astype(np.float32)
    assert den.denoise(vol).shape == vol.shape


def test_time_budget_ends_the_run_and_drives_the_schedule(tmp_path: Path, volume: Path) -> None:
    from denoised_node.model.training.train import _lr_at

    cfg = TrainConfig(
        run_dir=tmp_path / "budget",
        name="tiny",
        volumes=[str(volume)],
        steps=None,
        time_budget_s=3.0,
        batch_size=1,
        patch=32,
        warmup=1,
        val_every=1000,
        holdout=8,
        gap=4,
        val_noise=(0.05,),
        arch=TINY,
        threads=1,
    )
    assert _lr_at(5, cfg, wall=0.0) == pytest.approx(cfg.lr)
    assert _lr_at(5, cfg, wall=3.0) == pytest.approx(cfg.lr * cfg.min_lr_ratio)
    train(cfg)
    lines = [
        json.loads(x) for x in (tmp_path / "budget" / "metrics.jsonl").read_text().splitlines()
    ]
    assert lines[-1]["wall_s"] >= 3 - 0.5  # validated once, when the budget was spent
    with pytest.raises(ValueError, match="time budget"):
        TrainConfig(run_dir=tmp_path / "x", steps=None)


def test_synthesised_batches_cover_the_randomised_families() -> None:
    import torch

    from denoised_node.model.training.synth import SynthConfig, Synthesizer

    rng = np.random.default_rng(0)
    maps = np.clip(rng.random((4, 40, 64, 64)).astype(np.float32), 0, 1)
    cfg = SynthConfig(patch=32, in_slices=3, zeroed_background_prob=1.0, twelve_bit_prob=1.0)
    synth = Synthesizer([maps], cfg, torch.device("cpu"), seed=1)
    batch = synth.batch(4)
    assert batch.noisy.shape == (4, 3, 32, 32) and batch.clean.shape == (4, 1, 32, 32)
    assert torch.isfinite(batch.noisy).all() and (batch.noisy >= 0).all()
    assert (batch.noisy == 0).any()  # zeroed backgrounds
    assert (batch.sigma > 0).all()
    again = Synthesizer([maps], cfg, torch.device("cpu"), seed=1).batch(4)
    torch.testing.assert_close(batch.noisy, again.noisy)  # seeded: reproducible
    assert synth.batch(2, all_slices=True).clean.shape == (2, 1, 3, 32, 32)


def test_loss_weights_balance_the_noise_levels() -> None:
    import torch

    from denoised_node.model.training.train import sample_weights, weighted_mse

    cfg = TrainConfig(run_dir=Path("unused"), sigma_range=(0.01, 0.04), steps=1)
    sigma = torch.tensor([0.01, 0.02, 0.04])
    clean = torch.zeros(3, 1, 4, 4)
    noisy = torch.zeros(3, 3, 4, 4)
    noisy[:, 1] = sigma[:, None, None] * 2.0  # the inputs' errors: (2 sigma)^2
    # relative (the default): the identity scores 1 on every sample, whatever its noise
    weights = sample_weights(noisy, clean, sigma, cfg)
    assert weights is not None
    identity = noisy[:, 1:2]
    per_sample = (identity - clean).pow(2).flatten(1).mean(1) * weights
    torch.testing.assert_close(per_sample, torch.ones(3))
    assert weighted_mse(identity, clean, weights).item() == pytest.approx(1.0)
    # a zeroed patch (no error at all) is floored at (sigma / 2)^2, not infinite
    flat = sample_weights(torch.zeros(3, 3, 4, 4), clean, sigma, cfg)
    assert flat is not None
    torch.testing.assert_close(flat, 1.0 / (0.5 * sigma) ** 2)
    # inverse_variance: (0.02 / sigma)^2; unknown sigma (real pairs): plain MSE
    cfg.loss_weighting = "inverse_variance"
    torch.testing.assert_close(
        sample_weights(noisy, clean, sigma, cfg), torch.tensor([4.0, 1.0, 0.25])
    )
    assert sample_weights(noisy, clean, torch.tensor([float("nan")] * 3), cfg) is None
    cfg.loss_weighting = "none"
    assert sample_weights(noisy, clean, sigma, cfg) is None
    torch.testing.assert_close(
        weighted_mse(identity, clean, None), torch.nn.functional.mse_loss(identity, clean)
    )
    cfg.loss_weighting = "l1"
    with pytest.raises(ValueError, match="relative"):
        sample_weights(noisy, clean, sigma, cfg)


def test_resume_reads_the_runs_own_config_and_refuses_changes(tmp_path: Path, volume: Path) -> None:
    from click.testing import CliRunner

    from denoised_node.daemon.cli.model_commands import train_command
    from denoised_node.model.training.train import load_run_config

    run = tmp_path / "run"
    args = [
        "--run-dir",
        str(run),
        "--volume",
        str(volume),
        "--steps",
        "2",
        "--batch-size",
        "1",
        "--patch",
        "32",
        "--val-every",
        "2",
        "--device",
        "cpu",
        "--holdout",
        "8",
        "--gap",
        "4",
        "--precision",
        "fp32",
    ]
    assert CliRunner().invoke(train_command, args).exit_code == 0
    cfg = load_run_config(run)
    assert (cfg.steps, cfg.batch_size, cfg.patch, cfg.volumes, cfg.amp) == (
        2,
        1,
        32,
        [str(volume)],
        False,
    )
    changed = CliRunner().invoke(train_command, ["--resume", str(run), "--steps", "9"])
    assert changed.exit_code != 0 and "leave out --steps" in changed.output
    again = CliRunner().invoke(train_command, ["--resume", str(run), "--threads", "1"])
    assert again.exit_code == 0, again.output
    assert "resumed" in (run / "train.log").read_text()
    missing = CliRunner().invoke(train_command, ["--resume", str(tmp_path / "nothing")])
    assert missing.exit_code != 0 and "holds no run" in missing.output
    neither = CliRunner().invoke(train_command, ["--steps", "1"])
    assert neither.exit_code != 0 and "--run-dir" in neither.output


def test_dead_leaves_hold_flat_regions_and_edges_at_many_scales() -> None:
    import torch

    from denoised_node.model.training.dead_leaves import dead_leaves_volume

    gen = torch.Generator()
    gen.manual_seed(5)
    vol = dead_leaves_volume(gen, torch.device("cpu")).numpy()  # the training size (about 1 s)
    assert vol.min() >= 0 and vol.max() == pytest.approx(1.0)
    grad = np.abs(np.diff(vol, axis=2))
    curvature = np.abs(np.diff(vol, n=2, axis=2))
    assert (curvature < 1e-3).mean() > 0.3  # flat or linearly shaded insides
    assert (grad > 0.05).mean() > 0.02  # and edges
    again = torch.Generator()
    again.manual_seed(5)
    small = dead_leaves_volume(again, torch.device("cpu"), (8, 32, 32), shapes=20).numpy()
    again.manual_seed(5)
    np.testing.assert_array_equal(
        small, dead_leaves_volume(again, torch.device("cpu"), (8, 32, 32), shapes=20).numpy()
    )


def test_the_mixture_draws_dead_leaves_and_keeps_air_dark() -> None:
    import torch

    from denoised_node.model.training.synth import SynthConfig, Synthesizer

    maps = np.zeros((4, 40, 64, 64), dtype=np.float32)
    maps[0, :, 16:48, 16:48] = 1.0  # anatomy: one bright block
    only_leaves = SynthConfig(patch=32, in_slices=3, dead_leaves_prob=1.0, procedural_prob=0.0)
    synth = Synthesizer([maps], only_leaves, torch.device("cpu"), seed=2)
    src, _ = synth._source()
    assert synth.leaves is not None and src is synth.leaves[0]
    curve = Synthesizer(
        [maps], SynthConfig(patch=32, in_slices=3, curve_prob=1.0), torch.device("cpu"), seed=3
    )
    img = torch.rand(4, 3, 8, 8)
    img[:, :, 0, 0] = 0.0
    out = curve._curve(img)
    assert (out[:, :, 0, 0] == 0).all() and not torch.equal(out, img)
    assert out.amax() == pytest.approx(1.0)


def test_tissue_ratio_tells_tissue_from_background(tmp_path: Path, volume: Path) -> None:
    """The diagnostic of model/training/tissue_ratio.py on a run whose network is still the identity
    (lr 0): it removes nothing, in tissue or in the background."""
    from denoised_node.model.training.tissue_ratio import tissue_ratios

    cfg = TrainConfig(
        run_dir=tmp_path / "run",
        name="tiny",
        volumes=[str(volume)],
        steps=1,
        batch_size=1,
        patch=32,
        lr=0.0,
        warmup=1,
        val_every=1,
        holdout=8,
        gap=4,
        val_noise=(0.05,),
        arch=TINY,
        threads=1,
        dead_leaves_prob=0.0,
    )
    train(cfg)
    from denoised_node.model.training.data import load_training_volume, volume_maps

    ratios = tissue_ratios(tmp_path / "run", batches=1, batch_size=2,
                           maps=volume_maps(load_training_volume(volume)))
    assert ratios["step"] == 1
    assert ratios["tissue"] == pytest.approx(1.0, abs=1e-3)
    assert ratios["background"] == pytest.approx(1.0, abs=1e-3)
