"""A certification run over a dataset: resumable, sharded, locked, one TSV row per input.

The per-input protocol (scales, CERTIFY, memory) is the library's engine,
:class:`ancer.engine.Certifier`; this module drives it over a dataset (docs/results.md,
sections 6 and 7): it cuts the selection into groups of ``inputs_per_batch`` consecutive
inputs, takes this process's share (``--shard I/K`` or the torchrun rank: the groups whose
number is I mod K), certifies each group's inputs together, and writes each input's row as
soon as its group is done (its scales first), saving the memory after each group; a shard
of a data-dependent method writes raw rows, which the merge answers (:mod:`certify.replay`).
``results.lock`` is held while a run writes, so a second run on the same ``--out`` is refused.

Resume: the rows already written are skipped. A group is certified whole again when a kill
cut it (batched arithmetic may round differently in other company), which brings the memory
up to date and writes only the missing rows, so a resumed run's rows equal an uninterrupted
run's; a row written before the kill whose memory answer was not saved is checked to equal
its recomputation. ``--max`` may grow between runs: the new inputs come after the old ones.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import torch

from ancer.errors import ArgumentError, ResultsError
from ancer.memory import Memory
from ancer.vocabulary import default_radii
from certify import distributed, merge
from certify.lock import RunLock
from certify.prepare import Job, RunSpec, prepare
from certify.progress import Progress
from certify.replay import memory_path
from certify.results import (Row, ResultsWriter, add_sidecar_info, base_name, done_indices,
                             open_results, read_results, read_sidecar, shard_path)
from certify.rows import check_recomputed, make_row
from certify.scales import ScalesWriter, open_scales

__all__ = ["Interrupted", "Job", "RunSpec", "certify_inputs", "prepare", "run"]


class Interrupted(Exception):
    """A run stopped by Ctrl-C (SIGINT): ``rows`` rows are kept in ``path``."""

    def __init__(self, path: Path, rows: int) -> None:
        super().__init__(f"interrupted: {rows} rows kept in {path}; rerun the same command to "
                         "resume")
        self.path = path
        self.rows = rows


def run(spec: RunSpec, fields: dict[str, Any], notify: Any = print) -> Path:
    """Certify as ``spec`` and ``fields`` say (the ``certify`` command's run); the results
    file written: ``spec.out``, or this shard's file with a shard. Under torchrun each rank
    certifies its shard and rank 0 then merges them into ``out``. ``notify`` receives the
    run's one-line notes (σ or data taken by default, a hint on long runs)."""
    launch = distributed.from_environment()
    shard = spec.shard
    if launch.distributed:
        if shard is not None:
            raise ArgumentError("--shard and torchrun both split the inputs: give only one")
        shard = (launch.rank, launch.world_size)
    out = Path(spec.out)
    if launch.distributed:
        _check_merge_target(out)
    job = prepare(spec, fields, launch)
    if launch.is_main:
        for note in job.notes:
            notify(note)
    path = out if shard is None else shard_path(out, *shard)
    with distributed.process_group(launch):
        certify_inputs(job, path, shard, position=launch.local_rank, notify=notify)
        distributed.barrier(launch)
        if launch.distributed and launch.is_main:
            _merge_shards(out)
    return out if shard is None or launch.distributed else path


def _check_merge_target(out: Path) -> None:
    """Refuse to let a torchrun job's merge replace a file that is not an earlier merge."""
    if out.exists():
        sidecar = read_sidecar(out)
        if sidecar is None or "merged_from" not in sidecar.info:
            raise ResultsError(f"{out} exists and is not a merge of this job's shards: "
                               "pass a new --out")


def _merge_shards(out: Path) -> None:
    """Rank 0: merge the shards into ``out``, replacing an earlier merge of them."""
    out.unlink(missing_ok=True)
    merge.merge_results(merge.find_shards(out), out)


def certify_inputs(job: Job, path: Path, shard: Optional[tuple[int, int]] = None,
                   position: int = 0, notify: Any = print) -> None:
    """Certify this shard's inputs of ``job`` into the results file ``path``, resuming it.

    The inputs are cut into fixed groups of ``job.group_size`` consecutive positions, and a
    group is always certified whole (again whole on resume, writing only its missing rows;
    a shard takes whole groups), less the inputs whose memory answers are saved: batched
    floating-point arithmetic may round differently in another company, so this keeps every
    row that of an uninterrupted single-process run. A shard of a data-dependent method runs
    no memory: it sees only its own inputs, so its rows are raw, answered at the merge.
    Ctrl-C raises :class:`Interrupted` once the rows written so far are safe. Without
    ``--inputs-per-batch``, a run begun with another default group size goes on with it."""
    recorded = read_sidecar(path) if path.is_file() and job.spec.inputs_per_batch is None else None
    if recorded is not None and "inputs_per_batch" in recorded.settings:
        job.settings["inputs_per_batch"] = recorded.settings["inputs_per_batch"]
    groups = [g for number, g in enumerate(_groups(range(len(job.dataset)), job.group_size))
              if shard is None or number % shard[1] == shard[0]]
    positions = [p for group in groups for p in group]
    if not positions:
        notify(f"shard {shard[0]}/{shard[1]} has nothing to do: the {len(job.dataset)} inputs "
               f"make only {math.ceil(len(job.dataset) / job.group_size)} groups of "
               f"{job.group_size}; use fewer shards or a smaller --inputs-per-batch")
    with RunLock(path):
        _check_selection(job, path)
        _certify_into(job, path, groups, positions, shard, position, notify)


def _certify_into(job: Job, path: Path, groups: list, positions: list,
                  shard: Optional[tuple[int, int]], position: int, notify: Any) -> None:
    """:func:`certify_inputs` once the results file is locked and its selection checked."""
    with open_results(path, job.settings, job.info, growable=("max",)) as writer:
        written = [job.dataset.indices[p] for p in positions if job.dataset.indices[p] in writer.done]
        memory, memory_file = _open_memory(job, path, written, shard)
        unanswered = _unanswered_rows(path, writer, memory)
        scales = (open_scales(path, job.dataset[0][0].shape, _file_order(path, writer))
                  if job.config.anisotropic else None)
        finished = set(memory.processed) if memory is not None else writer.done
        todo = [g for g in groups if not all(job.dataset.indices[p] in finished for p in g)]
        if memory is not None:  # inputs the memory answered stay answered (a grown --max)
            todo = [[p for p in g if job.dataset.indices[p] not in finished] for g in todo]
        per_input = job.config.n0 + job.config.n
        progress = Progress(len(positions), len(writer.done), per_input,
                            _description(path, shard), job.spec.quiet, position,
                            hint=_shorter_hint(job), say=notify, every=job.spec.progress_every)
        try:
            for group in todo:
                _certify_group(job, group, writer, scales, progress, unanswered, shard)
                if memory is not None:
                    memory.save(memory_file)
        except KeyboardInterrupt:
            raise Interrupted(path, len(writer.done)) from None
        finally:
            progress.close()
            if scales is not None:
                scales.close()
    if memory is not None:
        add_sidecar_info(path, memory=memory.report())


def _shorter_hint(job: Job) -> str:
    """What would shorten a long run, in one line."""
    config, noise = job.config, job.certifier.noise
    ideas = []
    if config.n > 10_000:
        ideas.append(f"--n 10000 (radius limit {noise.max_radius(10_000, config.alpha):.2f} "
                     f"instead of {noise.max_radius(config.n, config.alpha):.2f})")
    if not config.sequential:
        grid = ",".join(f"{r:g}" for r in default_radii(config.sigma))
        ideas.append(f"--sequential --radii {grid} (stops each input once its certified "
                     "radius is decided, same guarantee)")
    if job.certifier.device.type == "cpu":
        ideas.append("a GPU (--device cuda)")
    return "to shorten it: " + "; ".join(ideas) if ideas else ""


def _check_selection(job: Job, path: Path) -> None:
    """Rows on disk must lie in this run's selection (a smaller --max would drop them)."""
    if not path.is_file() or read_sidecar(path) is None:
        return
    selected = set(int(i) for i in job.dataset.indices)
    outside = sorted(done_indices(path) - selected)
    if outside:
        raise ResultsError(f"{path} holds rows beyond this selection (idx {outside[0]}, "
                           f"{len(outside)} rows in all): --max may grow between runs, not "
                           "shrink; pass the earlier --max or a larger one, or a new --out")


def _description(path: Path, shard: Optional[tuple[int, int]]) -> str:
    return base_name(path).name if shard is None else f"shard {shard[0]}/{shard[1]}"


def _file_order(path: Path, writer: ResultsWriter) -> list[int]:
    """The idx of the rows in ``path``, in file order."""
    return [int(i) for i in read_results(path).columns["idx"]] if writer.done else []


def _open_memory(job: Job, path: Path, written: Sequence[int],
                 shard: Optional[tuple[int, int]]) -> tuple[Optional[Memory], Path]:
    """The run's memory (loaded on resume), continued by the engine, or None for a method
    that needs none and for a shard (its rows stay raw until the merge replays the memory).
    Its inputs must be the first rows of the results file: it is saved after each group."""
    where = memory_path(path)
    if not job.config.uses_memory or shard is not None:
        return None, where
    memory = Memory.load(where) if where.exists() else job.certifier.memory
    processed = list(memory.processed)
    if memory.norm != job.config.norm or processed != list(written[:len(processed)]):
        raise ResultsError(f"{where} does not match {path} (another run's memory?): move it "
                           "away and pass a new --out, or restore the matching files")
    job.certifier.use_memory(memory)
    return memory, where


def _groups(items: Sequence[int], size: int) -> Iterator[Sequence[int]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def _unanswered_rows(path: Path, writer: ResultsWriter, memory: Optional[Memory]) -> dict[int, Row]:
    """The rows in ``path`` that a kill left without their answers in the saved memory (the
    start of the group it cut), by idx; none without a memory."""
    if memory is None or not writer.done:
        return {}
    processed = set(memory.processed)
    table = read_results(path)
    return {int(idx): table.row(i) for i, idx in enumerate(table.columns["idx"])
            if int(idx) not in processed}


def _certify_group(job: Job, group: Sequence[int], writer: ResultsWriter,
                   scales: Optional[ScalesWriter],
                   progress: Progress, unanswered: dict[int, Row],
                   shard: Optional[tuple[int, int]]) -> None:
    """Certify the inputs at dataset positions ``group`` with the engine and write their
    rows, in order; rows already written are checked against their recomputation when the
    memory did not save them (:func:`certify.rows.check_recomputed`)."""
    items = [job.dataset[p] for p in group]
    indices = [int(job.dataset.indices[p]) for p in group]
    xs = torch.stack([x for x, _ in items])
    start = time.perf_counter()
    certificates = job.certifier.certify_batch(xs, indices, progress=progress.advance,
                                               raw=shard is not None)
    elapsed = (time.perf_counter() - start) / len(group)
    for (_, label), idx, certificate in zip(items, indices, certificates):
        row = make_row(idx, label, certificate, job.config.method, elapsed,
                       job.config.uses_memory)
        if idx in writer.done:  # certified again, with its group, for the memory and the rest
            if idx in unanswered:
                check_recomputed(writer.path, unanswered[idx], row)
            continue
        if certificate.anisotropic:
            scales.append(idx, certificate.noise.sigma.numpy())
        writer.write(row)
        progress.update(row)
