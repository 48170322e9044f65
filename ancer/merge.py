"""Merging results files (the shards of one run) into one file ordered by idx, each idx once
(docs/results.md, section 7).

Rows of one idx found in several files must agree on every column except ``time``; such
duplicates collapse to the first. The files' headers and sidecar settings must agree. Raw
rows of a data-dependent run are answered by the memory (:func:`replay`), whose file and
(ancer) the scales file in idx order are written beside the merged file, each atomically
and before the results file, which so appears only once they are complete.

A certificate with input-dependent scales is sound only as the memory answers it, in one
pass over all inputs in order, which no shard sees: shards write their inputs' own
certificates (memory column ``raw``) and the merge makes the pass with
:func:`ancer.runs.answer_raw`, in idx order. A raw row holds what it needs bit for bit: the
class, ``p_lower`` at full precision, the per-input σ (dds, a float32 written with ``repr``)
or θ in the scales file (ancer); the input is re-read from the dataset. So the merged rows
equal a single-process run's (all columns but ``time``).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np
import torch

from ancer.atomic import write_atomically
from ancer.data import ImageDataset, load_dataset
from ancer.errors import ArgumentError, DatasetError, ResultsError
from ancer.memory import Memory, MemoryOutcome
from ancer.results import (RAW, ResultsTable, Row, Sidecar, base_name, check_writable,
                           memory_path, read_results, read_sidecar, settings_differences,
                           shard_path, write_sidecar)
from ancer.runs import RawCertificate, answer_raw
from ancer.scales import read_scales, write_scales
from ancer.vocabulary import is_anisotropic, uses_memory


def find_shards(out: str | os.PathLike) -> list[Path]:
    """The shard files of ``out`` (``<base>.shard<i>of<k>.tsv`` beside it), i = 0..k-1;
    ResultsError if there are none, some are missing, or two shard counts are mixed."""
    base = base_name(check_writable(out))
    if not base.parent.is_dir():
        raise ResultsError(f"no shard files of {out}: the folder {base.parent} does not exist; "
                           "check --out (the --out the shards were run with), or list the files "
                           "to merge")
    pattern = re.compile(re.escape(base.name) + r"\.shard(\d+)of(\d+)\.tsv")
    found: dict[int, set[int]] = {}
    for candidate in base.parent.iterdir():
        match = pattern.fullmatch(candidate.name)
        if match:
            found.setdefault(int(match[2]), set()).add(int(match[1]))
    if not found:
        raise ResultsError(f"no shard files {base.name}.shard<i>of<k>.tsv found beside {out}: "
                           "check --out, or list the files to merge")
    if len(found) > 1:
        raise ResultsError(f"shards of {out} were made with different shard counts "
                           f"({', '.join(str(k) for k in sorted(found))}): list the files to merge")
    (count, indices), = found.items()
    missing = [i for i in range(count) if i not in indices]
    if missing:
        i = missing[0]
        raise ResultsError(f"shard {i} of {count} is missing ({shard_path(out, i, count)}): "
                           f"finish it (rerun with --shard {i}/{count}) or list the files to merge")
    return [shard_path(out, i, count) for i in range(count)]


def check_merge_target(out: Path) -> None:
    """Refuse to let a torchrun job's merge replace a file that is not an earlier merge."""
    if out.exists():
        sidecar = read_sidecar(out)
        if sidecar is None or "merged_from" not in sidecar.info:
            raise ResultsError(f"{out} exists and is not a merge of this job's shards: "
                               "pass a new --out")


def merge_shards(out: Path) -> MergeResult:
    """Merge the shards of ``out`` into it, replacing an earlier merge of them (a torchrun
    job's rank 0, once every rank is done)."""
    out.unlink(missing_ok=True)
    return merge_results(find_shards(out), out)


@dataclass(frozen=True)
class MergeResult:
    """What a merge did: rows written, identical duplicates collapsed, the partial last
    lines (a write cut by a kill) dropped from the inputs, as (file, text), and the report
    of the memory replayed over raw rows (None when there were none)."""

    out: Path
    inputs: tuple[Path, ...]
    rows: int
    collapsed: int
    dropped: tuple[tuple[Path, str], ...]
    memory: Optional[dict[str, int]] = None


