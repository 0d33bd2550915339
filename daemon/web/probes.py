"""The probes behind /healthz and /readyz: each check returns whether that part of the node can
do its job now; Readiness asks them all."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Engine, text

from denoised_node.storage.files import FileStore


@dataclass(frozen=True)
class CheckResult:
    ok: bool
    detail: str


# A health or readiness probe: a quick call that says ok or not, and why (doctor_check.Check is the
# slower, fuller finding `denoised-node doctor` prints).
Probe = Callable[[], CheckResult]


class Readiness:
    """Named checks; ready when every one passes. A check that raises has failed."""

    def __init__(self, checks: Sequence[tuple[str, Probe]]) -> None:
        self.checks = list(checks)

    def report(self) -> tuple[bool, dict[str, dict[str, Any]]]:
        results: dict[str, dict[str, Any]] = {}
        for name, check in self.checks:
            try:
                result = check()
            except Exception as exc:  # noqa: BLE001 - a failing check is a finding, not a crash
                result = CheckResult(False, f"{type(exc).__name__}: {exc}".splitlines()[0])
            results[name] = {"ok": result.ok, "detail": result.detail}
        return all(r["ok"] for r in results.values()), results


def database(engine: Engine) -> Probe:
    def check() -> CheckResult:
        with engine.connect() as connection:
            connection.execute(text("SELECT 1"))
        return CheckResult(True, f"{engine.dialect.name} reachable")

    return check


def model_loaded(ready_workers: Callable[[], int], configured: int) -> Probe:
    """At least one local worker said READY=1 (its model is loaded). With worker.count = 0
    the workers run elsewhere and are not this node's to check."""

    def check() -> CheckResult:
        if configured == 0:
            return CheckResult(True, "no local workers (worker.count = 0)")
        ready = ready_workers()
        if ready == 0:
            return CheckResult(False, f"no worker has loaded the model yet (0 of {configured})")
        return CheckResult(True, f"{ready} of {configured} worker(s) with the model loaded")

    return check


def disk(store: FileStore, min_free_mb: int) -> Probe:
    def check() -> CheckResult:
        free_mb = store.free_bytes() // 2**20
        detail = f"{free_mb} MiB free, watermark {min_free_mb} MiB"
        if free_mb < min_free_mb:
            return CheckResult(False, detail + ": instances are refused (0xA700)")
        return CheckResult(True, detail)

    return check


def listening(alive: Callable[[], bool], what: str) -> Probe:
    def check() -> CheckResult:
        return CheckResult(alive(), f"{what} {'running' if alive() else 'stopped'}")

    return check
