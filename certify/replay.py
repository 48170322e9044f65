"""The merge of a sharded data-dependent run (``dds``, ``ancer``): its raw rows answered by
the memory (docs/results.md, section 7).

A certificate with input-dependent scales is sound only as the memory answers it, in one
pass over all inputs in order, which no shard sees: shards write their inputs' own
certificates (memory column ``raw``) and the merge makes the pass with
:func:`ancer.memory.replay`, in idx order. A raw row holds what it needs bit for bit: the
class, ``p_lower`` at full precision, the per-input σ (dds, a float32 written with ``repr``)
or θ in the scales file (ancer); the input is re-read from the dataset. So the merged rows
equal a single-process run's (all columns but ``time``).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Mapping, Optional, Sequence

import numpy as np
import torch

from ancer.data import ImageDataset, load_dataset
from ancer.errors import DatasetError, ResultsError
from ancer.memory import Memory, MemoryOutcome, OwnCertificate, replay as replay_memory
from ancer.noise import noise_for_norm
from certify.results import RAW, ResultsTable, Row, beside


def memory_path(path: str | os.PathLike) -> Path:
    """The memory file of a results file: ``results.tsv`` -> ``results.memory.pt``."""
    return beside(path, ".memory.pt")


def answered(row: Row, outcome: MemoryOutcome) -> Row:
    """``row`` (the input's own certificate) with the memory's answer in place of its class
    and region; the rest (p_lower, counts, scales) still describes the input's certificate."""
    return dataclasses.replace(
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
    options = {key: settings[key] for key in ("num_classes", "synsets") if key in settings}
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
    own = []
    for position, row in enumerate(ordered):
        x, label = dataset[position]
        if int(label) != row.label:
            raise ResultsError(f"idx {row.idx} has label {int(label)} in {dataset.name} data but "
                               f"{row.label} in its row: the data changed since the run; "
                               "restore it, or certify again")
        scale = row.sigma if scales is None else _scale_of(scales, row.idx)
        own.append(OwnCertificate(row.idx, x, row.predict, row.p_lower,
                                  noise.with_sigma(scale), row.radius))
    memory, outcomes = replay_memory(noise.norm, own)
    records = None if scales is None else np.array([scales[r.idx] for r in ordered])
    return Replayed([answered(row, outcome) for row, outcome in zip(ordered, outcomes)],
                    memory, records)


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