def merge_results(inputs: Sequence[str | os.PathLike], out: str | os.PathLike,
                  data: Optional[str | os.PathLike] = None) -> MergeResult:
    """Merge ``inputs`` into ``out``, ordered by idx, each idx once (see the module doc).

    ``out`` may be one of the inputs (merging into it); if it exists and is not, the merge
    is refused rather than overwrite it. ``data`` replaces the dataset path recorded in the
    settings when raw rows are replayed and the data has moved.
    """
    inputs = tuple(Path(p) for p in inputs)
    out = check_writable(out)
    if not inputs:
        raise ArgumentError("nothing to merge: list the files, or give --out to find its shards")
    if out.exists() and not any(out.resolve() == p.resolve() for p in inputs):
        raise ResultsError(f"{out} already exists: delete it, choose another --out, "
                           "or list it among the files to merge into it")
    tables = [read_results(p) for p in inputs]
    for table in tables[1:]:
        if table.header != tables[0].header:
            raise ResultsError(f"{table.path} and {tables[0].path} have different columns: "
                               "merge only files of one run")
    sidecar = _merged_sidecar(inputs)
    raw = holds_raw_rows(tables)
    kept: dict[int, tuple[ResultsTable, int]] = {}
    collapsed = 0
    for table in tables:
        for row, idx in enumerate(int(i) for i in table.columns["idx"]):
            if idx in kept:
                _check_duplicate(idx, kept[idx], (table, row))
                collapsed += 1
            else:
                kept[idx] = (table, row)
    ordered = [kept[idx] for idx in sorted(kept)]
    out.parent.mkdir(parents=True, exist_ok=True)
    report = None
    if raw:
        lines, report = _replay_into(out, inputs, ordered, sidecar, data)
        sidecar = Sidecar(sidecar.settings, {**sidecar.info, "memory": report})
    else:
        lines = [table.lines[row] for table, row in ordered]
    if sidecar is not None:
        write_sidecar(out, sidecar)
    write_atomically(out, "".join(line + "\n" for line in ["\t".join(tables[0].header), *lines]))
    dropped = tuple((t.path, t.partial_line) for t in tables if t.partial_line is not None)
    return MergeResult(out, inputs, len(lines), collapsed, dropped, report)


def _replay_into(out: Path, inputs: Sequence[Path], ordered: Sequence[tuple[ResultsTable, int]],
                 sidecar: Optional[Sidecar], data: Optional[str | os.PathLike]
                 ) -> tuple[list[str], dict[str, int]]:
    """Answer the raw rows through the memory (:func:`replay`), save the memory
    and the scales beside ``out``; the answered rows' lines and the memory's report."""
    method = None if sidecar is None else sidecar.settings.get("method")
    if not isinstance(method, str) or not uses_memory(method):
        raise ResultsError(f"{inputs[0]} holds raw rows but its settings name no data-dependent "
                           f"method (method {method!r}): its sidecar is not the run's; restore it")
    rows = [table.row(number) for table, number in ordered]
    scales = _scales_by_idx(inputs) if is_anisotropic(method) else None
    replayed = replay(rows, sidecar.settings, scales, data)
    replayed.memory.save(memory_path(out))
    if replayed.scales is not None:
        write_scales(out, replayed.scales)
    return [row.to_line().rstrip("\n") for row in replayed.rows], replayed.memory.report()


def _scales_by_idx(inputs: Sequence[Path]) -> dict[int, Any]:
    """The scales records of the inputs' scales files by idx; the records of an idx found in
    several files must be equal (they are one input's scales, computed once per run)."""
    merged: dict[int, Any] = {}
    for path in inputs:
        for record in read_scales(path):
            idx = int(record["idx"])
            if idx in merged and not np.array_equal(merged[idx]["sigma"], record["sigma"]):
                raise ResultsError(f"idx {idx} has other scales in {path} than in an earlier "
                                   "shard: these come from different runs; merge only shards "
                                   "of one run")
            merged.setdefault(idx, record)
    return merged


def _merged_sidecar(inputs: Sequence[Path]) -> Sidecar | None:
    """The sidecar of the merge: the inputs' common settings, each input's info kept.
    None when no input has one (Cohen et al.'s files); an error when only some have."""
    sidecars = [read_sidecar(p) for p in inputs]
    if all(s is None for s in sidecars):
        return None
    for path, sidecar in zip(inputs, sidecars):
        if sidecar is None:
            raise ResultsError(f"{path} has no settings sidecar but other files do: "
                               "merge only shards of one run")
    for path, sidecar in zip(inputs[1:], sidecars[1:]):
        differences = settings_differences(sidecars[0].settings, sidecar.settings)
        if differences:
            listed = "; ".join(f"{name}: {a!r} vs {b!r}" for name, a, b in differences)
            raise ResultsError(f"{inputs[0]} and {path} were made with different settings "
                               f"({listed}): merge only shards of one run")
    return Sidecar(sidecars[0].settings, {"merged_from": [str(p) for p in inputs],
                                          "shards": [s.info for s in sidecars]})


