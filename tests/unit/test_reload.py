"""`systemctl reload` (SIGHUP to serve): what a reload accepts and refuses, and how serve's
child processes pick the new config up. serve itself under SIGHUP:
tests/integration/test_config_reload.py."""

from __future__ import annotations

import logging
import re
import socket
import ssl
import sys
import time
from pathlib import Path

import pytest
from cryptography import x509

from denoised_node.config.settings import Settings, load_settings
from denoised_node.daemon.dicom.receive import Receiver
from denoised_node.daemon.dicom.receiver_events import EventReader
from denoised_node.daemon.dicom.receiver_pool import ReceiverPool
from denoised_node.daemon.dicom.scp import start_scp
from denoised_node.daemon.reload import (
    ReloadRefused,
    changed_sections,
    load_for_reload,
    restart_only_changes,
)
from denoised_node.daemon.supervisor import WorkerPool
from denoised_node.daemon.web.health_rows import ConfigState
from denoised_node.daemon.web.pages import StatusPages
from denoised_node.daemon.web.request import Request
from denoised_node.storage.runtime import open_runtime
from tests.fixtures.certificates import Credentials, TestCA
from tests.unit.test_web_pages import _readiness

BASE = """
[node]
port = 11112
data_dir = "{data}"
allowed_calling_ae_titles = ["MODALITY"]

[[destinations]]
name = "pacs"
ae_title = "PACS"
host = "127.0.0.1"
port = 4242
"""


def _write(path: Path, text: str) -> Path:
    path.write_text(text.replace("{data}", str(path.parent / "data")))
    return path


@pytest.fixture
def running(tmp_path: Path) -> tuple[Settings, Path]:
    config = _write(tmp_path / "node.toml", BASE)
    return load_settings(config), config


def test_an_accepted_config_names_what_changed(running: tuple[Settings, Path]) -> None:
    settings, config = running
    _write(config, BASE.replace('"MODALITY"', '"MODALITY", "SCANNER2"').replace("4242", "4243")
           + '\n[[rules]]\nname = "all"\nmatch = {}\n')
    new = load_for_reload(settings, config)
    assert new.node.allowed_calling_ae_titles == ["MODALITY", "SCANNER2"]
    assert new.destinations[0].port == 4243 and new.rules[0].name == "all"
    assert changed_sections(settings, new) == {"node", "destinations", "rules"}
    assert changed_sections(settings, load_for_reload(settings, _write(config, BASE))) == set()


def test_a_file_that_does_not_validate_is_refused_with_the_key(
        running: tuple[Settings, Path]) -> None:
    settings, config = running
    _write(config, BASE.replace("[node]", "[node]\nallowed_calling_ae_title = []"))
    with pytest.raises(ReloadRefused, match="allowed_calling_ae_title"):
        load_for_reload(settings, config)
    _write(config, BASE + "[series\n")
    with pytest.raises(ReloadRefused, match="not valid TOML"):
        load_for_reload(settings, config)


def test_keys_only_a_restart_applies_are_refused_by_name(running: tuple[Settings, Path]) -> None:
    settings, config = running
    _write(config, BASE.replace("port = 11112", "port = 104") + "\n[worker]\ncount = 3\n")
    with pytest.raises(ReloadRefused, match=r"node\.port, worker\.count changed.*restart"):
        load_for_reload(settings, config)
    new = settings.model_copy(update={"database": settings.database.model_copy(
        update={"url": "postgresql://db/node"})})
    assert restart_only_changes(settings, new) == ["database.url"]


def test_certificates_and_models_are_loaded_before_a_reload_is_accepted(
        running: tuple[Settings, Path], tmp_path: Path) -> None:
    settings, config = running
    _write(config, BASE + f"""
[tls]
certificate = "{tmp_path / 'missing.pem'}"
private_key = "{tmp_path / 'missing.key'}"
require_client_certificate = false
""")
    # tls.enabled is a restart-only key: a node already serving TLS reloads its files.
    tls_running = settings.model_copy(update={"tls": settings.tls.model_copy(
        update={"enabled": True})})
    config.write_text(config.read_text().replace("[tls]", "[tls]\nenabled = true"))
    with pytest.raises(ReloadRefused, match="missing.pem"):
        load_for_reload(tls_running, config)
    _write(config, BASE + f'\n[[rules]]\nname = "trial"\nmodel = "{tmp_path / "no.safetensors"}"\n')
    with pytest.raises(ReloadRefused, match="no.safetensors"):
        load_for_reload(settings, config)


def test_config_state_records_the_last_reload() -> None:
    state = ConfigState.started()
    first = state.loaded_at
    state.refused("tls.certificate cannot be read")
    assert (state.loaded_at, state.last_reload_ok) == (first, False)
    time.sleep(0.01)
    state.accepted()
    assert state.last_reload_ok and state.loaded_at > first and state.last_error == ""


