"""The errors every layer raises: a bad setting, and a model directory that cannot be loaded.

The ``drdo`` command reports each as one ``drdo: error:`` line (exit status 2).
"""


class ConfigError(ValueError):
    """A configuration value is missing, unknown or inconsistent."""


class ModelFormatError(ValueError):
    """A model directory or reward-head file is missing, corrupt or inconsistent."""
