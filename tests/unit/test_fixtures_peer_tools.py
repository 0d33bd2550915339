"""The rules the peer fixtures follow: skip outside CI, fail in CI, never use Python look-alikes."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from tests.integration.peers import (
    find_tool,
    free_port,
    in_ci,
    nodelay_env,
    require_tool,
    wait_until,
)


@pytest.mark.parametrize(
    "value, expected", [("", False), ("0", False), ("false", False), ("1", True), ("true", True)]
)
def test_ci_is_read_from_the_environment(
    value: str, expected: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CI", value)
    assert in_ci() is expected


def test_a_missing_tool_skips_outside_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="not installed"):
        require_tool("no-such-dicom-tool")


def test_a_missing_tool_fails_in_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CI", "1")
    with pytest.raises(pytest.fail.Exception, match="CI must have every peer"):
        require_tool("no-such-dicom-tool")


def test_python_scripts_never_stand_in_for_dcmtk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = tmp_path / "fake-storescu"
    fake.write_text("#!/usr/bin/env python3\nprint('pynetdicom')\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    assert find_tool("fake-storescu") is None
    found = find_tool("storescu")
    assert found is None or not found.startswith(str(tmp_path))


def test_free_port_is_bindable_and_nodelay_is_set() -> None:
    port = free_port()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))
    assert nodelay_env()["TCP_NODELAY"] == "1"


def test_wait_until_returns_the_value_or_times_out() -> None:
    values = iter([None, 0, "ready"])
    assert wait_until(lambda: next(values), timeout=5, interval=0.01) == "ready"
    with pytest.raises(TimeoutError, match="never"):
        wait_until(lambda: None, timeout=0.05, interval=0.01, what="never")
