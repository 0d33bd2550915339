"""Settings: the typed schema and its loading (TOML file, then environment)."""

from denoised_node.config.settings import ConfigError, Settings, load_settings

__all__ = ["ConfigError", "Settings", "load_settings"]
