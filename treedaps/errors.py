"""The configuration error type (kept apart so that every layer can raise it without imports)."""


class ConfigError(ValueError):
    """A wrong value or key in the configuration (one-line message)."""
