"""Issue 15, item 6: small defects found by adversarial testing. A field from the network
cannot forge a log line; a bad AE title, a string for a boolean and a model card of the
wrong shape are clear errors; doctor notices an HTTP password it cannot read."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from click.testing import CliRunner

from denoised_node.config.settings import ConfigError, load_settings
from denoised_node.daemon.cli.doctor_security import http_check
from denoised_node.daemon.cli.main import main
from denoised_node.daemon.process.logs import TextFormatter


def _record(message: str, *args: object, **extra: object) -> logging.LogRecord:
    record = logging.LogRecord("denoised_node.daemon.dicom.scp", logging.WARNING, __file__, 1,
                               message, args, None)
    record.__dict__.update(extra)
    return record


def test_a_field_from_the_network_cannot_forge_a_log_line() -> None:
    forged = "1.2.3\n2026-12-01T00:00:00.000Z INFO daemon.scp instance stored status=0x0000"
    line = TextFormatter().format(_record("instance refused: %s", "bad\rdata",
                                          sop_instance_uid=forged, calling_ae="A=B C"))
    assert "\n" not in line and "\r" not in line
    # Each field is one token: quoted (JSON) when it holds anything but plain characters.
    assert f"sop_instance_uid={json.dumps(forged)}" in line
    assert 'calling_ae="A=B C"' in line
    assert "sop_instance_uid=1.2.3 " not in line


@pytest.mark.parametrize("title", ["PACS\\1", "PA\x01CS", "PACS\x7f", "\tPACS"])
@pytest.mark.parametrize("key", ["node.ae_title", "destination", "allowed"])
def test_ae_titles_with_a_backslash_or_a_control_character_are_refused(
        tmp_path: Path, title: str, key: str) -> None:
    quoted = json.dumps(title)  # a TOML basic string: the same escapes as JSON
    text = {"node.ae_title": f"[node]\nae_title = {quoted}\n",
            "destination": f"[[destinations]]\nname = 'p'\nae_title = {quoted}\n"
                           "host = '127.0.0.1'\nport = 104\n",
            "allowed": f"[node]\nallowed_calling_ae_titles = [{quoted}]\n"}[key]
    config = tmp_path / "c.toml"
    config.write_text(text)
    with pytest.raises(ConfigError, match="ae_title"):
        load_settings(config, environ={})


@pytest.mark.parametrize("value", ['"yes"', '"true"', "1", '"on"'])
def test_booleans_must_be_toml_booleans(tmp_path: Path, value: str) -> None:
    config = tmp_path / "c.toml"
    config.write_text(f"[tls]\nenabled = {value}\n")
    with pytest.raises(ConfigError, match=r"tls\.enabled.*true or false"):
        load_settings(config, environ={})
    config.write_text("[tls]\nenabled = false\n[http]\nenabled = false\n")
    assert load_settings(config, environ={}).http.enabled is False
    # The environment's TOML literals still work, and a string there is refused too.
    from_env = load_settings(None, environ={"DENOISED_NODE_HTTP__ENABLED": "false"})
    assert from_env.http.enabled is False
    with pytest.raises(ConfigError, match="http.enabled"):
        load_settings(None, environ={"DENOISED_NODE_HTTP__ENABLED": "yes"})


def test_doctor_says_http_is_wrong_when_the_password_file_cannot_be_read(
        tmp_path: Path) -> None:
    settings = load_settings(None, environ={
        "DENOISED_NODE_HTTP__PORT": "0", "DENOISED_NODE_HTTP__USERNAME": "admin",
        "DENOISED_NODE_HTTP__PASSWORD_FILE": str(tmp_path / "missing-password")})
    check = http_check(settings)
    assert check is not None and not check.ok
    assert "http.password_file" in check.detail and "cannot read" in check.detail


def test_a_model_card_of_the_wrong_shape_is_one_clear_line(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    from denoised_node.model.checkpoint import CARD_KEY, read_checkpoint
    from denoised_node.model.errors import CheckpointInvalidError

    shipped = Path(__file__).resolve().parents[2] / "model" / "checkpoints" / "default.safetensors"
    path = tmp_path / "odd.safetensors"
    with open(shipped, "rb") as handle:
        header = json.loads(handle.read(int.from_bytes(handle.read(8), "little")))
    meta = header["__metadata__"]
    card = json.loads(meta[CARD_KEY])
    card["architecture"] = "unet"
    meta[CARD_KEY] = json.dumps(card)
    save_file(load_file(str(shipped)), str(path), metadata=meta)
    with pytest.raises(CheckpointInvalidError, match="architecture"):
        read_checkpoint(path)
    config = tmp_path / "node.toml"
    config.write_text(f'[node]\ndata_dir = "{tmp_path / "data"}"\n[model]\n'
                      f'checkpoint = "{path}"\ndevice = "cpu"\n')
    result = CliRunner().invoke(main, ["denoise", "--config", str(config), str(tmp_path),
                                       str(tmp_path / "out")])
    # A one-line `error: ...`, not an exception escaping the command (a traceback).
    assert result.exit_code != 0 and isinstance(result.exception, SystemExit)
    assert "architecture" in result.output