def _wait(condition, seconds: float = 5.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_workers_finish_and_restart_at_once_without_counting_a_failure(
        caplog: pytest.LogCaptureFixture) -> None:
    pool = WorkerPool(2, None)
    pool.command = [sys.executable, "-c", "import time; time.sleep(60)"]  # exits on SIGTERM
    pool.start()
    try:
        first = [child.process for child in pool.children]
        pool.reload()
        pool.reload()  # a second reload meanwhile is not a second SIGTERM ("stop now")
        with caplog.at_level(logging.INFO):
            _wait(lambda: (pool.check(), all(c.process is not None and c.process not in first
                                             for c in pool.children))[1])
        assert all(c.failures == 0 and not c.reloading for c in pool.children)
        assert "finished for the reload" in caplog.text and "restarting in" not in caplog.text
    finally:
        pool.stop(timeout=2)


def test_receivers_are_replaced_at_once_and_the_old_ones_drain() -> None:
    listening = socket.create_server(("127.0.0.1", 0))
    events = EventReader(_NoCounts(), lambda: None)
    pool = ReceiverPool(1, None, {"plain": listening}, events)
    # A receiver stand-in that takes a while to finish its associations on SIGTERM.
    finish = ("import signal, time; signal.signal(signal.SIGTERM, "
              "lambda *a: (time.sleep(0.5), exit(0))); time.sleep(60)")
    pool.command = [sys.executable, "-c", finish]
    pool.start()
    try:
        (slot,) = pool.receivers
        old = slot.process
        assert old is not None
        time.sleep(0.3)  # the stand-in has its handler
        pool.reload(None)
        assert slot.process is not None and slot.process is not old
        assert pool.draining == [old] and old.poll() is None  # finishing, beside the new one
        _wait(lambda: (pool.check(), not pool.draining)[1])
        assert old.returncode == 0 and pool.alive()
    finally:
        pool.stop()


class _NoCounts:
    def instance(self, outcome: str, size: int = 0) -> None:
        pass

    def association(self, result: str, transport: str) -> None:
        pass



def _served_certificate(port: int) -> str:
    """The common name of the certificate the TLS port presents now."""
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, \
            context.wrap_socket(raw) as tls:
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return str(x509.load_der_x509_certificate(der).subject.rfc4514_string())


def test_the_scp_takes_new_certificates_and_allowlist_for_new_associations(
        tmp_path: Path, settings_factory) -> None:  # type: ignore[no-untyped-def]
    ca = TestCA.create(tmp_path / "pki")
    old, new = ca.issue("old-node"), ca.issue("new-node")

    def settings_with(credentials: Credentials, calling: str) -> Settings:
        return settings_factory(node__port=0, node__allowed_calling_ae_titles=f'["{calling}"]',
                                tls__enabled=True, tls__port=0, tls__plain_port=False,
                                tls__certificate=credentials.certificate,
                                tls__private_key=credentials.private_key,
                                tls__require_client_certificate=False)

    settings = settings_with(old, "OLDMOD")
    runtime = open_runtime(settings, initialise_empty=True)
    listeners = start_scp(settings, Receiver(runtime.store, runtime.sessions, settings))
    try:
        port = listeners.port("tls")
        assert _served_certificate(port) == "CN=old-node"
        listeners.reconfigure(settings_with(new, "NEWMOD"))
        assert _served_certificate(port) == "CN=new-node"
        assert listeners.guard.policy.refusal("NEWMOD", "DENOISER", "127.0.0.1") is None
        assert listeners.guard.policy.refusal("OLDMOD", "DENOISER", "127.0.0.1") is not None
    finally:
        listeners.shutdown()


def test_the_overview_shows_the_config_loaded_and_a_refused_reload(
        running: tuple[Settings, Path]) -> None:
    settings, config = running
    state = ConfigState.started()
    runtime = open_runtime(settings, initialise_empty=True)
    pages = StatusPages(settings, runtime.sessions, runtime.store, _readiness(),
                        config_state=state)

    def overview() -> str:
        return pages.handle(Request.build("GET", "/", {"Host": "127.0.0.1:8080"})).body.decode()

    assert re.search(r'<th scope="row">config</th>.*?loaded \d{4}-', overview(), re.DOTALL)
    assert [name for name, _ in pages.slow.checks] == ["model file", "gpu", "destination pacs"]
    state.refused("node.port changed, which only a restart applies")
    html = overview()
    assert "reload refused" in html and "node.port changed" in html and "still runs" in html
    # An accepted reload: the new destinations are the ones the overview checks.
    pages.reconfigure(load_for_reload(settings, _write(config, BASE.replace(
        'name = "pacs"', 'name = "archive"'))))
    assert [name for name, _ in pages.slow.checks][-1] == "destination archive"
