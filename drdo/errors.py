"""The error every layer raises for a bad setting: a missing, unknown, out-of-range or inconsistent value.

The ``drdo`` command reports it as one ``drdo: error:`` line (exit status 2).
"""


class ConfigError(ValueError):
    """A configuration value is missing, unknown or inconsistent."""
