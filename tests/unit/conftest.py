"""Unit-test fixtures: settings in a temp dir, a migrated SQLite database, a file store."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from denoised_node.config.settings import Settings, load_settings
from denoised_node.storage.db import make_engine
from denoised_node.storage.runtime import Runtime, open_runtime
from denoised_node.storage.schema import upgrade


def make_settings(directory: Path, **overrides: Any) -> Settings:
    """Settings with data in ``directory``/data and the gate off (the fake denoiser is not a
    real model); keyword args are env-style overrides, e.g. series__idle_seconds=0."""
    env = {"DENOISED_NODE_NODE__DATA_DIR": str(directory / "data"),
           "DENOISED_NODE_NODE__MIN_FREE_MB": "0", "DENOISED_NODE_GATE__ENABLED": "false"}
    for key, value in overrides.items():
        text = str(value).lower() if isinstance(value, bool) else str(value)
        env[f"DENOISED_NODE_{key.upper()}"] = text
    return load_settings(None, environ=env)


@pytest.fixture
def settings_factory(tmp_path: Path) -> Callable[..., Settings]:
    """make(**env) -> make_settings(tmp_path, **env)."""

    def make(**overrides: Any) -> Settings:
        return make_settings(tmp_path, **overrides)

    return make


@pytest.fixture
def settings(settings_factory: Callable[..., Settings]) -> Settings:
    return settings_factory()


@pytest.fixture
def runtime(settings: Settings) -> Runtime:
    upgrade(make_engine(settings.database_url))
    return open_runtime(settings)


class ScaledDenoiser:
    """A stand-in for the network in unit tests: pulls every value a little towards the
    slice mean, deterministic, with the interface the worker uses."""

    identity = "unit-test-model-1"

    class card:  # noqa: N801 - mimics the model card's attributes
        name = "unit-test"
        version = "1.0"

    def __init__(self, factor: float = 0.9) -> None:
        self.factor = factor
        self.calls = 0

    def denoise(self, volume: np.ndarray, progress: Any = None, spacing: Any = None) -> np.ndarray:
        self.calls += 1
        mean = volume.mean(axis=(1, 2), keepdims=True)
        out = (mean + (volume - mean) * self.factor).astype(np.float32)
        if progress:
            progress(len(volume), len(volume))
        return out


@pytest.fixture
def fake_denoiser() -> ScaledDenoiser:
    return ScaledDenoiser()


@pytest.fixture
def tiny(tmp_path: Path) -> Path:
    """A tiny 2.5D checkpoint (tests/fixtures/tiny_model.py), weights nudged off the identity."""
    from tests.fixtures.tiny_model import tiny_checkpoint

    path = tmp_path / "tiny.safetensors"
    tiny_checkpoint(path)
    return path
