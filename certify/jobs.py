"""A certification run over a dataset into a results file: resumable, sharded, locked, one
TSV row per input.

The protocol (groups, a shard's share, resume, the memory) is :func:`ancer.runs.
certify_dataset`; this module writes each input's row as soon as its group is done (its
scales first) and saves the memory after each group; a shard of a data-dependent method
writes raw rows, which the merge answers (:mod:`ancer.merge`). ``results.lock`` is held
while a run writes, so a second run on the same ``--out`` is refused. On resume the rows
already written are skipped; a row written before a kill whose memory answer was not saved
is checked to equal its recomputation (the resume checks are :mod:`ancer.writer`'s).
``--max`` may grow between runs.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional, Sequence

from ancer import merge
from ancer.errors import ArgumentError
from ancer.lock import RunLock
from ancer.results import Row, add_sidecar_info, base_name, memory_path, shard_path
from ancer.runs import Certified, certify_dataset, shard_groups
from ancer.scales import ScalesWriter, open_scales
from ancer.vocabulary import default_radii
from ancer.writer import (ResultsWriter, check_selection, file_order, open_results,
                          recorded_group_size, resume_memory, unanswered_rows, write_certified)
from certify import distributed
from certify.prepare import Job, RunSpec, prepare
from certify.progress import Progress

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
        merge.check_merge_target(out)
    job = prepare(spec, fields, launch)
    if launch.is_main:
        for note in job.notes:
            notify(note)
    path = out if shard is None else shard_path(out, *shard)
    with distributed.process_group(launch):
        certify_inputs(job, path, shard, position=launch.local_rank, notify=notify)
        distributed.barrier(launch)
        if launch.distributed and launch.is_main:
            merge.merge_shards(out)
    return out if shard is None or launch.distributed else path


def certify_inputs(job: Job, path: Path, shard: Optional[tuple[int, int]] = None,
                   position: int = 0, notify: Any = print) -> None:
    """Certify this shard's inputs of ``job`` into the results file ``path``, resuming it
    (:func:`ancer.runs.certify_dataset`). Ctrl-C raises :class:`Interrupted` once the rows
    written so far are safe. Without ``--inputs-per-batch``, a run begun with another
    default group size goes on with it."""
    if job.spec.inputs_per_batch is None:
        job.settings["inputs_per_batch"] = recorded_group_size(path, job.group_size)
    positions = [p for group in shard_groups(len(job.dataset), job.group_size, shard) for p in group]
    if not positions:
        notify(f"shard {shard[0]}/{shard[1]} has nothing to do: the {len(job.dataset)} inputs "
               f"make only {math.ceil(len(job.dataset) / job.group_size)} groups of "
               f"{job.group_size}; use fewer shards or a smaller --inputs-per-batch")
    with RunLock(path):
        check_selection(path, job.dataset.indices)
        _certify_into(job, path, positions, shard, position, notify)


def _certify_into(job: Job, path: Path, positions: list, shard: Optional[tuple[int, int]],
                  position: int, notify: Any) -> None:
    """:func:`certify_inputs` once the results file is locked and its selection checked."""
    with open_results(path, job.settings, job.info, growable=("max",)) as writer:
        written = [job.dataset.indices[p] for p in positions if job.dataset.indices[p] in writer.done]
        memory = (resume_memory(job.certifier, path, written)
                  if job.config.uses_memory and shard is None else None)
        unanswered = unanswered_rows(writer, memory)
        scales = (open_scales(path, job.dataset[0][0].shape, file_order(writer))
                  if job.config.anisotropic else None)
        progress = Progress(len(positions), len(writer.done), job.config.n0 + job.config.n,
                            _description(path, shard), job.spec.quiet, position,
                            hint=_shorter_hint(job), say=notify, every=job.spec.progress_every)
        try:
            for group in certify_dataset(job.certifier, job.dataset, size=job.group_size,
                                         shard=shard, done=set(writer.done),
                                         progress=progress.advance):
                _write_group(job, group, writer, scales, progress, unanswered)
                if memory is not None:
                    memory.save(memory_path(path))
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


def _description(path: Path, shard: Optional[tuple[int, int]]) -> str:
    return base_name(path).name if shard is None else f"shard {shard[0]}/{shard[1]}"


def _write_group(job: Job, group: Sequence[Certified], writer: ResultsWriter,
                 scales: Optional[ScalesWriter], progress: Progress,
                 unanswered: dict[int, Row]) -> None:
    """Write the rows of a group's certificates, in order (:func:`ancer.writer.
    write_certified`), and count them in the progress."""
    for item in group:
        row = write_certified(writer, scales, item, job.config.method, job.config.uses_memory,
                              unanswered)
        if row is not None:
            progress.update(row)
