"""The overview's health rows: the readiness checks (cheap, read at each page load) and the
slow ones (C-ECHO to each destination, the GPU, the model file), which run on a thread of
their own and are kept for a minute so a page never waits on the network.

The serve process never imports torch (hundreds of MB, seconds): the model card is read from
the safetensors header (model.card), and the GPU from nvidia-smi.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from denoised_node.config.settings import AnyDestination, Settings
from denoised_node.daemon.web.formatting import when
from denoised_node.daemon.web.probes import CheckResult, Probe

log = logging.getLogger(__name__)

REFRESH_SECONDS = 60.0


@dataclass(frozen=True)
class HealthRow:
    name: str
    ok: bool | None  # None: not checked yet
    detail: str
    age_seconds: float | None = None  # how old a slow check's result is
    # Older than two refreshes: the check itself hangs (an echo waiting out its timeout),
    # so its last answer may no longer be true.
    stale: bool = False


class SlowChecks:
    """Runs ``checks`` in the background when their results are older than ``refresh``."""

    def __init__(self, checks: Sequence[tuple[str, Probe]],
                 refresh: float = REFRESH_SECONDS) -> None:
        self.checks = list(checks)
        self.refresh = refresh
        self._lock = threading.Lock()
        self._results: dict[str, tuple[CheckResult, float]] = {}
        self._checked_at: float | None = None
        self._running = False

    def rows(self, wait: float = 0.0) -> list[HealthRow]:
        """The latest results; starts a refresh when stale and waits at most ``wait``."""
        thread = self._refresh_if_stale()
        if thread is not None and wait > 0:
            thread.join(wait)
        now = time.monotonic()
        with self._lock:
            results = dict(self._results)
        rows = []
        for name, _ in self.checks:
            if name in results:
                result, at = results[name]
                rows.append(HealthRow(name, result.ok, result.detail, now - at,
                                      stale=now - at > 2 * self.refresh))
            else:
                rows.append(HealthRow(name, None, "checking..."))
        return rows

    def _refresh_if_stale(self) -> threading.Thread | None:
        with self._lock:
            fresh = (self._checked_at is not None
                     and time.monotonic() - self._checked_at < self.refresh)
            if self._running or fresh:
                return None
            self._running = True
        thread = threading.Thread(target=self._run, name="status-checks", daemon=True)
        thread.start()
        return thread

    def _run(self) -> None:
        try:
            for name, check in self.checks:
                try:
                    result = check()
                except Exception as exc:  # noqa: BLE001 - a failing check is a finding
                    result = CheckResult(False, f"{type(exc).__name__}: {exc}".splitlines()[0])
                with self._lock:
                    self._results[name] = (result, time.monotonic())
        finally:
            with self._lock:
                self._running = False
                self._checked_at = time.monotonic()


@dataclass
class ConfigState:
    """When the running config was loaded and how the last reload went (daemon/reload.py
    decides; serve records it here for /metrics and the "config" row)."""

    loaded_at: float  # Unix time
    last_reload_ok: bool = True
    last_error: str = ""
    refused_at: float | None = None  # the last refused reload (Unix time)

    @classmethod
    def started(cls) -> ConfigState:
        return cls(time.time())

    def accepted(self) -> None:
        self.loaded_at, self.last_reload_ok, self.last_error = time.time(), True, ""

    def refused(self, reason: str) -> None:
        self.last_reload_ok, self.last_error, self.refused_at = False, reason, time.time()


def config_row(state: ConfigState) -> HealthRow:
    """When the running config was loaded, and a refused `systemctl reload` with its reason."""
    loaded = when(datetime.fromtimestamp(state.loaded_at, UTC))
    if state.last_reload_ok or state.refused_at is None:
        return HealthRow("config", True, f"loaded {loaded}")
    refused = when(datetime.fromtimestamp(state.refused_at, UTC))
    return HealthRow("config", False, f"reload refused {refused}: {state.last_error}; "
                                      f"the config loaded {loaded} still runs")


def slow_checks(settings: Settings) -> SlowChecks:
    checks: list[tuple[str, Probe]] = [
        ("model file", lambda: model_file(settings.model.checkpoint)),
        ("gpu", lambda: gpu(settings.model.device)),
    ]
    for destination in settings.destinations:
        checks.append((f"destination {destination.name}", _echo_check(settings, destination)))
    if not settings.destinations:
        checks.append(("destinations", lambda: CheckResult(
            False, "none configured: derived series go nowhere")))
    return SlowChecks(checks)


def _echo_check(settings: Settings, destination: AnyDestination) -> Probe:
    def check() -> CheckResult:
        from denoised_node.daemon.dicom.scu import SendError
        from denoised_node.daemon.jobs.destinations import echo

        try:
            answer = echo(settings, destination)  # C-ECHO, or QIDO-RS for a DICOMweb one
        except SendError as exc:
            return CheckResult(False, str(exc))
        return CheckResult(answer.ok, f"{answer.facts['where']}: {answer.detail}")

    return check


def model_file(checkpoint: str) -> CheckResult:
    from denoised_node.model.card import read_card, resolve_checkpoint, verify_sidecar
    from denoised_node.model.errors import ModelError

    path = resolve_checkpoint(checkpoint)
    if not path.is_file():
        return CheckResult(False, f"model.checkpoint {path} does not exist")
    try:
        card = read_card(path)
        detail = f"{card.name} version {card.version} ({card.identity})"
        if verify_sidecar(path):
            detail += f"; sha256 matches {path.with_suffix('.json').name}"
    except ModelError as exc:
        return CheckResult(False, str(exc))
    return CheckResult(True, detail)


def gpu(device: str, run: Callable[..., subprocess.CompletedProcess[str]] = subprocess.run,
        ) -> CheckResult:
    if device == "cpu":
        return CheckResult(True, "not used (model.device = \"cpu\")")
    wanted = device.startswith("cuda")
    smi = shutil.which("nvidia-smi")
    if smi is None:
        if wanted:
            return CheckResult(False, f"model.device is {device} but no NVIDIA driver is "
                               "installed (nvidia-smi not found)")
        return CheckResult(True, "none (nvidia-smi not found); the workers run on the CPU")
    try:
        answer = run([smi, "--query-gpu=name,memory.used,memory.total,utilization.gpu",
                      "--format=csv,noheader,nounits"], capture_output=True, text=True,
                     timeout=15, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return CheckResult(False, f"nvidia-smi: {exc}")
    if answer.returncode != 0:
        message = (answer.stderr or answer.stdout).strip().splitlines()
        return CheckResult(False, "nvidia-smi failed: " + (message[0] if message else
                                                            f"exit status {answer.returncode}"))
    gpus = []
    for line in answer.stdout.strip().splitlines():
        name, used, total, busy = (part.strip() for part in line.split(","))
        gpus.append(f"{name}: {_gib(used)} of {_gib(total)} GiB used, {busy} % busy")
    return CheckResult(bool(gpus), "; ".join(gpus) or "nvidia-smi lists no GPU")


def _gib(mib: str) -> str:
    try:
        return f"{float(mib) / 1024:.1f}"
    except ValueError:
        return mib
