"""A certification run over a dataset: resumable, shardable, and for a data-dependent method
answered by one memory pass over all inputs in order (docs/results.md, sections 6 and 7).

The inputs (positions 0..N−1 of the dataset, with dataset indices ``dataset.indices``) are
cut into fixed groups of ``group_size`` consecutive positions; a shard ``(i, k)`` takes the
groups whose number is i mod k. A group is always certified whole, since batched
floating-point arithmetic may round differently in another company: a group that a stop
cut is certified whole again on resume (its inputs done before come back marked
``again``), so that a resumed or sharded run gives an uninterrupted single run's
certificates bit for bit. Inputs the engine's memory already answered are skipped.

A shard of a data-dependent method (dds, ancer) sees only its own inputs, so it keeps their
own certificates (``raw``), not sound alone; :func:`answer_raw` makes the memory's pass over
all of them in index order (:func:`ancer.memory.replay`), which a single run makes as it
goes, and so answers them as that run does.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import AbstractSet, Callable, Iterator, List, Optional, Sequence, Tuple, Union

import torch

from ancer.engine import Certifier, CertifyConfig
from ancer.errors import ArgumentError, ResultsError
from ancer.memory import Memory, MemoryOutcome, OwnCertificate, replay
from ancer.noise import noise_for_norm
from ancer.smoothing import Certificate

#: the most noise draws (n0 + n each) that the inputs of one group may take together, so
#: that a row is written every few minutes at most: 100 forward batches of 1000, about 2
#: minutes of a CIFAR ResNet-20 on a 2-core CPU. A larger group only fills the n0 selection
#: draws of several inputs into one forward batch, which saves little once each input's n
#: fills batches of its own
GROUP_SAMPLES = 100_000

Shard = Tuple[int, int]


def group_size(config: CertifyConfig) -> int:
    """Inputs certified together: enough to fill one forward batch with their n0 selection
    draws, but no more than ``GROUP_SAMPLES`` draws in all (at least one input)."""
    return max(1, min(config.batch // config.n0, GROUP_SAMPLES // (config.n0 + config.n)))


def shard_groups(count: int, size: int, shard: Optional[Shard] = None) -> List[range]:
    """The groups of ``size`` consecutive positions among ``count`` inputs that ``shard``
    ``(i, k)`` takes (number i mod k; all groups without a shard)."""
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ArgumentError(f"the group size must be an integer >= 1, got {size!r}")
    if shard is not None and not (len(shard) == 2 and 0 <= shard[0] < shard[1]):
        raise ArgumentError(f"a shard is (i, k) with 0 <= i < k, got {shard!r}")
    groups = [range(start, min(start + size, count)) for start in range(0, count, size)]
    return [g for number, g in enumerate(groups) if shard is None or number % shard[1] == shard[0]]


def memory_continues(memory: Memory, norm: str, written: Sequence[int]) -> bool:
    """Whether ``memory`` (saved after each group) can go on a run of ``norm`` whose inputs
    certified so far are ``written``, in order: its inputs must be their first ones."""
    processed = list(memory.processed)
    return memory.norm == norm and processed == list(written[:len(processed)])


@dataclass(frozen=True)
class Certified:
    """One input's certificate in a run: its dataset ``idx`` and true ``label``, the
    ``certificate`` (the memory's answer, or the input's own in a shard of a data-dependent
    method), the ``seconds`` its group took per input, and ``again``: the input was done
    before and was certified again only with its group (its certificate must equal the
    earlier one)."""

    idx: int
    label: int
    certificate: Certificate
    seconds: float
    again: bool


def certify_dataset(certifier: Certifier, dataset: Sequence, *, size: Optional[int] = None,
                    shard: Optional[Shard] = None, done: AbstractSet[int] = frozenset(),
                    progress: Optional[Callable[[int], None]] = None) -> Iterator[List[Certified]]:
    """Certify ``dataset`` (a sequence of (x, label) with dataset ``indices``; default
    0..N−1) with ``certifier``, one list of :class:`Certified` per group, in order (see the
    module docstring). ``size`` is the group size (default :func:`group_size`), ``shard``
    this process's ``(i, k)``, ``done`` the indices certified before (a resume); with a
    memory, the inputs it answered are skipped (the groups of a grown dataset go on from
    them). ``progress`` receives the noise draws as they are spent."""
    indices = [int(i) for i in getattr(dataset, "indices", range(len(dataset)))]
    memory = certifier.memory if shard is None else None
    finished = set(memory.processed) if memory is not None else set(done)
    for group in shard_groups(len(dataset), group_size(certifier.config) if size is None else size, shard):
        todo = [p for p in group if memory is None or indices[p] not in finished]
        if all(indices[p] in finished for p in todo):
            continue
        items = [dataset[p] for p in todo]
        start = time.perf_counter()
        certificates = certifier.certify_batch(torch.stack([x for x, _ in items]),
                                               [indices[p] for p in todo], progress=progress,
                                               raw=shard is not None)
        seconds = (time.perf_counter() - start) / len(todo)
        yield [Certified(indices[p], int(label), certificate, seconds, indices[p] in done)
               for p, (_, label), certificate in zip(todo, items, certificates)]


@dataclass(frozen=True)
class RawCertificate:
    """An input's own certificate as a shard records it: its dataset ``idx`` and true
    ``label``, the certified class ``predict``, ``p_lower``, the proxy ``radius``, and its
    scale: the σ (dds) or the per-dimension scales θ (ancer)."""

    idx: int
    label: int
    predict: int
    p_lower: float
    radius: float
    scale: Union[float, torch.Tensor]


def answer_raw(dataset: Sequence, norm: str, sigma: float, raw: Sequence[RawCertificate],
               selection: str = "") -> Tuple[Memory, List[MemoryOutcome]]:
    """The memory's answers to the ``raw`` certificates of a run over ``dataset`` with noise
    ``norm``/``sigma``, in index order: (the memory after its pass, the outcomes). The memory
    must see every input of the run, so ``raw`` must cover the dataset's indices exactly;
    each input is re-read from ``dataset`` and its label checked. ``selection`` describes
    the run's inputs in an error."""
    ordered = sorted(raw, key=lambda record: record.idx)
    _check_coverage([record.idx for record in ordered],
                    [int(i) for i in getattr(dataset, "indices", range(len(dataset)))], selection)
    noise = noise_for_norm(norm, sigma)
    own = []
    for position, record in enumerate(ordered):
        x, label = dataset[position]
        if int(label) != record.label:
            raise ResultsError(f"idx {record.idx} has label {int(label)} in "
                               f"{getattr(dataset, 'name', 'the')} data but {record.label} in "
                               "its row: the data changed since the run; restore it, or "
                               "certify again")
        own.append(OwnCertificate(record.idx, x, record.predict, record.p_lower,
                                  noise.with_sigma(record.scale), record.radius))
    return replay(norm, own)


def _check_coverage(indices: Sequence[int], expected: Sequence[int], selection: str) -> None:
    """The memory must see every input of the run: the indices must be the selection's."""
    if list(indices) == list(expected):
        return
    missing = sorted(set(expected) - set(indices))
    if missing:
        raise ResultsError(f"idx {missing[0]} ({len(missing)} inputs in all) has no row yet, and "
                           "the memory must see every input in order: finish every shard "
                           "(rerun the same command with its --shard), then merge")
    extra = sorted(set(indices) - set(expected))[0]
    raise ResultsError(f"idx {extra} is not among the run's inputs{selection}: merge only the "
                       "shards of one run")
