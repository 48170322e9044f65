"""The per-input anisotropic scales of a run: one appendable ``.npy`` file beside the TSV
(``results.scales.npy``: records of ``idx`` and ``sigma``, θ of shape C×H×W, in row order;
docs/results.md, section 4).

Durability: a record is appended, fsynced, and the header's record count is rewritten in
place (numpy reserves room for the count's digits, so the header keeps its length) and
fsynced, all before the input's TSV row is written; so a row never refers to scales that
were not saved. :func:`open_scales` drops whatever follows the records of written rows.
"""

from __future__ import annotations

import os
from io import BytesIO
from pathlib import Path
from typing import Sequence

import numpy as np
import numpy.lib.format as npy

from ancer.atomic import write_atomically
from ancer.errors import ResultsError
from ancer.results import scales_path


def record_dtype(shape: Sequence[int]) -> np.dtype:
    """One record: the input's idx and its scales of ``shape`` (C×H×W)."""
    return np.dtype([("idx", "<i8"), ("sigma", "<f4", tuple(shape))])


def _header(dtype: np.dtype, count: int) -> bytes:
    """The .npy header of ``count`` records; its length does not depend on ``count``."""
    buffer = BytesIO()
    npy.write_array_header_1_0(buffer, {"descr": npy.dtype_to_descr(dtype),
                                        "fortran_order": False, "shape": (count,)})
    return buffer.getvalue()


class ScalesWriter:
    """Appends one record per input; make one with :func:`open_scales`. Opening keeps the
    first ``count`` records of ``path`` and drops the rest."""

    def __init__(self, path: Path, dtype: np.dtype, count: int) -> None:
        self.path = path
        self.dtype = dtype
        self.count = count
        self._header_size = len(_header(dtype, 0))
        self._fd = os.open(path, os.O_RDWR)
        os.truncate(self._fd, self._header_size + count * dtype.itemsize)
        os.pwrite(self._fd, _header(dtype, count), 0)
        os.fsync(self._fd)

    def append(self, idx: int, sigma: np.ndarray) -> None:
        """Save input ``idx``'s scales durably (data first, then the record count)."""
        record = np.zeros((), dtype=self.dtype)
        record["idx"] = idx
        record["sigma"] = sigma
        os.pwrite(self._fd, record.tobytes(), self._header_size + self.count * self.dtype.itemsize)
        os.fsync(self._fd)
        os.pwrite(self._fd, _header(self.dtype, self.count + 1), 0)
        os.fsync(self._fd)
        self.count += 1

    def close(self) -> None:
        os.close(self._fd)

    def __enter__(self) -> ScalesWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def open_scales(results: str | os.PathLike, shape: Sequence[int],
                done: Sequence[int]) -> ScalesWriter:
    """Open the scales file of ``results`` for inputs of ``shape``, starting or resuming it.

    ``done`` lists the idx of the rows already in the results file, in file order: the file
    must start with their records (in that order); records after them (scales saved just
    before a kill, whose rows were not written) are dropped.
    """
    path = scales_path(results)
    dtype = record_dtype(shape)
    header = _header(dtype, 0)
    if not path.exists() or path.stat().st_size < len(header):
        path.write_bytes(header)
    with open(path, "rb") as handle:
        try:
            npy.read_magic(handle)
            on_disk = npy.read_array_header_1_0(handle)[2]
        except ValueError:
            on_disk = None
    if on_disk != dtype:
        raise ResultsError(f"{path} does not hold scales of shape {tuple(shape)}: it belongs "
                           "to another run; move it away or pass a new --out")
    count = (path.stat().st_size - len(header)) // dtype.itemsize
    indices = np.fromfile(path, dtype=dtype, count=count, offset=len(header))["idx"]
    kept = 0
    while kept < min(count, len(done)) and indices[kept] == done[kept]:
        kept += 1
    if kept < len(done):
        raise ResultsError(f"{path} lacks the scales of idx {done[kept]}, which {results} "
                           "holds: the scales file was changed or deleted; pass a new --out")
    return ScalesWriter(path, dtype, kept)


def read_scales(results: str | os.PathLike) -> np.ndarray:
    """The records of the scales file of ``results``, as saved (a record saved just before a
    kill, whose row was not written, included)."""
    path = scales_path(results)
    try:
        return np.load(path)
    except FileNotFoundError:
        raise ResultsError(f"{path} is missing, yet {results} holds ancer rows: restore it, or "
                           "delete both and certify those inputs again") from None
    except ValueError as error:
        raise ResultsError(f"{path} is not a scales file ({error}): restore it, or delete it "
                           f"and {results} and certify those inputs again") from None


def write_scales(results: str | os.PathLike, records: np.ndarray) -> None:
    """Write ``records`` as the scales file of ``results`` atomically, in the layout
    :class:`ScalesWriter` appends (so a resumed run can continue it)."""
    write_atomically(scales_path(results), _header(records.dtype, len(records)) + records.tobytes())
