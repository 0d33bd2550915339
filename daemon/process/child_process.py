"""Starting serve's child processes (workers, receivers) the same way: the node's own
command line, systemd's variables kept for serve, and death with serve."""

from __future__ import annotations

import enum
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from denoised_node.daemon.process.sd_notify import NOTIFY_SOCKET

log = logging.getLogger(__name__)

# A child that keeps dying is restarted after these delays, the last one from then on.
RESTART_DELAYS = (1.0, 2.0, 5.0, 15.0, 60.0)
# Running this long, a child's earlier deaths are forgiven: its next one waits the least.
_HEALTHY_SECONDS = 300.0


class Check(enum.Enum):
    RUNNING = "running"
    DUE = "due"  # dead, and its restart delay is over: start it
    WAITING = "waiting"  # dead, restart delay not over


@dataclass
class ChildSlot:
    """One supervised child process of serve, and when to start it again once it died."""

    index: int
    process: subprocess.Popen[bytes] | None = None
    failures: int = 0  # deaths in a row
    restart_at: float = 0.0
    started_at: float = field(default_factory=time.monotonic)
    # Asked to exit after its work in hand, to start again with a reloaded config.
    reloading: bool = False

    def check(self, now: float, kind: str, index_key: str) -> Check:
        """Notice a death (logged, with the delay before the restart) or a long healthy run."""
        process = self.process
        if process is not None and process.poll() is None:
            if now - self.started_at > _HEALTHY_SECONDS:
                self.failures = 0
            return Check.RUNNING
        if process is not None and self.reloading:
            log.info("%s finished for the reload; starting it with the new config", kind,
                     extra={index_key: self.index, "pid": process.pid})
            self.process, self.reloading = None, False
            return Check.DUE
        if process is not None:
            self.failures += 1
            delay = restart_delay(self.failures)
            self.restart_at = now + delay
            log.error("%s exited; restarting in %.0f s", kind, delay,
                      extra={index_key: self.index, "pid": process.pid,
                             "exit_status": process.returncode})
            self.process = None
        return Check.DUE if now >= self.restart_at else Check.WAITING


def restart_delay(failures: int) -> float:
    return RESTART_DELAYS[min(max(failures, 1), len(RESTART_DELAYS)) - 1]


def node_command(command: str, config_path: Path | None, *options: str) -> list[str]:
    """`denoised-node COMMAND` as this interpreter runs it."""
    argv = [sys.executable, "-m", "denoised_node.daemon.cli.main", command]
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
    # preexec_fn only calls prctl (async-signal-safe), so serve's threads cannot deadlock it.
    return subprocess.Popen(command, preexec_fn=_die_with_parent, env=env,  # noqa: PLW1509
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
