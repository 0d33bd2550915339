"""The systemd units: `systemd-analyze verify` passes, the exposure score is what the docs say,
the directives the service relies on are there, and sysusers.d/tmpfiles.d work in a temp root.
systemd need not run as PID 1 for any of this."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from denoised_node.daemon import supervisor

ROOT = Path(__file__).resolve().parents[2]
UNITS = ROOT / "systemd"
SERVICES = ["denoised-node.service", "denoised-node-worker.service"]
INSTALLED_BINARY = "/opt/denoised-node/bin/denoised-node"
MAX_EXPOSURE = 2.0


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        if os.environ.get("CI"):
            pytest.fail(f"{name} is missing (Debian package systemd)")
        pytest.skip(f"{name} is missing: apt-get install systemd")
    return path


def _directives(text: str) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith(("#", "[")) and "=" in line:
            key, value = line.split("=", 1)
            found.setdefault(key, []).append(value)
    return found


def _installed_copy(name: str, tmp_path: Path) -> Path:
    """The unit with ExecStart= on a binary that exists here (verify checks it)."""
    binary = shutil.which("denoised-node") or str(Path(sys.executable).parent / "denoised-node")
    if not Path(binary).exists():
        binary = sys.executable
    copy = tmp_path / name
    copy.write_text((UNITS / name).read_text().replace(INSTALLED_BINARY, binary))
    return copy


@pytest.mark.parametrize("name", SERVICES)
def test_unit_verifies(name: str, tmp_path: Path) -> None:
    done = subprocess.run(
        [_tool("systemd-analyze"), "verify", str(_installed_copy(name, tmp_path))],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    complaints = [line for line in done.stderr.splitlines() if name in line]
    assert complaints == []


def _exposure(unit: Path) -> float:
    done = subprocess.run([_tool("systemd-analyze"), "security", "--offline=true", str(unit)],
                          capture_output=True, text=True, timeout=60, check=False)
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d)", done.stdout)
    assert match, done.stdout + done.stderr
    return float(match.group(1))


@pytest.mark.parametrize("name", SERVICES)
def test_exposure_score_is_low_and_documented(name: str, tmp_path: Path) -> None:
    score = _exposure(_installed_copy(name, tmp_path))
    assert score <= MAX_EXPOSURE
    operations = (ROOT / "docs" / "operations.md").read_text()
    documented = re.search(rf"`{re.escape(name)}`[^\n]*?exposure level (\d+\.\d)", operations)
    assert documented, f"docs/operations.md should record {name}'s exposure level"
    assert float(documented.group(1)) == score


def test_service_directives() -> None:
    unit = _directives((UNITS / "denoised-node.service").read_text())
    expected = {
        "Type": "notify", "NotifyAccess": "main", "Restart": "on-failure", "KillMode": "mixed",
        "User": "denoised-node", "StateDirectory": "denoised-node",
        "ConfigurationDirectory": "denoised-node", "NoNewPrivileges": "yes",
        "ProtectSystem": "strict", "ProtectHome": "yes", "PrivateTmp": "yes",
        "PrivateDevices": "no", "DevicePolicy": "closed", "DeviceAllow": "char-nvidia* rw",
    }
    for key, value in expected.items():
        assert value in unit.get(key, []), f"{key}={value}"
    assert set(unit["RestrictAddressFamilies"][0].split()) >= {"AF_UNIX", "AF_INET", "AF_INET6"}
    assert "MemoryDenyWriteExecute" not in unit  # CUDA's JIT needs W+X mappings
    assert "ProcSubset" not in unit  # the CUDA driver reads /proc/driver/nvidia
    assert int(unit["WatchdogSec"][0]) >= 10
    # systemd waits longer than serve gives its workers (60 s, then 10 s after a second TERM).
    assert int(unit["TimeoutStopSec"][0]) > supervisor._WORKER_STOP_SECONDS + 10
    assert unit["ExecStart"][0].startswith(INSTALLED_BINARY + " serve --config /etc/")
    assert unit["ExecReload"] == ["/bin/kill -HUP $MAINPID"]  # serve's SIGHUP: reload


def test_sysusers_and_tmpfiles_in_a_temp_root(tmp_path: Path) -> None:
    sysusers, tmpfiles = _tool("systemd-sysusers"), _tool("systemd-tmpfiles")
    root = tmp_path / "root"
    for folder, source in (("usr/lib/sysusers.d", "denoised-node.sysusers"),
                           ("usr/lib/tmpfiles.d", "denoised-node.tmpfiles")):
        (root / folder).mkdir(parents=True)
        shutil.copy(UNITS / source, root / folder / "denoised-node.conf")
    (root / "etc").mkdir()
    for command in ([sysusers, f"--root={root}"], [tmpfiles, f"--root={root}", "--create"]):
        done = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
        assert done.returncode == 0, done.stderr
    users = {line.split(":")[0]: line.split(":") for line in
             (root / "etc" / "passwd").read_text().splitlines()}
    user = users["denoised-node"]
    assert user[5] == "/var/lib/denoised-node" and user[6].endswith("nologin")
    groups = {line.split(":")[0]: line.split(":") for line in
              (root / "etc" / "group").read_text().splitlines()}
    assert "denoised-node" in groups["video"][3].split(",")
    state, config = (root / "var/lib/denoised-node").stat(), (root / "etc/denoised-node").stat()
    assert (state.st_uid, state.st_mode & 0o777) == (int(user[2]), 0o750)
    assert (config.st_uid, config.st_gid, config.st_mode & 0o777) == (
        0, int(groups["denoised-node"][2]), 0o750)


def test_readme_installs_the_units_that_exist() -> None:
    readme = (ROOT / "README.md").read_text()
    named = set(re.findall(r"(?<![\w/])systemd/([\w.-]+)", readme))
    assert {"denoised-node.service", "denoised-node.sysusers", "denoised-node.tmpfiles"} <= named
    for name in named:
        assert (UNITS / name).is_file(), name


@pytest.mark.parametrize("name", SERVICES)
def test_documentation_names_what_exists_after_the_install(name: str) -> None:
    """pip installs no file under /usr/share/doc (nor a man page): a file: or man: link
    there would show in `systemctl status` and lead nowhere."""
    for uri in _directives((UNITS / name).read_text()).get("Documentation", []):
        for part in uri.split():
            assert part.startswith(("https://", "http://")), part
