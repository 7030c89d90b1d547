class ConfigError(ValueError):
    """A user-facing configuration mistake: one sentence naming the key and what to do."""


class TrainingError(RuntimeError):
    """A run that had to stop (bad numbers, a checkpoint that could not be written): one sentence that
    names the step or the file and says how to go on."""
