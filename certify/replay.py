"""Memory-based certification of data-dependent runs: the memory column, and its replay at
the merge of a sharded run.

With scales that depend on the input (``dds``, ``ancer``), a certificate is sound only as
the memory answers it (Alfarra et al., "Data dependent randomized smoothing",
UAI 2022, §3.5): every input is checked against the regions of all earlier ones, in one
ordered pass (:class:`ancer.memory.Memory`). Shards certify disjoint inputs concurrently,
so none of them can make that pass. Each shard therefore writes its inputs' own
certificates untouched (memory column ``raw``), and the merge makes the pass afterwards:
it rebuilds every raw certificate (class, region) exactly from its row, its input and its
scales, and runs the memory over all inputs in idx order. A raw row holds what the memory
needs of a certificate, bit for bit:

- the class: ``predict`` (ABSTAIN when ``p_lower`` <= 1/2);
- the region: the noise's ``region(x, p_lower)`` for the input x re-read from the dataset,
  ``p_lower`` written at full precision, and the input's scales: the per-input σ of the row
  (dds; a float32 value written with ``repr``) or its per-dimension θ from the scales file
  (ancer; float32, as optimized). ``Noise.region`` is the function CERTIFY itself calls with
  these values, so the region is the one the single-process run gave the memory.

The memory then gives, input by input, the answers it gives in a single-process run, which
certifies the same inputs in the same order: the merged rows equal that run's rows (all
columns but ``time``), and the saved memory and scales file continue it on resume.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Mapping, Optional, Sequence

import numpy as np
import torch

from ancer.certificates import Region
from ancer.data import ImageDataset, load_dataset
from ancer.errors import DatasetError, ResultsError
from ancer.labels import ABSTAIN
from ancer.memory import ABSTAINED, KEPT, OVERRIDDEN, SHRUNK, Memory, MemoryOutcome
from ancer.noise import Noise, noise_for_norm
from certify.results import ResultsTable, Row, base_name

#: the methods whose scales depend on the input, certified through the memory
MEMORY_METHODS = frozenset({"dds", "ancer"})
#: memory column of a shard's row: the input's own certificate, before the memory
RAW = "raw"
#: memory column of a method without a memory
NO_MEMORY = "-"
#: the counters of a memory report, as a run prints them
_REPORTED = (KEPT, SHRUNK, OVERRIDDEN, ABSTAINED)


def memory_path(path: str | os.PathLike) -> Path:
    """The memory file of a results file: ``results.tsv`` -> ``results.memory.pt``."""
    base = base_name(path)
    return base.with_name(base.name + ".memory.pt")


def outcome_text(outcome: MemoryOutcome, memory: Memory) -> str:
    """The memory column of an answer: ``kept``, ``shrunk:<factor>``, ``override:<idx of
    the deciding input>`` or ``abstain``."""
    if outcome.action == SHRUNK:
        return f"shrunk:{outcome.factor!r}"
    if outcome.action == OVERRIDDEN:
        return f"override:{memory.keys[outcome.source]}"
    return "abstain" if outcome.action == ABSTAINED else KEPT


def answered(row: Row, outcome: MemoryOutcome, memory: Memory) -> Row:
    """``row`` (the input's own certificate) with the memory's answer in place of its class
    and region; the rest (p_lower, counts, scales) still describes the input's certificate."""
    return dataclasses.replace(
        row, predict=int(outcome.label), radius=float(outcome.radius),
        proxy_radius=float(outcome.proxy_radius), volume_radius=float(outcome.volume_radius),
        log_volume=float(outcome.log_volume), memory=outcome_text(outcome, memory))


def describe(report: Mapping[str, int]) -> str:
    """A memory report (:meth:`Memory.report`) in one line."""
    counts = ", ".join(f"{report[name]} {name}" for name in _REPORTED)
    return (f"memory: {report['inputs']} inputs: {counts} ({report['exact_tests']} exact "
            f"tests, {report['stored']} regions stored)")


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


@dataclasses.dataclass(frozen=True)
class Replayed:
    """The outcome of a replay: the answered rows (idx order), the memory after the pass,
    and the scales records in idx order (ancer; None for dds)."""

    rows: list[Row]
    memory: Memory
    scales: Optional[np.ndarray]


def replay(rows: Sequence[Row], settings: Mapping[str, object],
           scales: Optional[Mapping[int, np.void]], data: Optional[str | os.PathLike] = None
           ) -> Replayed:
    """Answer the raw ``rows`` of a run with ``settings`` through one memory pass over all
    its inputs in idx order (see the module docstring for why this equals a single-process
    run). ``scales`` maps idx to its scales record (ancer) or is None (dds)."""
    dataset = load_inputs(settings, data)
    ordered = sorted(rows, key=lambda row: row.idx)
    _check_coverage([row.idx for row in ordered], dataset, settings)
    noise = noise_for_norm(str(settings["norm"]), float(settings["sigma"]))
    memory = Memory(str(settings["norm"]))
    final = []
    for position, row in enumerate(ordered):
        x, label = dataset[position]
        if int(label) != row.label:
            raise ResultsError(f"idx {row.idx} has label {int(label)} in {dataset.name} data but "
                               f"{row.label} in its row: the data changed since the run; "
                               "restore it, or certify again")
        scale = row.sigma if scales is None else _scale_of(scales, row.idx)
        region = own_region(noise.with_sigma(scale), row, x)
        final.append(answered(row, memory.certify(x, row.predict, region, key=row.idx), memory))
    records = None if scales is None else np.array([scales[r.idx] for r in ordered])
    return Replayed(final, memory, records)


def own_region(noise: Noise, row: Row, x: torch.Tensor) -> Optional[Region]:
    """The region of a raw row's certificate (None when it abstains), rebuilt as CERTIFY
    built it: ``noise.region(x, p_lower)``. Its proxy radius must be the row's radius, which
    catches scales or data of another run."""
    if row.predict == ABSTAIN:
        return None
    if not row.p_lower > 0.5:
        raise ResultsError(f"idx {row.idx}: class {row.predict} with p_lower {row.p_lower!r} "
                           "<= 1/2 is not a certificate: the row is corrupt; certify it again")
    region = noise.region(x, row.p_lower)
    if region.proxy_radius != row.radius:
        raise ResultsError(f"idx {row.idx}: its scales give radius {region.proxy_radius!r}, its "
                           f"row {row.radius!r}: the scales or settings belong to another run; "
                           "merge only the files of one run")
    return region


def _scale_of(scales: Mapping[int, np.void], idx: int) -> torch.Tensor:
    if idx not in scales:
        raise ResultsError(f"idx {idx} has no scales in the shards' scales files: restore the "
                           "shard's .scales.npy, or certify that shard again")
    return torch.from_numpy(np.array(scales[idx]["sigma"]))


def _check_coverage(indices: Sequence[int], dataset: ImageDataset,
                    settings: Mapping[str, object]) -> None:
    """The memory must see every input of the run: the rows' idx must be the selection's."""
    expected = [int(i) for i in dataset.indices]
    if list(indices) == expected:
        return
    missing = sorted(set(expected) - set(indices))
    if missing:
        raise ResultsError(f"idx {missing[0]} ({len(missing)} inputs in all) has no row yet, and "
                           "the memory must see every input in order: finish every shard "
                           "(rerun the same command with its --shard), then merge")
    extra = sorted(set(indices) - set(expected))[0]
    raise ResultsError(f"idx {extra} is not among the run's inputs (skip {settings['skip']}, "
                       f"max {settings['max']}) of {settings['data']}: merge only the shards "
                       "of one run")
