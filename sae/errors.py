"""The SAE side's error for settings that cannot work."""


class ConfigError(ValueError):
    """A configuration that cannot work; the message says what to change."""
