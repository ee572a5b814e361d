"""Bad input in one line: how every `trinityx` entry point (the CLI and the `python -m` entry
points of eval/ and launch/) reports an error the user can fix, without a traceback.

A leaf: it imports nothing of the package, so any room may use it (storage's CheckpointDir
raises CheckpointError: errors sits below storage in tests/unit/test_imports.py's LAYERS).
"""
from __future__ import annotations

import os
import sys
from typing import Callable

# a folder the user named that cannot be written (read-only, a file in the way) is theirs to fix too
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError, FileExistsError, PermissionError,
                                                NotADirectoryError)
EXIT_USER_ERROR = 2  # bad input, found before or after launch
# (train/guard.Diverged exits 3: training stopped itself; StorageError 4: the run's files could not be written)


class CheckpointError(ValueError):
    """A checkpoint or run folder that cannot be read: names the file (and tensor). Here, with the
    other user errors, because every room raises or catches it (storage reads the folders, model
    and convert the tensors, train checks a resume before it starts); a ValueError, so every entry
    point reports it in one line."""


# where a rank of a local job records its exit code for the `--nproc` launcher, which would otherwise
# return torchrun's 1 for every kind of failure (launch/torchrun.relaunch sets it)
EXIT_FILE_ENV = "TRINITYX_EXIT_FILE"


class StorageError(OSError):
    """A run's files could not be written (a full disk, a quota, an I/O error): the message names
    the path and the cause; exit code 4, so a scheduler's retry logic can tell it from bad input
    (2) and a stopped run (3)."""

    exit_code = 4


def one_line_errors(command: str, fn: Callable[[], int],
                    errors: tuple[type[BaseException], ...] = USER_ERRORS) -> int:
    """`fn()`'s exit code; one of `errors` (or a StorageError) instead prints
    `trinityx <command>: <error>` on stderr and returns the error's `exit_code` (2 for bad input)."""
    try:
        return fn()
    except (*errors, StorageError) as e:  # one line, no traceback
        print(f"trinityx {command}: {e}", file=sys.stderr)
        code = getattr(e, "exit_code", EXIT_USER_ERROR)
        if os.environ.get(EXIT_FILE_ENV):
            with open(os.environ[EXIT_FILE_ENV], "a") as f:
                f.write(f"{code}\n")
        return code
