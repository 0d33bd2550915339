"""A series with less noise than the model's floor is left alone (issue 30, item 6): the
reading, the floor from validation cases, the pipeline, the worker and offline denoising."""

from __future__ import annotations

import math
import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest
from click.testing import CliRunner

from denoised_node.daemon.cli.main import main
from denoised_node.daemon.jobs.pipeline import denoise_series
from denoised_node.model.noise import add_rician
from denoised_node.model.noise_floor import FLOOR_KEY, noise_reading_percent, under_noise_floor
from denoised_node.model.training.noise_floor_study import FloorCase, floor_from_cases
from denoised_node.storage.images.series import NoNoiseToRemove
from tests.fixtures.node_state import minimal_config
from tests.unit.conftest import ScaledDenoiser

NOW = datetime(2026, 12, 8, 10, 0, 0, tzinfo=UTC)


def _phantom(slices: int = 6, size: int = 128) -> np.ndarray:
    """A smooth disc with a soft bright blob in a zero background, bright level about 1000."""
    yy, xx = np.mgrid[:size, :size]
    disc = ((yy - size / 2) ** 2 + (xx - size / 2) ** 2 < (0.4 * size) ** 2).astype(np.float32)
    blob = np.exp(-((yy - 0.4 * size) ** 2 + (xx - 0.55 * size) ** 2) / (0.05 * size**2))
    return np.repeat((disc * (600 + 400 * blob))[None], slices, axis=0).astype(np.float32)


@pytest.mark.parametrize("level", [0.3, 1.0, 3.0, 5.0])
def test_the_reading_follows_the_noise(level: float) -> None:
    clean = _phantom()
    noisy = add_rician(clean, level / 100 * 1000, np.random.default_rng(1))
    reading = noise_reading_percent(noisy)
    assert reading is not None and reading == pytest.approx(level, rel=0.25)


def test_a_noise_free_image_reads_zero_and_a_tiny_one_is_not_read() -> None:
    assert noise_reading_percent(_phantom()) == 0.0
    assert noise_reading_percent(np.random.default_rng(0).random((3, 16, 16))) is None


def test_under_the_floor_says_why_and_only_with_a_floor() -> None:
    rng = np.random.default_rng(2)
    quiet = add_rician(_phantom(), 3.0, rng)  # 0.3 %
    loud = add_rician(_phantom(), 50.0, rng)  # 5 %
    reason = under_noise_floor(quiet, {FLOOR_KEY: 2.0})
    assert reason is not None and re.search(
        r"noise reads 0\.\d\d % of the bright level, under the 2 %", reason
    )
    assert under_noise_floor(loud, {FLOOR_KEY: 2.0}) is None
    assert under_noise_floor(quiet, {}) is None


def test_the_floor_is_the_lowest_reading_above_every_harmed_case() -> None:
    cases = [FloorCase("a", 0.0, 1.43, -math.inf), FloorCase("a", 1.0, 1.28, 2.9),
             FloorCase("b", 0.0, 3.07, -math.inf), FloorCase("b", 1.0, 2.19, -1.7),
             FloorCase("b", 2.0, 2.92, 2.4), FloorCase("c", 1.5, 1.51, 0.31)]
    assert floor_from_cases(cases) == 3.1  # the noise-free "b" reads 3.07: harmed
    assert floor_from_cases([c for c in cases if c.domain != "b"]) == 1.55  # 0.31 dB < 0.5
    assert floor_from_cases([FloorCase("a", 1.0, 1.0, 3.0)]) == 0.0


class FlooredDenoiser(ScaledDenoiser):
    """The stand-in network with a card whose intended use has a noise floor."""

    def __init__(self, floor: float) -> None:
        super().__init__()

        class Card:
            name, version = "floored", "1.0"
            intended_use: ClassVar[dict[str, float]] = {FLOOR_KEY: floor}

        self.card = Card  # type: ignore[assignment,misc]


def test_a_series_under_the_floor_is_not_denoised(mr_series_factory: Any, settings: Any,
                                                  tmp_path: Path) -> None:
    quiet = mr_series_factory(slices=3, noise_sigma=0.0)
    network = FlooredDenoiser(3.0)
    with pytest.raises(
        NoNoiseToRemove, match=r"nothing to denoise: noise reads 0\.\d\d % .* under the 3 %"
    ):
        denoise_series(quiet.paths, quiet.series_uid, network, settings, tmp_path / "a", NOW)
    assert network.calls == 0
    # The intended use overridden: the floor with it.
    outcome = denoise_series(quiet.paths, quiet.series_uid, network, settings, tmp_path / "b", NOW,
                             noise_floor=False)
    assert network.calls == 1 and len(outcome.files) == 3
    noisy = mr_series_factory(slices=3)  # the fixtures' default: 4-5 %
    outcome = denoise_series(noisy.paths, noisy.series_uid, network, settings, tmp_path / "c", NOW)
    assert network.calls == 2 and len(outcome.files) == 3


def test_offline_a_noise_free_series_is_ignored_with_the_shipped_floor(
    tmp_path: Path, mr_series_factory: Any
) -> None:
    """With the shipped model a noise-free series was changed, and the gate failed it
    (local_shift_ratio 3.1): now it is left alone, exit 0, saying why, nothing written; the
    intended-use flag overrides the floor as it overrides the rest of the intended use."""
    source = mr_series_factory(slices=3, rows=96, columns=96, noise_sigma=0.0)
    config = str(minimal_config(tmp_path))
    result = CliRunner().invoke(
        main, ["denoise", str(source.directory), str(tmp_path / "a"), "--config", config]
    )
    assert result.exit_code == 0, result.output
    assert re.search(
        r"ignored, nothing to denoise: noise reads 0\.\d\d % of the bright level, under the 3\.1 %",
        result.stdout,
    ), result.stdout
    assert not list((tmp_path / "a").rglob("*.dcm"))
    result = CliRunner().invoke(
        main,
        [
            "denoise",
            str(source.directory),
            str(tmp_path / "b"),
            "--config",
            config,
            "--override-intended-use",
            "--no-gate",
        ],
    )
    assert result.exit_code == 0, result.output
    assert len(list((tmp_path / "b").glob("*.dcm"))) == 3

