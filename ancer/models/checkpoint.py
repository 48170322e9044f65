"""Reading a checkpoint file safely: hashing, the unpickling, and errors for bad files.

Files are unpickled with ``torch.load(weights_only=True)`` unless the caller trusts them,
since unpickling an untrusted file can run arbitrary code. TorchScript archives are read
with ``torch.jit.load``, which runs no Python code from the file. What the unpickled
object holds (which training code wrote it) is decided in :mod:`ancer.models.formats`.
"""
import hashlib
import pickle
import re
import warnings
import zipfile
from pathlib import Path
from typing import Any, Union

import torch

from ancer.errors import CheckpointError
from ancer.models.options import option

PathLike = Union[str, Path]


def sha256_of(path: PathLike) -> str:
    """The SHA-256 hex digest of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def is_torchscript(path: PathLike) -> bool:
    """Whether ``path`` is a TorchScript archive (a zip holding ``constants.pkl`` and
    ``code/``), as written by ``torch.jit.save``."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.endswith("/constants.pkl") for name in archive.namelist())


def check_file(path: PathLike) -> Path:
    """``path`` as a Path if it is a non-empty regular file, else CheckpointError."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} is not a regular file")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {str(path)!r} is empty (0 bytes)")
    return path


#: the first byte of a pickle of protocol 2 or later: the legacy ``torch.save`` format
#: (``_use_new_zipfile_serialization=False``) starts with the pickled magic number
_PICKLE_PROTO = b"\x80"


def _start(head: bytes) -> str:
    """The first bytes of a file, as text when they read as text, for messages."""
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return f"the bytes {head[:16]!r}"
    first = text.splitlines()[0] if text.strip() else text
    return f"the text {first[:40]!r}"


def read_checkpoint(path: PathLike, trust: bool, map_location: torch.device) -> Any:
    """Load the object stored in ``path``: a ScriptModule for a TorchScript archive, else
    what ``torch.load`` returns (with ``weights_only=not trust``).

    Raises CheckpointError for a missing, empty, truncated or corrupt file, for a file
    that needs ``trust=True``, and for a trusted pickle whose classes cannot be imported.
    """
    path = check_file(path)
    with open(path, "rb") as f:
        head = f.read(64)
    zip_magic = head[:2] == b"PK"
    if not zip_magic and head[:1] != _PICKLE_PROTO:
        raise CheckpointError(
            f"checkpoint {str(path)!r} is not a PyTorch checkpoint: it is neither a zip archive "
            f"(torch.save, torch.jit.save) nor a pickle; it starts with {_start(head)}"
        )
    if zip_magic and not zipfile.is_zipfile(path):
        raise CheckpointError(
            f"checkpoint {str(path)!r} is a truncated or corrupt zip archive (no central "
            "directory): the file was not completely written or copied; fetch it again"
        )
    try:
        if is_torchscript(path):
            with warnings.catch_warnings():
                # users hold TorchScript checkpoints; reading them is this loader's job
                warnings.filterwarnings("ignore", message=".*torch.jit.load.* is deprecated",
                                        category=DeprecationWarning)
                return torch.jit.load(str(path), map_location=map_location)
        return torch.load(path, map_location=map_location, weights_only=not trust)
    except pickle.UnpicklingError as exc:
        found = re.search(r"GLOBAL ([\w.]+)", str(exc))
        if found:
            raise CheckpointError(
                f"checkpoint {str(path)!r} holds the Python object {found.group(1)}, not "
                "only tensors, so it was not unpickled: loading it could run code from the "
                f"file. If you trust its source, pass {option('trust', 'True')}"
            ) from None
        reason = re.search(r"WeightsUnpickler error: \s*(.+)", str(exc))
        reason = reason.group(1).strip() if reason else str(exc).split("\n")[0]
        raise CheckpointError(
            f"checkpoint {str(path)!r} could not be unpickled ({reason}): the file is "
            "truncated, corrupt, or not a PyTorch checkpoint"
            + ("" if trust else "; or, if it holds Python objects from a trusted source, pass "
               f"{option('trust', 'True')}")
        ) from None
    except (AttributeError, ModuleNotFoundError, ImportError) as exc:
        raise CheckpointError(
            f"checkpoint {str(path)!r} is a pickle of classes that cannot be imported here "
            f"({exc}); import the code that defined the model first, or save its "
            f"state_dict() and load it with {option('arch')}"
        ) from None
    except (RuntimeError, EOFError, KeyError, IndexError, ValueError, OSError,
            zipfile.BadZipFile) as exc:
        reason = f"{type(exc).__name__}: {str(exc).split('. ')[0]}"
        raise CheckpointError(
            f"checkpoint {str(path)!r} could not be read ({reason}); the file is "
            "truncated, corrupt, or not a PyTorch checkpoint"
        ) from None
