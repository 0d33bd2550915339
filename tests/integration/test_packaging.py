"""The wheel built from the repository installs into a clean venv and runs from there, and an
unconfigured `denoised-node serve` comes up on its embedded defaults."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.integration.node import NODE_AET
from tests.integration.peers import ManagedProcess, echoscu, free_port
from tests.integration.peers.tools import wait_until

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def _run(*command: str, cwd: Path | None = None, timeout: float = 900) -> str:
    done = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          check=False)
    assert done.returncode == 0, (
        f"{' '.join(command)}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    )
    return done.stdout


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    _run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(out), str(REPO))
    (built,) = out.glob("denoised_node-*.whl")
    return built


def test_wheel_holds_one_import_package_and_the_model(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    top = {name.split("/")[0] for name in names if not name.split("/")[0].endswith(".dist-info")}
    assert top == {"denoised_node"}
    for part in ("daemon", "model", "storage", "config"):
        assert any(n.startswith(f"denoised_node/{part}/") for n in names)
    assert "denoised_node/model/checkpoints/default.safetensors" in names
    assert "denoised_node/config/denoised-node.example.toml" in names
    assert any(n.startswith("denoised_node/storage/migrations/versions/0001") for n in names)
    assert not any(n.startswith("denoised_node/tests") for n in names)


def test_wheel_installs_and_runs_in_a_clean_venv(wheel: Path, tmp_path: Path,
                                                 mr_series_factory) -> None:  # type: ignore[no-untyped-def]
    venv = tmp_path / "venv"
    _run(sys.executable, "-m", "venv", str(venv))
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q"]
    _run(*pip, "torch==2.13.0")  # first, as the README says: the CPU build
    _run(*pip, str(wheel))
    tool = str(venv / "bin" / "denoised-node")
    assert "version" in _run(tool, "--version")
    source = mr_series_factory(slices=3, rows=160, columns=160)
    config = tmp_path / "node.toml"
    config.write_text(f'[node]\ndata_dir = "{tmp_path / "data"}"\n[model]\ndevice = "cpu"\n')
    out = _run(tool, "denoise", str(source.directory), str(tmp_path / "out"), "--config",
               str(config), cwd=tmp_path)
    assert "3 derived instance(s)" in out
    assert "schema upgraded" in _run(tool, "db", "upgrade", "--config", str(config))
    site = next((venv / "lib").glob("python3*/site-packages"))
    assert (site / "denoised_node" / "daemon" / "cli" / "main.py").is_file()
    assert not (site / "daemon").exists() and not (site / "config").exists()


def test_serve_without_config_runs_on_embedded_defaults(tmp_path: Path) -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("DENOISED_NODE_")}
    # No config file at all; only the port moves (11112 may be taken on a test machine).
    env.update({"XDG_DATA_HOME": str(tmp_path / "xdg"), "DENOISED_NODE_NODE__PORT": str(port),
                "DENOISED_NODE_HTTP__ENABLED": "false"})
    process = ManagedProcess.start([sys.executable, "-m", "denoised_node.daemon.cli.main", "serve"],
                                   log=tmp_path / "serve.log", env=env, cwd=tmp_path)
    try:
        wait_until(lambda: process.check_alive() and echoscu("127.0.0.1", port, NODE_AET),
                   timeout=120, what="the unconfigured node's C-ECHO")
        assert (tmp_path / "xdg" / "denoised-node" / "node.db").is_file()
        wait_until(lambda: "worker started" in process.log.read_text(), timeout=120,
                   what="the worker to load the shipped model")
    finally:
        process.stop(timeout=60)
    assert process.popen.returncode == 0