def _check_duplicate(idx: int, first: tuple[ResultsTable, int],
                     second: tuple[ResultsTable, int]) -> None:
    """Raise ResultsError unless two rows of ``idx`` agree on every column but time."""
    (table_a, row_a), (table_b, row_b) = first, second
    fields_a = table_a.lines[row_a].split("\t")
    fields_b = table_b.lines[row_b].split("\t")
    differing = [f"{name} {a!r} vs {b!r}"
                 for name, a, b in zip(table_a.header, fields_a, fields_b)
                 if name != "time" and a != b]
    if differing:
        raise ResultsError(
            f"idx {idx} differs between {table_a.path} (line {row_a + 2}) and "
            f"{table_b.path} (line {row_b + 2}): {', '.join(differing)}; "
            "these rows come from different runs: merge only shards of one run")


def answered(row: Row, outcome: MemoryOutcome) -> Row:
    """``row`` (the input's own certificate) with the memory's answer in place of its class
    and region; the rest (p_lower, counts, scales) still describes the input's certificate."""
    return replace(
        row, predict=int(outcome.label), radius=float(outcome.radius),
        proxy_radius=float(outcome.proxy_radius), volume_radius=float(outcome.volume_radius),
        log_volume=float(outcome.log_volume), memory=outcome.summary)


def holds_raw_rows(tables: Sequence[ResultsTable]) -> bool:
    """Whether ``tables`` (the files of one merge) hold raw shard rows, which the merge must
    answer through the memory; ResultsError if only some rows are raw (answered rows cannot
    be replayed: their own certificates are gone)."""
    raw = {table.path: np.asarray(table.columns.get("memory", ()), dtype=object) == RAW
           for table in tables}
    if all(flags.all() for flags in raw.values()):
        return any(flags.size for flags in raw.values())
    if not any(flags.any() for flags in raw.values()):
        return False
    answered_in = next(path for path, flags in raw.items() if not flags.all())
    raw_in = next(path for path, flags in raw.items() if flags.any())
    raise ResultsError(f"{raw_in} holds raw shard rows but {answered_in} holds rows already "
                       "answered by the memory: merge only the shards of one run")


def load_inputs(settings: Mapping[str, object], data: Optional[str | os.PathLike] = None
                ) -> ImageDataset:
    """The run's inputs, as its settings select them (dataset kind, path, skip, max, and the
    reader's options: npz's number of classes, ImageNet's synset list); ``data`` replaces a
    dataset path that moved."""
    where = Path(data if data is not None else str(settings["data"]))
    if not where.exists():
        raise DatasetError(f"replaying the memory needs the run's inputs, but {where} is gone: "
                           "restore the data there, or give its new place with "
                           "'certify merge --data PATH'")
    options = {key: settings[key] for key in ("num_classes", "synsets", "classes", "labels_sorted")
               if key in settings}
    return load_dataset(str(settings["dataset"]), where, skip=int(settings["skip"]),
                        max=settings["max"], **options)


@dataclass(frozen=True)
class Replayed:
    """The outcome of a replay: the answered rows (idx order), the memory after the pass,
    and the scales records in idx order (ancer; None for dds)."""

    rows: list[Row]
    memory: Memory
    scales: Optional[np.ndarray]


def replay(rows: Sequence[Row], settings: Mapping[str, object],
           scales: Optional[Mapping[int, np.void]], data: Optional[str | os.PathLike] = None
           ) -> Replayed:
    """Answer the raw ``rows`` of a run with ``settings`` through the memory's pass over all
    its inputs in idx order (:func:`ancer.runs.answer_raw`). ``scales`` maps idx to its
    scales record (ancer) or is None (dds)."""
    ordered = sorted(rows, key=lambda row: row.idx)
    raw = [RawCertificate(row.idx, row.label, row.predict, row.p_lower, row.radius,
                          row.sigma if scales is None else _scale_of(scales, row.idx))
           for row in ordered]
    memory, outcomes = answer_raw(
        load_inputs(settings, data), str(settings["norm"]), float(settings["sigma"]), raw,
        f" (skip {settings['skip']}, max {settings['max']}) of {settings['data']}")
    records = None if scales is None else np.array([scales[r.idx] for r in ordered])
    return Replayed([answered(row, outcome) for row, outcome in zip(ordered, outcomes)],
                    memory, records)


def _scale_of(scales: Mapping[int, np.void], idx: int) -> torch.Tensor:
    """The scales θ of input ``idx`` from its record, as the raw certificate needs them."""
    if idx not in scales:
        raise ResultsError(f"idx {idx} has no scales in the shards' scales files: restore the "
                           "shard's .scales.npy, or certify that shard again")
    return torch.from_numpy(np.array(scales[idx]["sigma"]))
