"""The results file: one TSV row per certified input, the files kept beside it, and its JSON
settings sidecar.

This module is the one place that defines the schema, a certificate's row (:func:`make_row`)
and the names of the files beside a results file, and reads them (the writer is
:mod:`ancer.writer`); every column is explained in docs/results.md. The first six columns
are Cohen et al.'s (2019, locuslab/smoothing ``code/certify.py``), so their analysis scripts
read our files, and files of theirs are read as they are (radii rounded to 3 digits, time as
``H:MM:SS.ffffff``); ours follow (``COLUMNS``), the last ones optional
(``OPTIONAL_COLUMNS``: files of earlier versions lack them). ``p_lower``, ``count_a``, ``counts_top2`` and ``n`` describe the input's own
CERTIFY, before the memory; the region columns describe the answered region.

Floats are written with ``repr(float)`` (full precision, never rounded up). Every row is
written by one ``write`` call that ends in a newline, then flushed and fsynced, so a job
killed at any moment (kill -9) leaves at most a partial last line, which the reader drops
and reports and the writer truncates before appending. The sidecar ``<base>.json`` holds
``settings`` (compared on resume and merge) and ``info`` (recorded, not compared).
"""

from __future__ import annotations

import json
import os
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from ancer.atomic import write_atomically
from ancer.errors import ArgumentError, ResultsError
from ancer.labels import ABSTAIN
from ancer.smoothing import Certificate
from ancer.vocabulary import CLOPPER_PEARSON, is_anisotropic

COHEN_COLUMNS = ("idx", "label", "predict", "radius", "correct", "time")
COLUMNS = COHEN_COLUMNS + (
    "norm", "method", "sigma", "half_width", "p_lower", "proxy_radius", "volume_radius",
    "log_volume", "n0", "n", "alpha", "count_a", "counts_top2", "precision", "memory",
    "count_label", "samples", "bound",
)
#: trailing columns that files of earlier versions lack, and the value read in their place
#: memory column of a method without a memory
NO_MEMORY = "-"
#: memory column of a shard's row: the input's own certificate, before the memory
RAW = "raw"
OPTIONAL_COLUMNS = {"memory": NO_MEMORY, "count_label": "-1", "samples": "-1",
                    "bound": CLOPPER_PEARSON}
SIDECAR_FORMAT = "ancer-results/1"

_TIME = re.compile(r"(?:(\d+) days?, )?(\d+):(\d{2}):(\d{2}(?:\.\d*)?)")


def parse_time(text: str) -> float:
    """Seconds from a ``time`` field: seconds (``1.0936``) or ``[D day(s), ]H:MM:SS[.ffffff]``.

    Cohen et al. write ``str(datetime.timedelta)`` in their ImageNet files.
    """
    match = _TIME.fullmatch(text)
    if match is None:
        return float(text)
    days, hours, minutes, seconds = match.groups()
    return ((int(days or 0) * 24 + int(hours)) * 60 + int(minutes)) * 60 + float(seconds)


_PARSERS: dict[str, Callable[[str], Any]] = {
    "idx": int, "label": int, "predict": int, "radius": float, "correct": int,
    "time": parse_time, "sigma": float, "half_width": float, "p_lower": float,
    "proxy_radius": float, "volume_radius": float, "log_volume": float, "n0": int, "n": int,
    "alpha": float, "count_a": int, "count_label": int, "samples": int,
}
_DTYPES = {int: np.int64, float: np.float64, parse_time: np.float64}


@dataclass(frozen=True)
class Row:
    """One certified input, as written to the TSV (see the module docstring for each field).

    ``correct`` is derived: 1 iff ``predict == label``.
    """

    idx: int
    label: int
    predict: int
    radius: float
    time: float
    norm: str
    method: str
    sigma: float
    half_width: float
    p_lower: float
    proxy_radius: float
    volume_radius: float
    log_volume: float
    n0: int
    n: int
    alpha: float
    count_a: int
    counts_top2: tuple[tuple[int, int], ...]
    precision: str
    memory: str = NO_MEMORY
    count_label: int = -1
    samples: int = -1
    bound: str = CLOPPER_PEARSON

    def __post_init__(self) -> None:
        if not self.radius >= 0.0:
            raise ArgumentError(f"row {self.idx}: radius must be >= 0, got {self.radius!r}")
        if self.predict == ABSTAIN and self.radius != 0.0:
            raise ArgumentError(f"row {self.idx}: an abstention has radius 0.0, "
                                f"got {self.radius!r}")
        for name in ("norm", "method", "precision", "memory", "bound"):
            if re.search(r"[\t\r\n]", getattr(self, name)):
                raise ArgumentError(f"row {self.idx}: {name} must not hold tabs or newlines")

    @property
    def correct(self) -> int:
        return int(self.predict == self.label)

    def to_line(self) -> str:
        """The row as one TSV line, newline included; floats at full precision (repr)."""
        fields = []
        for name in COLUMNS:
            value = getattr(self, name)
            if name == "counts_top2":
                fields.append(",".join(f"{int(c)}:{int(k)}" for c, k in value))
            elif isinstance(value, str):
                fields.append(value)
            elif _PARSERS[name] is int:
                fields.append(str(int(value)))
            else:
                fields.append(repr(float(value)))
        return "\t".join(fields) + "\n"


