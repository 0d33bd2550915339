"""A worker's memory per series is bounded (issue 29, item 6: two 4096x4096 slices, under
node.max_instance_mb, took a worker to 9.5 GB for a 7-minute batch). A batch holds at most
model.batch_pixels pixels; a slice over model.max_slice_pixels, or a stack over
model.max_stack_mb, is left out with the reason, and a series of nothing else is ignored."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from denoised_node.config.settings import Settings
from denoised_node.daemon.jobs.pipeline import denoise_series
from denoised_node.model.inference import Denoiser
from denoised_node.storage.images.series import NothingToDenoise
from tests.fixtures.mr_series import GeneratedSeries

NOW = datetime(2026, 12, 3, 10, 0, 0, tzinfo=UTC)


class _Identity:
    identity = "identity"
    card = None

    def __init__(self) -> None:
        self.volumes: list[tuple[int, ...]] = []

    def denoise(self, volume: np.ndarray, progress: Any = None, spacing: Any = None) -> np.ndarray:
        self.volumes.append(volume.shape)
        return volume


def test_slices_over_the_pixel_limit_are_left_out_with_the_reason(
        mr_series_factory: Callable[..., GeneratedSeries],
        settings_factory: Callable[..., Settings], tmp_path: Path) -> None:
    small = mr_series_factory(slices=3, rows=32, columns=32)
    large = mr_series_factory(slices=2, rows=96, columns=96, seed=5,
                              study=small.spec.effective_study,
                              extra={"SeriesInstanceUID": small.series_uid})
    settings = settings_factory(model__max_slice_pixels=64 * 64)
    network = _Identity()
    outcome = denoise_series(small.paths + large.paths, small.series_uid, network, settings,
                             tmp_path / "out", NOW)
    assert network.volumes == [(3, 32, 32)]  # the 96x96 stack never reached the network
    assert len(outcome.files) == 3
    reasons = dict(outcome.skipped)
    assert set(reasons) == set(large.sop_instance_uids)
    assert all("96x96 pixels, over model.max_slice_pixels (4096)" in r for r in reasons.values())
    with pytest.raises(NothingToDenoise, match="over model.max_slice_pixels"):
        denoise_series(large.paths, small.series_uid, network, settings, tmp_path / "none", NOW)


def test_a_stack_over_the_memory_limit_is_left_out(
        mr_series_factory: Callable[..., GeneratedSeries],
        settings_factory: Callable[..., Settings], tmp_path: Path) -> None:
    series = mr_series_factory(slices=80, rows=64, columns=64)  # 1.25 MiB as float32
    settings = settings_factory(model__max_stack_mb=1)
    with pytest.raises(NothingToDenoise, match=r"MB as float32, over model.max_stack_mb \(1\)"):
        denoise_series(series.paths, series.series_uid, _Identity(), settings,
                       tmp_path / "out", NOW)


def test_a_batch_holds_at_most_batch_pixels(tiny: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    den = Denoiser.load(tiny, device="cpu", batch_size=8, batch_pixels=2 * 48 * 48)
    batches: list[int] = []
    forward = type(den.net).forward

    def spy(net: Any, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        batches.append(int(x.shape[0]))
        return forward(net, x, *args, **kwargs)

    monkeypatch.setattr(type(den.net), "forward", spy)
    volume = np.random.default_rng(0).normal(100, 10, (7, 48, 48)).astype(np.float32)
    out = den.denoise(volume)
    assert batches == [2, 2, 2, 1]  # 8 slices of 48x48 would be 4 times the budget
    batches.clear()
    small = den.denoise(volume[:, :24, :24])  # smaller slices: the whole batch_size
    assert batches == [7]
    one = Denoiser.load(tiny, device="cpu", batch_size=1).denoise(volume)
    np.testing.assert_allclose(out, one, rtol=1e-4, atol=1e-4)  # batching changes nothing
    assert small.shape == (7, 24, 24)
