"""The README's two commands, run against stand-ins for apt-get, sudo, python3 and pip that
record their calls: the first works as root without sudo and as a user with sudo; the
second (.ci/run's Python environment) installs into a venv of its own, never the first's."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TEST_VENV = ".venv-test"


def _readme_first_command() -> str:
    """The first indented (code) line of the README: set up and run the node."""
    for line in (ROOT / "README.md").read_text().splitlines():
        if line.startswith("    ") and line.strip():
            return line.strip()
    raise AssertionError("the README has no command")


def _stub(path: Path, body: str) -> None:
    path.write_text(f"#!/bin/bash\nprintf '%s\\n' \"{path.name} $*\" >> \"$CALLS\"\n{body}\n")
    path.chmod(0o755)


# `python3 -m venv DIR` makes DIR/bin with python, pip, denoised-node and activate, each a
# recorder too; `python -c "import torch"` succeeds only where $HAS_TORCH is set.
_PYTHON = r"""
if [ "$1" = -m ] && [ "$2" = venv ]; then
    /bin/mkdir -p "$3/bin"
    for tool in python pip denoised-node; do
        printf '#!/bin/bash\nprintf "%%s\\n" "%s $*" >> "$CALLS"\n' "$3/bin/$tool" > "$3/bin/$tool"
        printf '[ "$1" != -c ] || [ -n "$HAS_TORCH" ]\n' >> "$3/bin/$tool"
        /bin/chmod 755 "$3/bin/$tool"
    done
    printf 'VIRTUAL_ENV=%s\nPATH="%s/bin:$PATH"\n' "$3" "$3" > "$3/bin/activate"
fi
[ "$1" != --version ] || echo "Python 3.11.2"
"""


@pytest.fixture
def stubs(tmp_path: Path) -> Path:
    folder = tmp_path / "stubs"
    folder.mkdir()
    _stub(folder / "apt-get", "")
    _stub(folder / "python3", _PYTHON)
    (folder / "sh").symlink_to(shutil.which("sh") or "/bin/sh")
    return folder


def _run(command: str, cwd: Path, path: str, **env: str) -> tuple[int, list[str]]:
    calls = cwd / "calls.log"
    done = subprocess.run(["/bin/bash", "-c", command], cwd=cwd, capture_output=True, text=True,
                          timeout=60, check=False,
                          env={"PATH": path, "CALLS": str(calls), "HOME": str(cwd), **env})
    lines = calls.read_text().splitlines() if calls.exists() else []
    return done.returncode, lines + ([done.stderr.strip()] if done.stderr.strip() else [])


def _work(tmp_path: Path) -> Path:
    work = tmp_path / "clone"
    work.mkdir()
    return work


def test_first_command_as_root_without_sudo(tmp_path: Path, stubs: Path) -> None:
    code, calls = _run(_readme_first_command(), _work(tmp_path), str(stubs))
    assert code == 0, calls
    assert not any("sudo" in call for call in calls), calls
    apt = [call for call in calls if call.startswith("apt-get ")]
    assert apt[-1] == "apt-get install -y python3-venv"
    assert calls[len(apt):] == [
        "python3 -m venv .venv", ".venv/bin/pip install torch==2.13.0",
        ".venv/bin/pip install .", ".venv/bin/denoised-node serve"]


def test_first_command_as_a_user_with_sudo(tmp_path: Path, stubs: Path) -> None:
    _stub(stubs / "sudo", 'exec "$@"')
    code, calls = _run(_readme_first_command(), _work(tmp_path), str(stubs))
    assert code == 0, calls
    assert calls[0].startswith("sudo ") and "apt-get install -y python3-venv" in calls[0]
    assert "apt-get install -y python3-venv" in calls
    assert calls[-1] == ".venv/bin/denoised-node serve"


def _test_env(tmp_path: Path, stubs: Path, **env: str) -> tuple[Path, int, list[str]]:
    """.ci/run's Python environment part, sourced as .ci/run sources it, in a copy of the
    repository so the stand-ins record instead of installing."""
    repo = _work(tmp_path)
    (repo / ".ci").mkdir()
    shutil.copy(ROOT / ".ci" / "test-env", repo / ".ci" / "test-env")
    script = 'set -euo pipefail; REPO="$(pwd)"; log() { :; }; . "$REPO/.ci/test-env"'
    code, calls = _run(script, repo, str(stubs), **env)
    return repo, code, [call for call in calls if not call.endswith(" --version")]


def test_the_tests_install_into_their_own_venv(tmp_path: Path, stubs: Path) -> None:
    repo, code, calls = _test_env(tmp_path, stubs)
    assert code == 0, calls
    venv = repo / TEST_VENV
    assert calls == [
        f"python3 -m venv {venv}",
        f"{venv}/bin/python -c import torch",
        f"{venv}/bin/python -m pip install -q torch==2.13.0",  # first, and pinned
        f"{venv}/bin/python -m pip install -q -e {repo}[test,train,postgres,lint]",
        f"{venv}/bin/python -m pip install -q --no-deps nimare pydicom-data",
    ]  # data the model reads
    assert not (repo / ".venv").exists()


def test_the_tests_keep_an_installed_torch(tmp_path: Path, stubs: Path) -> None:
    _, code, calls = _test_env(tmp_path, stubs, HAS_TORCH="1")
    assert code == 0, calls
    assert not any("torch==" in call for call in calls)


def test_the_two_commands_use_two_venvs() -> None:
    first = re.search(r"python3 -m venv (\S+)", _readme_first_command())
    assert first and first.group(1).rstrip("/") != TEST_VENV
    assert (ROOT / ".ci" / "test-env").read_text().count(f'"$REPO/{TEST_VENV}"') == 1
    assert ". \"$REPO/.ci/test-env\"" in (ROOT / ".ci" / "run").read_text()
    ignored = (ROOT / ".gitignore").read_text().split()
    assert f"{TEST_VENV}/" in ignored or TEST_VENV in ignored, f"{TEST_VENV} is not in .gitignore"


def test_the_tests_keep_off_a_running_nodes_data() -> None:
    """The first command's node keeps its data in ~/.local/share/denoised-node: a test that
    runs a command without --config must not open that database (tests/conftest.py)."""
    import os

    from denoised_node.config.settings import default_data_dir

    assert Path.home() / ".local" / "share" not in default_data_dir().parents
    assert not [name for name in os.environ if name.startswith("DENOISED_NODE_")]
