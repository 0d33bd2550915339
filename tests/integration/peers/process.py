"""A peer process started by a test and stopped by its PID, with its log for failures."""

from __future__ import annotations

import os
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path


class PeerDied(RuntimeError):
    """A peer process exited on its own; the message carries the end of its log."""


@dataclass
class ManagedProcess:
    popen: subprocess.Popen[bytes]
    log: Path

    @classmethod
    def start(
        cls, command: list[str], *, log: Path, env: dict[str, str], cwd: Path | None = None
    ) -> ManagedProcess:
        with log.open("ab") as out:
            popen = subprocess.Popen(
                command,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=cwd,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        return cls(popen, log)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def check_alive(self) -> bool:
        """True while running; raises PeerDied (with the log) once it has exited."""
        code = self.popen.poll()
        if code is None:
            return True
        raise PeerDied(
            f"{self.popen.args!r} exited with {code}; log {self.log}:\n{self.log_tail()}"
        )

    def terminate(self) -> None:
        """SIGTERM by PID, without waiting (Orthanc takes about 3 s to shut down)."""
        if self.popen.poll() is None:
            os.kill(self.popen.pid, signal.SIGTERM)

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM by PID and wait, then SIGKILL if it does not end in time."""
        if self.popen.poll() is not None:
            return
        self.terminate()
        try:
            self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.kill(self.popen.pid, signal.SIGKILL)
            self.popen.wait(timeout=timeout)
