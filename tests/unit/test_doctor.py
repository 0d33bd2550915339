"""`denoised-node doctor` (daemon/cli/doctor.py): what is wrong and how to fix it, with the
shipped model and no network peers. The security checks are in test_security_doctor.py."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner

from denoised_node.daemon.cli.doctor import Check, _destinations
from denoised_node.daemon.cli.main import main
from tests.fixtures.dicom_peer import loopback_scp
from tests.fixtures.node_state import minimal_config


def test_doctor_reports_what_is_wrong_and_how_to_fix_it(tmp_path: Path) -> None:
    config = minimal_config(tmp_path)
    result = CliRunner().invoke(main, ["doctor", "--config", str(config), "--json"])
    assert result.exit_code == 1
    checks = {c["name"]: c for c in json.loads(result.stdout)}
    assert not checks["database"]["ok"] and "db upgrade" in checks["database"]["fix"]
    assert checks["model"]["ok"] and "sha256" in checks["model"]["detail"]
    assert checks["disk"]["ok"]
    assert not checks["destination pacs"]["ok"]
    CliRunner().invoke(main, ["db", "upgrade", "--config", str(config)])
    result = CliRunner().invoke(main, ["doctor", "--config", str(config)])
    assert "database: ok" in result.stdout and "fix:" in result.stdout


def _peer(ae_title: str, **attributes: object):  # type: ignore[no-untyped-def]
    """A Verification SCP on loopback answering to ``ae_title``; yields its port."""
    from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

    return loopback_scp(ae_title, [Verification], **attributes)


def _destination_check(tmp_path: Path, port: int) -> Check:
    from denoised_node.config.settings import load_settings

    settings = load_settings(minimal_config(tmp_path, port), environ={})
    (check,) = _destinations(settings)
    return check


def test_a_wrong_called_ae_title_names_the_destinations_title(tmp_path: Path) -> None:
    with _peer("REALPACS", require_called_aet=True) as port:
        check = _destination_check(tmp_path, port)
    assert not check.ok and "Called AE title not recognised" in check.detail
    assert "AE title PACS" in check.fix and "ae_title of destination pacs" in check.fix
    assert "DENOISER" not in check.fix  # the node's own title is not what is wrong


def test_a_calling_ae_title_not_allowed_names_the_nodes_title(tmp_path: Path) -> None:
    with _peer("PACS", require_calling_aet=["SCANNER"]) as port:
        check = _destination_check(tmp_path, port)
    assert not check.ok and "Calling AE title not recognised" in check.detail
    assert check.fix == "declare this node's AE title DENOISER in PACS"


def test_a_refused_connection_names_the_port(tmp_path: Path) -> None:
    from tests.integration.peers.tools import free_port

    port = free_port()
    check = _destination_check(tmp_path, port)
    assert not check.ok and check.detail.endswith("association failed: connection refused")
    assert check.fix.startswith(f"nothing listens on 127.0.0.1:{port}: check destination pacs's")
