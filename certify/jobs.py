"""A certification run over a dataset: resumable, sharded, locked, one TSV row per input.

The per-input protocol (scales, CERTIFY, memory) is the library's engine,
:class:`ancer.engine.Certifier`; this module adds what a command line needs around it:

1. load the model and the dataset (``--skip``/``--max``), and build the engine from the
   run's :class:`ancer.engine.CertifyConfig`;
2. cut the selection into groups of ``inputs_per_batch`` consecutive inputs, and take this
   process's share of the groups (``--shard I/K`` or the torchrun rank: the groups whose
   number is I mod K);
3. certify each group's inputs together (their noise samples share forward batches), and
   write each input's row as soon as its group is done (flushed and fsynced), its
   anisotropic scales first (:mod:`certify.scales`); save the memory after each group;
4. a shard of a data-dependent method writes its inputs' own certificates (memory column
   ``raw``); the merge replays the memory over all inputs in idx order (:mod:`certify.replay`).

Files beside ``--out`` (``results.tsv``): ``results.json`` (settings, compared on resume),
``results.scales.npy`` (ancer), ``results.memory.pt`` (dds, ancer), ``results.lock`` (held
while a run writes, so a second run on the same ``--out`` is refused).

Resume: the rows already written are skipped. A group is certified whole again when a kill
cut it (batched arithmetic may round differently in other company), which brings the memory
up to date and writes only the missing rows, so a resumed run's rows equal an uninterrupted
run's. A row written before the kill whose memory answer was not saved is checked to equal
its recomputation (all columns but ``time``). ``--max`` may grow between runs (all other
settings equal): the new inputs are certified after the old ones.
"""

from __future__ import annotations

import dataclasses
import math
import platform
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import numpy as np
import torch

import ancer
from ancer.data import ImageDataset, load_dataset
from ancer.engine import Certifier, CertifyConfig
from ancer.errors import ArgumentError, DatasetError, ResultsError
from ancer.memory import Memory
from ancer.models import LoadedModel, load_model
from ancer.smoothing import Certificate
from certify import distributed, merge
from certify.demo import SAMPLE as SHIPPED_CIFAR10
from certify.distributed import Launch
from certify.lock import RunLock
from certify.progress import Progress
from certify.replay import NO_MEMORY, RAW, memory_path, outcome_text
from certify.results import (COLUMNS, Row, ResultsWriter, add_sidecar_info, base_name,
                             done_indices, open_results, read_results, read_sidecar, shard_path)
from certify.scales import ScalesWriter, open_scales

#: the checkpoint's normalization dataset -> the reader of its test set
_READERS_OF = {"cifar10": "cifar10", "imagenet": "imagenet"}


class Interrupted(Exception):
    """A run stopped by Ctrl-C (SIGINT): ``rows`` rows are kept in ``path``."""

    def __init__(self, path: Path, rows: int) -> None:
        super().__init__(f"interrupted: {rows} rows kept in {path}; rerun the same command to "
                         "resume")
        self.path = path
        self.rows = rows


@dataclass(frozen=True)
class RunSpec:
    """What a command-line run adds to the engine's config: the files and the selection.

    ``data`` None certifies the CIFAR-10 test images shipped with the package (CIFAR-10
    models only); ``inputs_per_batch`` None fills one forward batch with the group's n0
    selection draws; ``shard`` is (i, k) or None."""

    model: str
    out: Path
    data: Optional[str] = None
    dataset: Optional[str] = None
    synsets: Optional[str] = None
    skip: int = 1
    max: Optional[int] = None
    device: Optional[str] = None
    inputs_per_batch: Optional[int] = None
    shard: Optional[tuple[int, int]] = None
    quiet: bool = False


@dataclass
class Job:
    """Everything one run needs, loaded and validated; make one with :func:`prepare`."""

    spec: RunSpec
    config: CertifyConfig
    loaded: LoadedModel
    dataset: ImageDataset
    certifier: Certifier
    settings: dict[str, Any]
    info: dict[str, Any]
    notes: list[str]

    @property
    def group_size(self) -> int:
        return self.settings["inputs_per_batch"]