def memory_text(certificate: Certificate, uses_memory: bool) -> str:
    """The memory column: ``-`` for a method without a memory, ``raw`` for a shard's own
    certificate, else the memory's answer (kept, shrunk:<factor>, override:<idx>, abstain)."""
    if not uses_memory:
        return NO_MEMORY
    return RAW if certificate.memory is None else certificate.memory.summary


def make_row(idx: int, label: int, certificate: Certificate, method: str, elapsed: float,
             uses_memory: bool) -> Row:
    """The TSV row of one input's certificate (the memory's answer, the input's own
    certificate in a shard of a ``uses_memory`` method, ``raw``).

    ``p_lower``, ``count_a``, ``counts_top2`` and ``n`` describe the input's own CERTIFY
    (before any memory): ``count_a`` is the estimation votes of the class selected from the
    n0 draws, the count ``p_lower`` bounds; ``count_label`` the votes for the true label (the
    base classifier's accuracy under noise); ``sigma`` the isotropic σ (dds: the input's;
    ancer: the σ its scales started from); ``samples`` the forward passes spent."""
    counts = certificate.counts
    top_two = np.argsort(-counts, kind="stable")[:2]
    noise = certificate.noise
    sigma = certificate.start_sigma if certificate.start_sigma is not None else float(noise.sigma)
    half_width = noise.half_width_of(sigma)
    return Row(
        idx=int(idx), label=int(label), predict=int(certificate.label),
        radius=float(certificate.radius),
        time=float(elapsed), norm=certificate.norm, method=method, sigma=float(sigma),
        half_width=math.nan if half_width is None else float(half_width),
        p_lower=float(certificate.p_lower), proxy_radius=float(certificate.proxy_radius),
        volume_radius=float(certificate.volume_radius), log_volume=float(certificate.log_volume),
        n0=certificate.n0, n=certificate.n, alpha=certificate.alpha,
        count_a=int(counts[certificate.selected]),
        counts_top2=tuple((int(c), int(counts[c])) for c in top_two),
        precision=certificate.precision, memory=memory_text(certificate, uses_memory), count_label=int(counts[label]),
        samples=int(certificate.samples), bound=certificate.bound,
    )


@dataclass(frozen=True, eq=False)
class ResultsTable:
    """A results file as read: header, typed columns, and each row's text as written.

    ``columns`` maps every header name to an array (int64, float64, or object for text);
    ``lines`` keeps each row's raw text (no newline) in file order: row i is line i + 2 of
    the file. ``partial_line`` is the dropped newline-less last line, if any.
    """

    path: Path
    header: tuple[str, ...]
    columns: dict[str, np.ndarray]
    lines: tuple[str, ...]
    partial_line: str | None = None

    def __len__(self) -> int:
        return len(self.lines)

    def row(self, number: int) -> Row:
        """Row ``number`` (file order) as a :class:`Row`, which writes it back unchanged; the
        file must have our columns (optional trailing ones may be missing)."""
        missing = [name for name in COLUMNS
                   if name not in self.columns and name not in OPTIONAL_COLUMNS]
        if missing:
            raise ResultsError(f"{self.path} lacks the column {missing[0]}: only files written "
                               "by certify can be rewritten; merge them as they are")
        values = {name: _plain(self.columns[name][number]) for name in COLUMNS
                  if name in self.columns and name not in ("correct", "counts_top2")}
        return Row(**values, counts_top2=_parse_counts(self.columns["counts_top2"][number]))

    @property
    def anisotropic(self) -> bool:
        """Whether any row was certified with per-dimension (anisotropic) scales."""
        methods = self.columns.get("method")
        return methods is not None and any(is_anisotropic(m) for m in methods)


