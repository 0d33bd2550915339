"""Test-wide setup: make `tests.*` importable however pytest is started, and data fixtures.

`python -m pytest` puts the repository root on sys.path, plain `pytest` does not: insert it
before anything imports `tests.fixtures`.
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import os  # noqa: E402

if os.environ.get("PYTEST_XDIST_WORKER"):
    # The xdist workers share the cores: one torch thread each (set before torch is imported),
    # or two workers with two threads spin against each other on a 2-core machine.
    os.environ.setdefault("OMP_NUM_THREADS", "1")

import itertools  # noqa: E402
from collections.abc import Callable, Iterator  # noqa: E402
from typing import Any  # noqa: E402

import pytest  # noqa: E402

from tests.fixtures.mr_series import GeneratedSeries, MRSeriesSpec, generate_series  # noqa: E402


@pytest.fixture(autouse=True, scope="session")
def _apart_from_a_running_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Never the data, config or environment of a node serving on this machine (the README's
    first command keeps its data in ~/.local/share/denoised-node): a command run without
    --config gets a data folder of the session's own; processes started inherit it."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("XDG_DATA_HOME", str(tmp_path_factory.mktemp("xdg-data-home")))
        for name in [name for name in os.environ if name.startswith("DENOISED_NODE_")]:
            patch.delenv(name)
        yield


@pytest.fixture
def mr_series_factory(tmp_path: Path) -> Callable[..., GeneratedSeries]:
    """make(spec=None, **overrides) -> GeneratedSeries written into a new folder of tmp_path."""
    counter = itertools.count(1)

    def make(spec: MRSeriesSpec | None = None, **overrides: Any) -> GeneratedSeries:
        return generate_series(tmp_path / f"series{next(counter)}", spec, **overrides)

    return make


@pytest.fixture
def mr_series(mr_series_factory: Callable[..., GeneratedSeries]) -> GeneratedSeries:
    """A small axial T1-like series: 12 slices of 64x56, Explicit VR Little Endian."""
    return mr_series_factory()
