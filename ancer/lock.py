"""An advisory lock on a results file, so that two runs never interleave rows in one file.

``results.tsv`` -> ``results.lock`` beside it, locked with ``fcntl.flock`` (exclusive, not
waiting) while a run writes. The operating system releases the lock when the process ends,
however it ends (kill -9 included), so a stale lock file is harmless: only a live run holds
the lock. The file keeps the holder's pid and host for the refusal message. On systems
without ``fcntl`` (Windows) runs are not locked.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Optional

from ancer.errors import ResultsError
from ancer.results import lock_path

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None


class RunLock:
    """Holds the lock of results file ``path`` inside a ``with`` block; ResultsError in one
    line if another process holds it."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.where = lock_path(path)
        self._fd: Optional[int] = None

    def __enter__(self) -> "RunLock":
        if fcntl is None:
            return self
        try:
            self.where.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.where, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as error:
            raise ResultsError(f"cannot create {self.where} ({error.strerror}): pass an --out "
                               "in a folder you can write") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(fd, 200).decode("utf-8", errors="replace").strip() or "another process"
            os.close(fd)
            raise ResultsError(f"{self.path} is being written by another certify run "
                               f"({holder}): wait for it to finish, or pass another --out") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        self._fd = fd
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing releases the flock
            self._fd = None
