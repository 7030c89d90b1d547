"""Reading and writing files safely: nothing dvae loads can run code, and nothing it writes goes through a
planted symlink or leaves half a file behind.

torch is imported only where a tensor file is read, so light commands (dvae-report) do not pay for it.
"""

from __future__ import annotations

import os
import re
import uuid
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from dvae.errors import ConfigError


def atomic_write(path: Path, write: Callable[[IO[bytes]], Any]) -> None:
    """Write through a temporary file in the same directory, then rename: a reader never sees half a
    file, an interrupted write leaves the old file (or none) in place, and a symlink at `path` is
    replaced by the new file rather than written through."""
    path = Path(path)
    # Not tempfile.mkstemp: its files are private (0600); these get the usual permissions (umask).
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "xb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_weights(path: str | Path, mmap: bool = False) -> Any:
    """`torch.load(path, weights_only=True)` on the CPU: only tensors and plain containers and values are
    built, so no code in the file runs. A file that names any other Python object is refused with a
    ConfigError naming both; garbage or text raises UnpicklingError with a one-line reason, and other
    failures (a truncated zip) are raised as torch raises them."""
    import pickle

    import torch

    path = Path(path)
    try:
        # mmap reads only what is used, but torch supports it for zip files only (not the legacy format).
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap and zipfile.is_zipfile(path))
    except pickle.UnpicklingError as error:
        # torch's message is a page long and suggests weights_only=False: say what it stopped at instead.
        found = re.search(r"GLOBAL ([\w.]+)", str(error))
        if found is None:  # garbage, text, a pickle opcode torch never writes: a damaged file, not a hostile one
            operand = re.search(r"Unsupported operand (\d+)", str(error))
            raise pickle.UnpicklingError(f"not a file torch.save wrote (unexpected pickle instruction "
                                         f"{operand.group(1) if operand else '?'})") from None
        raise ConfigError(
            f"{path} is refused: it names the Python object {found.group(1)}, and dvae loads only tensors and "
            f"plain values so that no file can run code; pass a file written by dvae."
        ) from None
