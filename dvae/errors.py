class ConfigError(ValueError):
    """A user-facing configuration mistake: one sentence naming the key and what to do."""


class TrainingError(RuntimeError):
    """A run that had to stop (bad numbers, a checkpoint that could not be written): one sentence that
    names the step or the file and says how to go on."""


def os_error_sentence(error: OSError) -> str:
    """An OSError as a clause that names its file and the system's reason, without Python's
    "[Errno 30] ...: 'path'" form. A temporary file of an atomic write is named by its folder."""
    if error.filename is None or not error.strerror:
        return str(error)  # a message of ours that already names the file
    from pathlib import Path

    path = Path(str(error.filename))
    if path.name.startswith(".") and path.suffix == ".tmp":
        path = path.parent
    return f"{path}: {error.strerror[:1].lower()}{error.strerror[1:]}"
