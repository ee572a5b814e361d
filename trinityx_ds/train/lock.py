"""One owner per stage folder: rank 0 of every training job takes an exclusive lock on the stage
folder it writes (its checkpoints, metrics, outputs) and holds it to the end. A second job on the
same folder is refused in one line naming the owner. The lock is an `fcntl.flock` on a file, which
the kernel releases when its process dies however it dies, so a lock left by a dead job is never
in the way; the owner it recorded is reported as taken over."""
from __future__ import annotations

import fcntl
import os
import socket
import time
from pathlib import Path

LOCK = ".trinityx.lock"


def _owner(fd: int) -> str:
    """The owner line a lock file holds ("" when none)."""
    return os.pread(fd, 4096, 0).decode(errors="replace").strip()


class FolderLocked(ValueError):
    """Another live job owns the folder (a one-line user error)."""


class RunLock:
    def __init__(self, folder: str | Path):
        self.path = Path(folder) / LOCK
        self._fd: int | None = None

    def acquire(self) -> str | None:
        """Takes the lock; returns a note when it took over a dead job's, raises FolderLocked when
        a live job holds it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = _owner(fd) or "an unknown process"
            os.close(fd)
            raise FolderLocked(self.refusal(self.path.parent, owner)) from None
        previous = _owner(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"host {socket.gethostname()} pid {os.getpid()} since {time.strftime('%Y-%m-%d %H:%M:%S')}"
                      .encode(), 0)
        self._fd = fd
        return f"{self.path}: taken over from a job that is gone ({previous})" if previous else None

    def holder(self) -> str | None:
        """Who holds the lock now (its owner line), or None when no live job does; takes nothing
        (the pre-launch check: a second job is refused before its workers start, and rank 0 still
        takes the lock itself when the run begins)."""
        if not self.path.is_file():
            return None
        fd = os.open(self.path, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _owner(fd) or "an unknown process"
        finally:
            os.close(fd)  # closing the descriptor drops the shared lock, if it was taken
        return None

    @staticmethod
    def refusal(folder: str | Path, owner: str) -> str:
        return (f"{folder}: another training job owns this folder ({owner}); wait for it, stop it, or train into "
                "another output.dir")

    def release(self) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            os.close(self._fd)  # closing the descriptor releases the flock
            self._fd = None