def resolve_device(requested: Optional[str], launch: Launch) -> torch.device:
    """``--device`` (default cuda if available, else cpu); under torchrun plain ``cuda``
    means this rank's GPU, cuda:LOCAL_RANK."""
    if requested is None:
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    if requested.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ArgumentError(f"--device {requested}: this machine has no CUDA GPU (or this "
                                "PyTorch build lacks CUDA); use --device cpu")
        if requested == "cuda":
            requested = f"cuda:{launch.local_rank}"
        if torch.device(requested).index >= torch.cuda.device_count():
            raise ArgumentError(f"--device {requested}: only {torch.cuda.device_count()} GPU(s) "
                                "here; give cuda:0 ... or cuda")
        # the current device too, so that nothing (streams, contexts) lands on cuda:0
        torch.cuda.set_device(torch.device(requested))
    return torch.device(requested)


def _data_source(spec: RunSpec, loaded: LoadedModel, notes: list[str]) -> tuple[str, str]:
    """(dataset kind, path): ``--data``/``--dataset``, or without ``--data`` the shipped
    CIFAR-10 test images for a CIFAR-10 model."""
    if spec.data is None:
        if loaded.dataset == "cifar10" and spec.dataset in (None, "cifar10", "npz"):
            if not SHIPPED_CIFAR10.is_file():
                raise ArgumentError(f"no --data, and the shipped CIFAR-10 images are missing "
                                    f"({SHIPPED_CIFAR10}): pass --data cifar-10-batches-py")
            notes.append(f"no --data given: certifying the {_count_shipped()} CIFAR-10 test "
                         "images shipped with ancer (--data DIR for your own)")
            return "npz", str(SHIPPED_CIFAR10)
        known = loaded.dataset or "unknown"
        raise ArgumentError(f"give the dataset with --data (the checkpoint's dataset is {known}: "
                            "--data imagenet/val for ImageNet class folders, "
                            "--data cifar-10-batches-py for CIFAR-10, or an .npz of x, y)")
    if spec.dataset is not None:
        return spec.dataset, spec.data
    if str(spec.data).endswith(".npz"):
        return "npz", spec.data
    if loaded.dataset in _READERS_OF:
        return _READERS_OF[loaded.dataset], spec.data
    raise ArgumentError("the checkpoint does not say which dataset it was trained on: "
                        "pass --dataset cifar10|imagenet|folder|npz")


def _count_shipped() -> int:
    with np.load(SHIPPED_CIFAR10) as sample:
        return len(sample["y"])


#: the flag of each config field, for messages of a command-line run
FLAGS = {"sigma": "--sigma", "norm": "--norm", "method": "--method", "theta0": "--theta0",
         "n0": "--n0", "n": "--n", "alpha": "--alpha", "sequential": "--sequential",
         "radii": "--radii", "opt_iterations": "--opt-iterations", "opt_lr": "--opt-lr",
         "opt_samples": "--opt-samples", "kappa": "--kappa", "batch": "--batch",
         "precision": "--precision", "compile": "--compile", "cuda_graphs": "--cuda-graphs",
         "seed": "--seed"}


def make_config(fields: dict[str, Any]) -> CertifyConfig:
    """The engine's config from the run's flags (by config field name); an invalid field's
    message names its flag."""
    try:
        return CertifyConfig(**fields)
    except ArgumentError as error:
        text = str(error)
        for name, flag in sorted(FLAGS.items(), key=lambda item: -len(item[0])):
            text = text.replace(f"CertifyConfig.{name}:", f"{flag}:").replace(f"{name}=", f"{flag} ")
        raise ArgumentError(text) from None


