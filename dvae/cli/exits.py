"""The one way a command ends on a user's mistake: one sentence on stderr, `TOOL: error: ...`, and exit status 2."""

from __future__ import annotations

import sys
from collections.abc import Callable

from dvae.errors import ConfigError


def refuse(tool: str, sentence: str) -> int:
    print(f"{tool}: error: {sentence}", file=sys.stderr)
    return 2


def run_tool(tool: str, work: Callable[[], int | None], file_problem: Callable[[OSError], str],
             refused: tuple[type[Exception], ...] = (ConfigError,)) -> int:
    """`work()`'s exit status (0 when it returns None). A refusal (ConfigError, or `refused`) is its own sentence;
    an OSError (a file that could not be read or written) is the sentence `file_problem` makes of it."""
    try:
        return work() or 0
    except refused as error:
        return refuse(tool, str(error))
    except OSError as error:
        return refuse(tool, file_problem(error))
