"""The errors an entry point turns into a one-line message and an exit code (`fastssl.run.cli`).

A leaf: it imports nothing, so any part can raise these without pulling in another.
"""


class ConfigError(ValueError):
    """A user mistake in a recipe or an override."""


class NonFiniteLoss(RuntimeError):
    """The loss became NaN or inf; the last checkpoint on disk predates it."""