def prepare(spec: RunSpec, fields: dict[str, Any], launch: Launch) -> Job:
    """Load and check everything a run needs, before any file is written. ``fields`` are
    the config's fields from the flags; a missing ``sigma`` is taken from the checkpoint
    when it records its training noise level (and a note says so), and sequential radii
    default to σ, 2σ, 3σ (p_A of Φ(1), Φ(2), Φ(3) for l2)."""
    notes: list[str] = []
    device = resolve_device(spec.device, launch)
    loaded = load_model(spec.model, map_location=device)
    if fields.get("sigma") is None:
        if loaded.sigma is None:
            raise ArgumentError(f"give the noise level with --sigma S (e.g. --sigma 0.25): "
                                f"{spec.model} does not record the σ it was trained with")
        fields = {**fields, "sigma": float(loaded.sigma)}
        notes.append(f"no --sigma given: using σ = {loaded.sigma:g}, recorded in the checkpoint "
                     "as its training noise")
    if fields.get("sequential") and fields.get("radii") is None:
        sigma = float(fields["sigma"])
        fields = {**fields, "radii": (sigma, 2 * sigma, 3 * sigma)}
    config = make_config(fields)
    kind, data = _data_source(spec, loaded, notes)
    extra = dataset_options(kind, loaded.num_classes, spec.synsets)
    dataset = load_dataset(kind, data, skip=spec.skip, max=spec.max, **extra)
    if len(dataset) == 0:
        raise DatasetError(f"--data {data} with --skip {spec.skip} --max {spec.max} "
                           "selects no input: check --max")
    if dataset.num_classes > loaded.num_classes:
        raise ArgumentError(f"the dataset has {dataset.num_classes} classes but the model "
                            f"outputs {loaded.num_classes}: check --model and --data")
    planned = len(dataset) * (config.n0 + config.n)
    certifier = Certifier(loaded, config, device=device, planned_samples=planned)
    if config.sequential:
        check_reachable(certifier)
    evaluation = certifier.smoothed.settings()
    settings = {
        "model_sha256": loaded.sha256, "arch": loaded.arch, "dataset": kind,
        "data": str(Path(data).resolve()), **extra, "norm": config.norm, "method": config.method,
        "sigma": config.sigma, "half_width": certifier.noise.half_width_of(config.sigma),
        "n0": config.n0, "n": config.n, "alpha": config.alpha, "batch": config.batch,
        "sequential": config.sequential, "radii": list(config.radii),
        "skip": spec.skip, "max": spec.max, "precision": config.precision, "seed": config.seed,
        "device_type": device.type, "fold_bn": evaluation["fold_bn"],
        # enough inputs to fill one forward batch with their n0 selection draws
        "inputs_per_batch": spec.inputs_per_batch or max(1, config.batch // config.n0),
        "optimizer": None if not config.uses_memory else {
            **config.optimizer(config.method), "theta0": (
                config.theta0 if config.method == "ancer" else None)},
    }
    info = {
        "versions": {"ancer": ancer.__version__, "torch": torch.__version__,
                     "numpy": np.__version__, "python": platform.python_version()},
        "command": sys.argv, "device": _device_name(device), "host": socket.gethostname(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "rank": launch.rank,
        "world_size": launch.world_size,
        # how the forward pass was run: results agree at float rounding, so not a setting
        "acceleration": {"compile": config.compile, "cuda_graphs": config.cuda_graphs,
                         "compile_resolved": certifier.compiled},
    }
    return Job(spec, config, loaded, dataset, certifier, settings, info, notes)


def check_reachable(certifier: Certifier) -> None:
    """Refuse sequential radii of which none can be certified within n draws."""
    config = certifier.config
    from ancer.sequential import max_certifiable_probability
    best = max_certifiable_probability(config.n, config.alpha)
    top = certifier.noise.scale * certifier.noise.radius_factor(best) if best > 0.5 else 0.0
    if config.radii[0] > top:
        raise ArgumentError(f"--radii: no radius in {','.join(map(str, config.radii))} can be "
                            f"certified with --n {config.n} at --alpha {config.alpha:g} (the "
                            f"largest is {top:.3f}): give smaller radii or a larger --n")


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine()


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
            _merge_shards(out, launch.world_size)
    return out if shard is None or launch.distributed else path


def _check_merge_target(out: Path) -> None:
    """Refuse to let a torchrun job's merge replace a file that is not an earlier merge."""
    if out.exists():
        sidecar = read_sidecar(out)
        if sidecar is None or "merged_from" not in sidecar.info:
            raise ResultsError(f"{out} exists and is not a merge of this job's shards: "
                               "pass a new --out")


def _merge_shards(out: Path, count: int) -> None:
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
    Ctrl-C raises :class:`Interrupted` once the rows written so far are safe."""
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
                  if job.config.method == "ancer" else None)
        finished = set(memory.processed) if memory is not None else writer.done
        todo = [g for g in groups if not all(job.dataset.indices[p] in finished for p in g)]
        if memory is not None:  # inputs the memory answered stay answered (a grown --max)
            todo = [[p for p in g if job.dataset.indices[p] not in finished] for g in todo]
        per_input = job.config.n0 + job.config.n
        progress = Progress(len(positions), len(writer.done), per_input,
                            _description(path, shard), job.spec.quiet, position,
                            hint=_shorter_hint(job), say=notify)
        try:
            for group in todo:
                _certify_group(job, group, writer, memory, scales, progress, unanswered, shard)
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
    config = job.config
    ideas = []
    if config.n > 10_000:
        ideas.append(f"--n 10000 (radius limit {_top_radius(job, 10_000):.2f} instead of "
                     f"{_top_radius(job, config.n):.2f})")
    if not config.sequential:
        ideas.append("--sequential --radii 0.25,0.5,0.75 (stops each input once its certified "
                     "radius is decided, same guarantee)")
    if job.certifier.device.type == "cpu":
        ideas.append("a GPU (--device cuda)")
    return "to shorten it: " + "; ".join(ideas) if ideas else ""


def _top_radius(job: Job, n: int) -> float:
    """The largest radius fixed-n CERTIFY can give with ``n`` draws: p_A = alpha^(1/n)."""
    noise = job.certifier.noise
    return noise.scale * noise.radius_factor(math.exp(math.log(job.config.alpha) / n))


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
    """The run's memory (loaded on resume) installed in the engine, or None for a method
    that needs none and for a shard (its rows stay raw until the merge replays the memory).
    Its inputs must be the first rows of the results file: it is saved after each group."""
    where = memory_path(path)
    if not job.config.uses_memory or shard is not None:
        return None, where
    memory = Memory.load(where) if where.exists() else Memory(job.config.norm)
    processed = list(memory.processed)
    if memory.norm != job.config.norm or processed != list(written[:len(processed)]):
        raise ResultsError(f"{where} does not match {path} (another run's memory?): move it "
                           "away and pass a new --out, or restore the matching files")
    job.certifier.memory = memory
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


def _check_recomputed(path: Path, written: Row, row: Row) -> None:
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


def _certify_group(job: Job, group: Sequence[int], writer: ResultsWriter,
                   memory: Optional[Memory], scales: Optional[ScalesWriter],
                   progress: Progress, unanswered: dict[int, Row],
                   shard: Optional[tuple[int, int]]) -> None:
    """Certify the inputs at dataset positions ``group`` with the engine and write their
    rows, in order; rows already written are checked against their recomputation when the
    memory did not save them (:func:`_check_recomputed`)."""
    certifier = job.certifier
    items = [job.dataset[p] for p in group]
    indices = [int(job.dataset.indices[p]) for p in group]
    xs = torch.stack([x for x, _ in items])
    start = time.perf_counter()
    own = certifier.own_certificates(xs, indices, progress=progress.advance)
    elapsed = (time.perf_counter() - start) / len(group)
    for (x, label), idx, certificate in zip(items, indices, own):
        if memory is not None:
            certificate = certifier.answer(x, certificate, idx)
        row = make_row(idx, label, certificate, job.config.method, elapsed,
                       _memory_text(job, certificate, memory, shard))
        if idx in writer.done:  # certified again, with its group, for the memory and the rest
            if idx in unanswered:
                _check_recomputed(writer.path, unanswered[idx], row)
            continue
        if scales is not None:
            scales.append(idx, certificate.noise.sigma.numpy())
        writer.write(row)
        progress.update(row)


def _memory_text(job: Job, certificate: Certificate, memory: Optional[Memory],
                 shard: Optional[tuple[int, int]]) -> str:
    if not job.config.uses_memory:
        return NO_MEMORY
    if memory is None or certificate.memory is None:
        return RAW
    return outcome_text(certificate.memory, memory)


def dataset_options(kind: str, num_classes: int, synsets: Optional[str]) -> dict[str, Any]:
    """The reader's options beyond the path, as recorded in the settings: the model's number
    of classes for an npz file, the synset list (absolute path) for ImageNet."""
    if kind == "npz":
        return {"num_classes": num_classes}
    if kind == "imagenet" and synsets is not None:
        return {"synsets": str(Path(synsets).resolve())}
    return {}


def make_row(idx: int, label: int, certificate: Certificate, method: str, elapsed: float,
             memory: str) -> Row:
    """The TSV row of one input's certificate (the memory's answer where ``memory`` is an
    answer; ``raw`` for a shard's own certificate, ``-`` without a memory).

    ``p_lower``, ``count_a``, ``counts_top2`` and ``n`` describe the input's own CERTIFY
    (before any memory): ``count_a`` is the estimation votes of the class selected from the
    n0 draws, the count ``p_lower`` bounds; ``count_label`` the votes for the true label (the
    base classifier's accuracy under noise); ``sigma`` the isotropic σ (dds: the input's;
    ancer: the σ its scales started from); ``samples`` the forward passes spent."""
    counts = certificate.counts
    selected = int(np.argmax(certificate.selection_counts))
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
        count_a=int(counts[selected]),
        counts_top2=tuple((int(c), int(counts[c])) for c in top_two),
        precision=certificate.precision, memory=memory, count_label=int(counts[label]),
        samples=int(certificate.samples), bound=certificate.bound,
    )
