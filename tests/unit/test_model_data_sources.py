"""The named training volumes and the held-out test material, read from the packages that
ship them (mricron-data, the nimare and pydicom-data wheels: .ci/run installs them)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from denoised_node.model import data, held_out
from denoised_node.model.data import Split, load_named_volume


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
