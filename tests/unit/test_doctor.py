"""`denoised-node doctor` (daemon/doctor.py): what is wrong and how to fix it, with the
shipped model and no network peers. The security checks are in test_security_doctor.py."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner

from denoised_node.daemon.cli import main
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
