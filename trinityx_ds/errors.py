"""Bad input in one line: how every `trinityx` entry point (the CLI and the `python -m` entry
points of eval/ and launch/) reports an error the user can fix, without a traceback.

A leaf: it imports nothing of the package, so any room may use it (storage's CheckpointDir
raises CheckpointError: errors sits below storage in tests/unit/test_imports.py's LAYERS).
"""
from __future__ import annotations

import sys
from typing import Callable

# a folder the user named that cannot be written (read-only, a file in the way) is theirs to fix too
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError, FileExistsError, PermissionError,
                                                NotADirectoryError)
EXIT_USER_ERROR = 2


class CheckpointError(ValueError):
    """A checkpoint or run folder that cannot be read: names the file (and tensor). Here, with the
    other user errors, because every room raises or catches it (storage reads the folders, model
    and convert the tensors, train checks a resume before it starts); a ValueError, so every entry
    point reports it in one line."""


def one_line_errors(command: str, fn: Callable[[], int],
                    errors: tuple[type[BaseException], ...] = USER_ERRORS) -> int:
    """`fn()`'s exit code; one of `errors` instead prints `trinityx <command>: <error>` on stderr
    and returns 2."""
    try:
        return fn()
    except errors as e:  # bad input: one line, no traceback
        print(f"trinityx {command}: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