def read_results(path: str | os.PathLike) -> ResultsTable:
    """Read a results TSV (ours or Cohen et al.'s), validating every row.

    A newline-less last line (a write cut by a kill) is dropped and reported in
    ``partial_line``; any other malformed line raises ResultsError naming file and line.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ResultsError(f"{path}: no such results file; check the path") from None
    except IsADirectoryError:
        raise ResultsError(f"{path} is a directory; give a results .tsv file") from None
    cut = data.rfind(b"\n") + 1  # a write cut short may also have split a character
    partial = data[cut:].decode("utf-8", errors="replace") or None
    try:
        lines = data[:cut].decode("utf-8").split("\n")[:-1]
    except UnicodeDecodeError:
        raise ResultsError(f"{path} is not a text TSV file; give a results .tsv file") from None
    if not lines:
        raise ResultsError(f"{path} has no complete header line: not a results file "
                           "(if a run was killed while starting, delete it and rerun)")
    header = tuple(lines[0].rstrip("\r").split("\t"))
    if header[:len(COHEN_COLUMNS)] != COHEN_COLUMNS:
        raise ResultsError(f"{path} is not a results file: its header starts "
                           f"{' '.join(header[:6])!r}, expected {' '.join(COHEN_COLUMNS)!r}")
    parsers = [_PARSERS.get(name, str) for name in header]
    values: list[list[Any]] = [[] for _ in header]
    for number, line in enumerate(lines[1:], start=2):
        fields = _fields(line, header)
        if len(fields) != len(header):
            raise ResultsError(f"{path}, line {number}: {len(fields)} fields, the header has "
                               f"{len(header)}; the file is corrupt: repair or delete that line")
        for column, parse, name, field_text in zip(values, parsers, header, fields):
            try:
                column.append(parse(field_text))
            except ValueError:
                raise ResultsError(f"{path}, line {number}: column {name} holds {field_text!r}, "
                                   "not a number; repair or delete that line") from None
        _check_row(path, number, dict(zip(header, (column[-1] for column in values))))
    columns = {name: np.array(column, dtype=_DTYPES.get(parse, object))
               for name, parse, column in zip(header, parsers, values)}
    return ResultsTable(path, header, columns, tuple(l.rstrip("\r") for l in lines[1:]), partial)


def _plain(value: Any) -> Any:
    """A NumPy scalar as the Python int or float it was parsed from; text as it is."""
    return value.item() if isinstance(value, np.generic) else value


def _parse_counts(text: str) -> tuple[tuple[int, int], ...]:
    """``counts_top2`` as written, ``c:k,c:k`` (empty when no vote was cast)."""
    return tuple((int(c), int(k)) for c, k in (pair.split(":") for pair in text.split(",") if pair))


def _fields(line: str, header: tuple[str, ...]) -> list[str]:
    """The fields of a row; a row that lacks trailing optional columns (a hand-written file
    under a full header) gets their default values, which is what such a file means."""
    fields = line.rstrip("\r").split("\t")
    for name in header[len(fields):]:
        if name not in OPTIONAL_COLUMNS:
            break
        fields.append(OPTIONAL_COLUMNS[name])
    return fields


def _check_row(path: Path, number: int, row: Mapping[str, Any]) -> None:
    """Reject rows whose Cohen columns contradict each other (a sign of shifted columns)."""
    if row["correct"] != int(row["predict"] == row["label"]):
        raise ResultsError(f"{path}, line {number}: correct={row['correct']} but predict="
                           f"{row['predict']} and label={row['label']}; repair or delete that line")
    if not row["radius"] >= 0.0 or (row["predict"] == ABSTAIN and row["radius"] != 0.0):
        raise ResultsError(f"{path}, line {number}: radius {row['radius']!r} is impossible for "
                           f"predict={row['predict']}; repair or delete that line")


def done_indices(path: str | os.PathLike) -> set[int]:
    """The input indices already written to ``path`` (empty if the file does not exist)."""
    if not Path(path).exists():
        return set()
    return {int(i) for i in read_results(path).columns["idx"]}


def base_name(path: str | os.PathLike) -> Path:
    """``path`` without a trailing ``.tsv`` (Cohen et al.'s files have no extension)."""
    path = Path(path)
    return path.with_name(path.name[:-4]) if path.name.endswith(".tsv") else path


def beside(path: str | os.PathLike, suffix: str) -> Path:
    """A file kept beside results file ``path``: its base name with ``suffix``, e.g.
    ``results.tsv`` -> ``results.json`` (the settings sidecar), ``results.memory.pt``,
    ``results.scales.npy``, ``results.lock``, ``results.shard0of4.tsv``."""
    base = base_name(path)
    return base.with_name(base.name + suffix)


def sidecar_path(path: str | os.PathLike) -> Path:
    """The settings sidecar of a results file: ``results.tsv`` -> ``results.json``."""
    return beside(path, ".json")


def shard_path(path: str | os.PathLike, index: int, count: int) -> Path:
    """The file of shard ``index`` (0-based) of ``count``: ``results.shard0of4.tsv``."""
    if not 0 <= index < count:
        raise ArgumentError(f"shard {index}/{count}: need 0 <= i < k, e.g. 0/{max(count, 1)}")
    return beside(path, f".shard{index}of{count}.tsv")


def memory_path(path: str | os.PathLike) -> Path:
    """The memory file of a results file: ``results.tsv`` -> ``results.memory.pt``."""
    return beside(path, ".memory.pt")


def scales_path(path: str | os.PathLike) -> Path:
    """The scales file of a results file: ``results.tsv`` -> ``results.scales.npy``."""
    return beside(path, ".scales.npy")


def lock_path(path: str | os.PathLike) -> Path:
    """The lock file of a results file: ``results.tsv`` -> ``results.lock``."""
    return beside(path, ".lock")


def check_writable(path: str | os.PathLike) -> Path:
    """``path`` as a results file to write: ResultsError in one line when it names a folder."""
    path = Path(path)
    if path.is_dir():
        raise ResultsError(f"--out {path} is a folder: give a results file, e.g. "
                           f"--out {path / 'results.tsv'}")
    return path


@dataclass(frozen=True)
class Sidecar:
    """A results file's settings (compared on resume and merge) and info (not compared)."""

    settings: dict[str, Any]
    info: dict[str, Any] = field(default_factory=dict)


def write_sidecar(path: str | os.PathLike, sidecar: Sidecar) -> None:
    """Write the sidecar of results file ``path`` atomically (temp file + os.replace)."""
    document = {"format": SIDECAR_FORMAT, "settings": sidecar.settings, "info": sidecar.info}
    write_atomically(sidecar_path(path), json.dumps(document, indent=2, sort_keys=True) + "\n")


def read_sidecar(path: str | os.PathLike) -> Sidecar | None:
    """The sidecar of results file ``path``, or None if it has none (e.g. Cohen et al.'s)."""
    where = sidecar_path(path)
    try:
        document = json.loads(where.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (ValueError, UnicodeDecodeError) as exc:
        raise ResultsError(f"{where} is not valid JSON ({exc}): restore it or use a new --out") \
            from None
    if not isinstance(document, dict) or document.get("format") != SIDECAR_FORMAT:
        raise ResultsError(f"{where} is not an ancer results sidecar "
                           f"(no format {SIDECAR_FORMAT!r}); restore it or use a new --out")
    return Sidecar(document.get("settings", {}), document.get("info", {}))


def add_sidecar_info(path: str | os.PathLike, **info: Any) -> None:
    """Add ``info`` entries to the sidecar of results file ``path`` (atomically); the settings
    are untouched, so resuming and merging compare the same values."""
    sidecar = read_sidecar(path)
    if sidecar is None:
        raise ResultsError(f"{path} has no settings file {sidecar_path(path).name}: "
                           "it was deleted during the run; pass a new --out")
    write_sidecar(path, Sidecar(sidecar.settings, {**sidecar.info, **info}))


def settings_differences(first: Mapping[str, Any],
                         second: Mapping[str, Any]) -> list[tuple[str, Any, Any]]:
    """The settings that differ, as (name, first value, second value); None when absent.

    Values are compared as JSON stores them (a tuple equals the list it is written as).
    """
    first, second = (json.loads(json.dumps(dict(s), sort_keys=True)) for s in (first, second))
    return [(name, first.get(name), second.get(name))
            for name in sorted(first.keys() | second.keys())
            if first.get(name) != second.get(name)]


def check_compatible(settings_on_disk: Mapping[str, Any], settings_now: Mapping[str, Any],
                     path: str | os.PathLike | None = None) -> None:
    """Raise ResultsError unless a run with ``settings_now`` may append to a file written
    with ``settings_on_disk`` (all settings equal); the message names each difference."""
    differences = settings_differences(settings_on_disk, settings_now)
    if differences:
        where = f"{path} was" if path is not None else "the results file was"
        listed = "; ".join(f"{name}: {disk!r} on disk, {now!r} now"
                           for name, disk, now in differences)
        raise ResultsError(f"{where} written with other settings ({listed}): pass a new --out "
                           "to start another run, or the same flags to resume this one")
