class ConfigError(ValueError):
    """A user-facing configuration mistake: one sentence naming the key and what to do."""
