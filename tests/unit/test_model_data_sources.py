"""The named training volumes and the held-out test material, read from the packages that
ship them (mricron-data, the nimare and pydicom-data wheels: .ci/run installs them)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from denoised_node.model.training import data, held_out
from denoised_node.model.training.data import Split, load_named_volume


@pytest.mark.parametrize("name", ["mni152-scalp", "inia19-macaque"])
def test_named_volumes_load_on_their_bright_level_with_a_test_slab(name: str) -> None:
    vol = load_named_volume(name)
    assert vol.ndim == 3 and vol.dtype == np.float32
    assert 0.0 <= vol.min() and 0.8 <= vol.max() <= 1.0
    split = Split(vol.shape[0])
    assert split.training_ranges() and split.validation[1] <= split.test[0]


def test_a_missing_source_names_its_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(data, "INIA19_T1", Path("/nonexistent/inia19.nii.gz"))
    with pytest.raises(FileNotFoundError, match="apt-get install mricron-data"):
        load_named_volume("inia19-macaque")
    with pytest.raises(ValueError, match="unknown named volume"):
        load_named_volume("brainweb")


def test_held_out_material_is_there() -> None:
    colin = held_out.colin27()
    assert colin.shape == (181, 217, 181)
    assert held_out.thick_slices(colin).shape == (20, 217, 181)
    for name in held_out.VENDOR_SLICES:
        image = held_out.vendor_slice(name)
        assert image.ndim == 3 and image.shape[0] == 1 and image.max() > 0
    first, second = held_out.epi_volumes()
    assert first.shape == second.shape == (24, 96, 128)


def test_validation_scores_a_checkpoint_per_noise_map_factor(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`evaluate --validation --noise-map-factors`: the same cases once per factor (the factor
    is chosen on validation). The domains are cut down to one small phantom here: the real
    ones take minutes on a CPU."""
    import torch

    from denoised_node.model.checkpoint import ModelCard, write_checkpoint
    from denoised_node.model.network import build_network
    from denoised_node.model.schedule import NoiseSchedule
    from denoised_node.model.training import validation
    from tests.fixtures.tiny_model import TINY

    arch = {**TINY, "noise_estimator": "noise_map", "noise_map_channel": True}
    torch.manual_seed(0)
    net = build_network(arch)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.01 * torch.randn_like(p))
    path = tmp_path / "tiny.safetensors"
    write_checkpoint(
        path,
        net.state_dict(),
        ModelCard(
            name="tiny", version="0.0", architecture=arch, schedule=NoiseSchedule().to_dict()
        ),
    )
    _zz, yy, xx = np.mgrid[:12, :64, :64]
    phantom = ((yy - 32) ** 2 + (xx - 32) ** 2 < 24**2) * (0.5 + 0.3 * (np.sin(xx / 3.0) > 0))
    small = {"phantom": validation.Validator(phantom.astype(np.float32), (4, 8), (0.05,), 3, 1)}
    monkeypatch.setattr(
        validation, "domain_validator", lambda *a, **k: validation.DomainValidator(small)
    )
    scores = validation.validate_checkpoint(str(path), noise_map_factors=(0.25, 4.0))
    assert set(scores) == {f"x{f}/{k}_mask_5%" for f in ("0.25", "4") for k in ("psnr", "ssim")} | {
        "x0.25/psnr_mask_mean", "x4/psnr_mask_mean"}
    assert scores["x0.25/psnr_mask_mean"] != scores["x4/psnr_mask_mean"]
