"""Starting serve's child processes (workers, receivers) the same way: the node's own
command line, systemd's variables kept for serve, and death with serve."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from denoised_node.daemon.notify import NOTIFY_SOCKET

# A child that keeps dying is restarted after these delays, the last one from then on.
RESTART_DELAYS = (1.0, 2.0, 5.0, 15.0, 60.0)


def restart_delay(failures: int) -> float:
    return RESTART_DELAYS[min(max(failures, 1), len(RESTART_DELAYS)) - 1]


def node_command(command: str, config_path: Path | None, *options: str) -> list[str]:
    """`denoised-node COMMAND` as this interpreter runs it."""
    argv = [sys.executable, "-m", "denoised_node.daemon.cli", command]
    if config_path is not None:
        argv += ["--config", str(config_path)]
    return argv + list(options)


def spawn(command: list[str], *, notify_socket: str | None = None,
          pass_fds: Sequence[int] = ()) -> subprocess.Popen[bytes]:
    env = dict(os.environ)
    for name in (NOTIFY_SOCKET, "WATCHDOG_USEC", "WATCHDOG_PID"):  # systemd's are for serve
        env.pop(name, None)
    if notify_socket:
        env[NOTIFY_SOCKET] = notify_socket
    return subprocess.Popen(command, preexec_fn=_die_with_parent, env=env,
                            pass_fds=tuple(pass_fds))


def _die_with_parent() -> None:
    """In the child, before exec: ask Linux to send SIGTERM when `serve` dies, even by
    SIGKILL, so no orphaned child keeps claiming jobs or accepting associations (it finishes
    what it has in hand)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
