from __future__ import annotations

from pathlib import Path

import pytest

from denoised_node.config.settings import ConfigError, load_settings

EXAMPLE = Path(__file__).resolve().parents[2] / "config" / "denoised-node.example.toml"


def test_embedded_defaults_run_on_loopback_with_the_shipped_model() -> None:
    settings = load_settings(None, environ={})
    assert settings.node.ae_title == "DENOISER"
    assert settings.node.port == 11112
    assert settings.node.host == "127.0.0.1"
    assert settings.model.checkpoint == "default"
    assert [(d.ae_title, d.host, d.port) for d in settings.destinations] == [
        ("PACS", "127.0.0.1", 4242)]
    assert settings.database_url.startswith("sqlite:///")
    assert settings.database_url.endswith("node.db")


def test_example_config_loads_with_the_contract_keys() -> None:
    settings = load_settings(EXAMPLE, environ={})
    assert settings.node.host == "0.0.0.0"
    assert settings.node.data_dir == Path("/var/lib/denoised-node")
    assert settings.database_url == "sqlite:////var/lib/denoised-node/node.db"
    assert settings.series.idle_seconds == 10
    assert settings.model.device == "auto"
    assert settings.destinations[0].name == "pacs"


def test_processing_retries_have_their_own_backoff(tmp_path: Path) -> None:
    defaults = load_settings(None, environ={})
    # The defaults are those the send retries have (and processing retries borrowed).
    assert defaults.worker.max_processing_attempts == 3
    assert (
        defaults.worker.processing_backoff_base_seconds == defaults.send.backoff_base_seconds == 2
    )
    assert (
        defaults.worker.processing_backoff_max_seconds == defaults.send.backoff_max_seconds == 300
    )
    example = load_settings(EXAMPLE, environ={})
    assert example.worker.processing_backoff_base_seconds == 2
    assert example.worker.processing_backoff_max_seconds == 300
    config = tmp_path / "c.toml"
    config.write_text("[worker]\nprocessing_backoff_base_seconds = 30\n")
    settings = load_settings(config, environ={
        "DENOISED_NODE_WORKER__PROCESSING_BACKOFF_MAX_SECONDS": "600"})
    assert settings.worker.processing_backoff_base_seconds == 30
    assert settings.worker.processing_backoff_max_seconds == 600
    assert settings.send.backoff_base_seconds == 2  # the send's are not touched
    config.write_text("[worker]\nprocessing_backoff_base_seconds = 0\n")
    with pytest.raises(ConfigError, match="processing_backoff_base_seconds"):
        load_settings(config, environ={})


def test_unknown_key_is_an_error_naming_it(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text("[node]\nae_title = 'X'\nprot = 5\n")
    with pytest.raises(ConfigError, match=r"unknown key 'node\.prot'"):
        load_settings(config, environ={})


def test_unknown_section_is_an_error(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text("[nodes]\nport = 5\n")
    with pytest.raises(ConfigError, match="unknown key 'nodes'"):
        load_settings(config, environ={})


def test_environment_overrides_the_file(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text("[node]\nport = 104\n")
    env = {"DENOISED_NODE_NODE__PORT": "11113", "DENOISED_NODE_MODEL__DEVICE": "cpu",
           "DENOISED_NODE_DESTINATIONS": '[{"name": "a", "ae_title": "A", "host": "h", "port": 1}]'}
    settings = load_settings(config, environ=env)
    assert settings.node.port == 11113
    assert settings.model.device == "cpu"
    assert [d.name for d in settings.destinations] == ["a"]


def test_config_path_from_environment(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text("[series]\nidle_seconds = 3\n")
    settings = load_settings(None, environ={"DENOISED_NODE_CONFIG": str(config)})
    assert settings.series.idle_seconds == 3


@pytest.mark.parametrize("text, message", [
    ("[node]\nport = 70000\n", "node.port"),
    ("[node]\nae_title = 'MUCH_TOO_LONG_AE_TITLE'\n", "node.ae_title"),
    ("[model]\ndevice = 'gpu'\n", "model.device"),
    (("[[destinations]]\nname='a'\nae_title='A'\nhost='h'\nport=1\n"
      "[[destinations]]\nname='a'\nae_title='B'\nhost='h'\nport=2\n"), "unique"),
    ("node = [", "not valid TOML"),
])
def test_bad_values_name_the_key(tmp_path: Path, text: str, message: str) -> None:
    config = tmp_path / "c.toml"
    config.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_settings(config, environ={})


def test_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(tmp_path / "nope.toml", environ={})


def test_malformed_environment_variable() -> None:
    with pytest.raises(ConfigError, match="DENOISED_NODE_PORT"):
        load_settings(None, environ={"DENOISED_NODE_PORT": "1"})


def test_unknown_destination_name() -> None:
    settings = load_settings(None, environ={})
    with pytest.raises(ConfigError, match="no destination named 'x'.*pacs"):
        settings.destination("x")


def test_unknown_key_says_did_you_mean(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text("[node]\nportt = 1\n[[destinations]]\nname='a'\nae_title='A'\nhots='h'\n"
                      "port=1\n")
    with pytest.raises(ConfigError) as raised:
        load_settings(config, environ={})
    message = str(raised.value)
    assert message.startswith(f"{config}: ")
    assert "unknown key 'node.portt'; did you mean 'node.port'?" in message
    assert "did you mean 'destinations.0.host'?" in message


def test_an_environment_variables_error_blames_the_variable_not_the_file(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text("[node]\nport = 104\n")
    with pytest.raises(ConfigError) as raised:
        load_settings(config, environ={"DENOISED_NODE_NODE__PROT": "5"})
    assert str(raised.value) == ("environment variable DENOISED_NODE_NODE__PROT: unknown key "
                                 "'node.prot'; did you mean 'node.port'?")
    with pytest.raises(ConfigError, match=r"^environment variable DENOISED_NODE_NODE__PORT: "
                                          r"node\.port: "):
        load_settings(config, environ={"DENOISED_NODE_NODE__PORT": "70000"})


def test_no_library_wording_in_config_errors(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text("[http]\nusername = 'a'\n[model]\ndevice = 'gpu'\n")
    with pytest.raises(ConfigError) as raised:
        load_settings(config, environ={})
    message = str(raised.value)
    assert "(root)" not in message and "Value error" not in message
    assert "model.device: must be auto, cpu, cuda or cuda:N" in message
    assert "http.username and http.password_file go together" in message
