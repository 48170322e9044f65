"""Writing a run's results file (docs/results.md, sections 2 and 6): appending rows durably,
starting or resuming the file, and the checks that make a resumed run's file equal an
uninterrupted run's.

A row is written by one ``write`` call, then fsynced (:class:`ResultsWriter`). A run resumes
only with the settings it began with (:func:`open_results`), its group size included
(:func:`recorded_group_size`); the rows already written are skipped, must lie in the run's
selection (:func:`check_selection`), and a row whose memory answer a kill kept from being
saved is certified again with its group and must equal the row on disk (:func:`unanswered_rows`, :func:`check_recomputed`); a row's scales are saved
before it (:func:`write_certified`); a saved memory goes on only from the inputs it
answered (:func:`resume_memory`).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Collection, Mapping, Optional, Sequence

from ancer.atomic import write_atomically
from ancer.engine import Certifier
from ancer.errors import ResultsError
from ancer.memory import Memory
from ancer.results import (COLUMNS, Row, Sidecar, check_compatible, check_writable, done_indices,
                           make_row, memory_path, read_results, read_sidecar, sidecar_path,
                           write_sidecar)
from ancer.runs import Certified, memory_continues
from ancer.scales import ScalesWriter


class ResultsWriter:
    """Appends rows to a results file, one ``write`` call per row, flushed and fsynced.

    Make one with :func:`open_results`. ``done`` holds the indices already in the file;
    ``dropped_line`` the partial last line truncated on opening, if any.
    """

    def __init__(self, path: Path, done: set[int], dropped_line: str | None) -> None:
        self.path = path
        self.done = done
        self.dropped_line = dropped_line
        self._fd: int | None = os.open(path, os.O_WRONLY | os.O_APPEND)

    def write(self, row: Row) -> None:
        """Append ``row`` durably: a kill after this returns cannot lose it."""
        if self._fd is None:
            raise ResultsError(f"{self.path}: writer is closed")
        if row.idx in self.done:
            raise ResultsError(f"{self.path} already holds idx {row.idx}: each input is "
                               "written once; skip the indices in .done")
        data = row.to_line().encode("utf-8")
        written = os.write(self._fd, data)
        while written < len(data):  # a short write happens only on a full disk or a signal
            written += os.write(self._fd, data[written:])
        self.done.add(row.idx)  # the whole line is in the file: a Ctrl-C in fsync keeps it
        os.fsync(self._fd)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> ResultsWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def open_results(path: str | os.PathLike, settings: Mapping[str, Any],
                 info: Mapping[str, Any] | None = None,
                 growable: tuple[str, ...] = ()) -> ResultsWriter:
    """Open ``path`` to write a run's rows, starting it or resuming it.

    A new file (or one killed before its header was complete) gets its folder, the sidecar
    and the header. An existing one must have a sidecar whose settings equal ``settings``
    (else ResultsError naming the differences) and our columns; a partial last line left
    by a kill is truncated, and the writer's ``done`` holds the indices to skip. Settings
    named in ``growable`` (the selection's ``max``) may differ: the sidecar then records the
    new value, and the caller checks that the rows on disk still belong to the run.
    """
    path = check_writable(path)
    size = path.stat().st_size if path.exists() else 0
    complete = path.read_bytes().rfind(b"\n") + 1 if size else 0  # bytes up to the last newline
    if not complete:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise ResultsError(f"cannot create the folder of {path} ({error.strerror}): "
                               "pass an --out in a folder you can write") from None
        write_sidecar(path, Sidecar(dict(settings), dict(info or {})))
        write_atomically(path, "\t".join(COLUMNS) + "\n")
        return ResultsWriter(path, set(), None)
    sidecar = read_sidecar(path)
    if sidecar is None:
        raise ResultsError(f"{path} exists but has no settings file {sidecar_path(path).name} "
                           "(not written by certify, or its sidecar was deleted): pass a new --out")
    fixed = {key: value for key, value in sidecar.settings.items() if key not in growable}
    check_compatible(fixed, {k: v for k, v in settings.items() if k not in growable}, path)
    if any(sidecar.settings.get(key) != settings.get(key) for key in growable):
        write_sidecar(path, Sidecar(dict(settings), sidecar.info))
    table = read_results(path)
    if table.header != COLUMNS:
        raise ResultsError(f"{path} has other columns than this version of certify writes: "
                           "pass a new --out")
    if complete < size:
        os.truncate(path, complete)
    return ResultsWriter(path, {int(i) for i in table.columns["idx"]}, table.partial_line)


def check_recomputed(path: Path, written: Row, row: Row) -> None:
    """``row``, certified again on resume, must equal the ``written`` one that the memory
    did not save, or the memory would go on from a certificate the file does not report."""
    def same(before: Any, now: Any) -> bool:
        both_nan = isinstance(before, float) and isinstance(now, float) and math.isnan(before) and math.isnan(now)
        return before == now or both_nan

    differences = [(name, getattr(written, name), getattr(row, name)) for name in COLUMNS
                   if name not in ("time", "correct") and not same(getattr(written, name), getattr(row, name))]
    if differences:
        name, before, now = differences[0]
        raise ResultsError(
            f"resuming {path}: idx {row.idx} was written before the run stopped but its memory "
            f"answer was not saved, and certifying it again gives another row ({name} "
            f"{before!r} on disk, {now!r} now; nondeterministic GPU kernels?); the memory "
            f"cannot go on from a row it did not answer: delete the rows from idx {row.idx} on "
            f"from {path} and resume"
        )


def write_certified(writer: ResultsWriter, scales: Optional[ScalesWriter], item: Certified,
                    method: str, uses_memory: bool, unanswered: Mapping[int, Row]) -> Optional[Row]:
    """Write the row of ``item`` (:func:`ancer.results.make_row`), its scales first (ancer),
    so that a row never refers to scales that were not saved; the row written, or None for
    an input certified again only with its group, whose row is checked instead when the
    memory did not save its answer (:func:`check_recomputed`)."""
    row = make_row(item.idx, item.label, item.certificate, method, item.seconds, uses_memory)
    if item.again:
        if item.idx in unanswered:
            check_recomputed(writer.path, unanswered[item.idx], row)
        return None
    if item.certificate.anisotropic:
        scales.append(item.idx, item.certificate.noise.sigma.numpy())
    writer.write(row)
    return row


def recorded_group_size(path: Path, default: int) -> int:
    """The group size of the run writing ``path``, as its sidecar records it (a run begun
    with another default group size goes on with it, so that its groups, and with them its
    certificates, stay those of an uninterrupted run); ``default`` for a new run."""
    recorded = read_sidecar(path) if path.is_file() else None
    if recorded is None or "inputs_per_batch" not in recorded.settings:
        return default
    return int(recorded.settings["inputs_per_batch"])


def check_selection(path: Path, indices: Collection[int]) -> None:
    """Rows on disk must lie in this run's selection ``indices`` (a smaller --max would drop
    them); nothing to check before the file and its sidecar exist."""
    if not path.is_file() or read_sidecar(path) is None:
        return
    outside = sorted(done_indices(path) - {int(i) for i in indices})
    if outside:
        raise ResultsError(f"{path} holds rows beyond this selection (idx {outside[0]}, "
                           f"{len(outside)} rows in all): --max may grow between runs, not "
                           "shrink; pass the earlier --max or a larger one, or a new --out")


def file_order(writer: ResultsWriter) -> list[int]:
    """The idx of the rows in the writer's file, in file order."""
    return [int(i) for i in read_results(writer.path).columns["idx"]] if writer.done else []


def resume_memory(certifier: Certifier, path: Path, written: Sequence[int]) -> Memory:
    """The memory of the run writing ``path``: the saved one on resume, else the engine's;
    it must have answered the first of the inputs ``written`` so far, in order, and the
    engine goes on with it."""
    where = memory_path(path)
    memory = Memory.load(where) if where.exists() else certifier.memory
    if not memory_continues(memory, certifier.config.norm, written):
        raise ResultsError(f"{where} does not match {path} (another run's memory?): move it "
                           "away and pass a new --out, or restore the matching files")
    certifier.use_memory(memory)
    return memory


def unanswered_rows(writer: ResultsWriter, memory: Optional[Memory]) -> dict[int, Row]:
    """The rows in the writer's file that a kill left without their answers in the saved
    ``memory`` (the start of the group it cut), by idx; none without a memory."""
    if memory is None or not writer.done:
        return {}
    processed = set(memory.processed)
    table = read_results(writer.path)
    return {int(idx): table.row(i) for i, idx in enumerate(table.columns["idx"])
            if int(idx) not in processed}
