"""Fixtures that start real peers: Orthanc (the PACS) and DCMTK's storescp (a receiver).

Outside CI a missing binary skips the test with the package to install; in CI (CI=1) it fails.
Every process is started on free ports of 127.0.0.1 and stopped by its PID in teardown.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from tests.integration.peers import (
    ManagedProcess,
    Modality,
    Orthanc,
    StoreSCP,
    free_port,
    skip_or_fail,
    start_orthanc,
    start_storescp,
)

NODE_AET = "DENOISER"
HERE = Path(__file__).resolve().parent

if TYPE_CHECKING:
    from tests.integration.test_monitoring_service import Notifications


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if HERE in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def process_reaper() -> Iterator[list[ManagedProcess]]:
    """Peers told to stop (SIGTERM) in a test's teardown are waited for once, at the end."""
    stopping: list[ManagedProcess] = []
    yield stopping
    for process in stopping:
        process.stop()


@pytest.fixture
def node_port() -> int:
    """A free port for the node under test; the `orthanc` fixture declares it as DENOISER."""
    return free_port()


@pytest.fixture
def orthanc_factory(
    tmp_path_factory: pytest.TempPathFactory, process_reaper: list[ManagedProcess]
) -> Iterator[Callable[..., Orthanc]]:
    """start(**kwargs of start_orthanc) -> Orthanc; every one started is stopped afterwards."""
    started: list[Orthanc] = []

    def start(**kwargs: Any) -> Orthanc:
        orthanc = start_orthanc(tmp_path_factory.mktemp("orthanc"), **kwargs)
        started.append(orthanc)
        return orthanc

    yield start
    for orthanc in reversed(started):
        orthanc.process.terminate()
        process_reaper.append(orthanc.process)


@pytest.fixture
def orthanc(
    request: pytest.FixtureRequest, orthanc_factory: Callable[..., Orthanc], node_port: int
) -> Orthanc:
    """Orthanc (AET ORTHANC) with the node declared as modality DENOISER at node_port.

    Parameterise with indirect=True and a dict of start_orthanc keywords, e.g.
    `@pytest.mark.parametrize("orthanc", [{"overwrite_instances": True}], indirect=True)`.
    """
    options: dict[str, Any] = dict(getattr(request, "param", None) or {})
    modalities = {NODE_AET: Modality(NODE_AET, node_port), **options.pop("modalities", {})}
    return orthanc_factory(modalities=modalities, **options)


@pytest.fixture
def storescp_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., StoreSCP]]:
    """start(aet="STORESCP", **kwargs) -> StoreSCP receiving into a fresh temp folder."""
    started: list[StoreSCP] = []

    def start(**kwargs: Any) -> StoreSCP:
        scp = start_storescp(tmp_path_factory.mktemp("storescp") / "received", **kwargs)
        started.append(scp)
        return scp

    yield start
    for scp in reversed(started):
        scp.stop()


@pytest.fixture
def storescp(storescp_factory: Callable[..., StoreSCP]) -> StoreSCP:
    """A DCMTK storescp (AET STORESCP) on a free port, accepting every transfer syntax."""
    return storescp_factory()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """Debian's chromium driven by Playwright, one a module (the status-page tests)."""
    from tests.integration.test_web_browser import CHROMIUM, CHROMIUM_ARGS

    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        skip_or_fail(
            "the playwright package is not installed (pip install -e .[test])", "CI must have it"
        )
    if not shutil.which(CHROMIUM):
        skip_or_fail(f"{CHROMIUM} is not installed (apt-get install chromium)", "CI must have it")
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield launched
        launched.close()


@pytest.fixture
def notifications() -> Iterator[Notifications]:
    """A webhook receiver on loopback (the monitoring and reload tests)."""
    from tests.integration.test_monitoring_service import Notifications

    box = Notifications()
    yield box
    box.listener.close()
