"""Atomic file writes: a file is either its old self or the whole new content, never half.

Used for everything a long job must not lose to a crash or kill -9: checkpoints, the memory
of memory-based certification, results sidecars.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Callable, Union

import torch

PathLike = Union[str, "os.PathLike[str]"]


def write_atomically(path: PathLike, content: Union[str, bytes, Callable[[BinaryIO], Any]]) -> None:
    """Write ``content`` (text, as UTF-8; bytes; or a function that writes to a binary file)
    to a temporary file in ``path``'s folder, fsync it, then rename it over ``path``
    (``os.replace`` is atomic on POSIX), so that readers see either the old file or the whole
    new one; on any failure the temporary file is removed and ``path`` is left as it was."""
    if isinstance(content, (str, bytes)):
        data = content.encode("utf-8") if isinstance(content, str) else content
        return write_atomically(path, lambda handle: handle.write(data))
    write = content
    path = Path(path)
    try:
        descriptor, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp",
                                                 dir=path.parent)
    except OSError as error:  # name the file asked for, not the temporary one
        raise type(error)(error.errno, error.strerror, str(path)) from None
    try:
        with os.fdopen(descriptor, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except OSError as error:
        Path(temporary).unlink(missing_ok=True)
        raise type(error)(error.errno, error.strerror, str(path)) from None
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def save_atomically(path: PathLike, obj: Any) -> None:
    """``torch.save(obj, path)``, atomically."""
    write_atomically(path, lambda handle: torch.save(obj, handle))
