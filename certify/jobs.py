"""A certification run over a dataset: resumable, sharded, one TSV row per input.

The run (issue 5; DESIGN.md §1):

1. load the model (:func:`ancer.models.load_model`), the dataset (``--skip``/``--max``) and
   the noise of ``--norm`` (l2: Gaussian, l1: uniform, λ = √3·σ);
2. cut the selection into groups of ``--inputs-per-batch`` consecutive inputs, and take
   this process's share of the groups (``--shard I/K`` or the torchrun rank: the groups
   whose number is I mod K);
3. certify each group's inputs together, their noise samples sharing forward batches
   (``Smoothed.certify_batch``), each input drawing from its own generator
   ``input_generator(seed, idx)``; a group is the same in every shard layout, so a row
   does not depend on the shard or resumed run that produced it, even where batched
   arithmetic rounds differently in another company:

   - ``isotropic``: CERTIFY with the fixed σ (Cohen et al. 2019; Yang et al. 2020);
   - ``dds``: a data-dependent σ per input (``optimize_isotropic``, DDRS), then CERTIFY;
   - ``ancer``: per-dimension scales from ``optimize_anisotropic`` started at the fixed σ
     or the DDRS σ (``--theta0``), then CERTIFY with them;

4. data-dependent methods pass every certificate through the memory
   (:class:`ancer.memory.Memory`) in idx order, which keeps them sound, and record its
   answer in the ``memory`` column; a shard writes its certificates raw (``raw``), and
   the merge replays the memory over all inputs in idx order (:mod:`certify.replay`);
5. write each input's row as soon as its group is done (flushed and fsynced), its
   anisotropic scales first (:mod:`certify.scales`), and save the memory after each group;
   at the end, the memory's report goes to the sidecar's ``info``.

Files beside ``--out`` (``results.tsv``): ``results.json`` (settings, compared on resume),
``results.scales.npy`` (ancer), ``results.memory.pt`` (dds, ancer).

Resume: the rows already written are skipped. Groups are fixed runs of consecutive inputs,
always certified whole (batched arithmetic may round differently in other company), and
the memory on disk reflects the inputs up to the end of the last complete group; a group
cut by a kill is certified again whole, deterministically, bringing the memory up to date
and writing only its missing rows. So a resumed run's rows equal an uninterrupted run's.
The memory must hold the certificates that the file reports: a row written before the kill
is checked to equal its recomputation (all columns but ``time``), and a difference (possible
on a GPU, whose kernels need not repeat bit for bit) stops the run with the fix.
"""

from __future__ import annotations

import argparse
import inspect
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
from ancer.errors import ArgumentError, DatasetError, ResultsError
from ancer.memory import Memory
from ancer.models import LoadedModel, load_model
from ancer.noise import noise_for_norm
from ancer.optimize import certify_with_scales, optimize_anisotropic, optimize_isotropic
from ancer.seeding import input_generator
from ancer.smoothing import Certificate, Smoothed
from certify import distributed, merge
from certify.distributed import Launch
from certify.progress import Progress
from certify.replay import MEMORY_METHODS, NO_MEMORY, RAW, answered, memory_path
from certify.results import (COLUMNS, Row, ResultsWriter, add_sidecar_info, base_name,
                             open_results, read_results, read_sidecar, shard_path)
from certify.scales import ScalesWriter, open_scales

#: the checkpoint's normalization dataset -> the reader of its test set
_READERS_OF = {"cifar10": "cifar10", "imagenet": "imagenet"}


def _defaults(function: Any) -> dict[str, Any]:
    """The default values of ``function``'s keyword arguments."""
    return {name: p.default for name, p in inspect.signature(function).parameters.items()
            if p.default is not inspect.Parameter.empty}


@dataclass(frozen=True)
class Optimizer:
    """The scale optimizer's options (``--opt-*``, ``--kappa``), defaults resolved."""

    iterations: int
    lr: float
    samples: int
    kappa: Optional[float]

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Optimizer:
        function = optimize_anisotropic if args.method == "ancer" else optimize_isotropic
        default = _defaults(function)
        return cls(args.opt_iterations or default["iterations"], args.opt_lr or default["lr"],
                   args.opt_samples or default["samples"],
                   (args.kappa or default["kappa"]) if args.method == "ancer" else None)


@dataclass
class Job:
    """Everything one run needs, loaded and validated; make one with :func:`prepare`."""

    args: argparse.Namespace
    loaded: LoadedModel
    dataset: ImageDataset
    smoothed: Smoothed
    device: torch.device
    sigma: float
    optimizer: Optional[Optimizer]
    settings: dict[str, Any]
    info: dict[str, Any]

    @property
    def method(self) -> str:
        return self.args.method

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


def _dataset_kind(args: argparse.Namespace, loaded: LoadedModel) -> str:
    if args.dataset is not None:
        return args.dataset
    if str(args.data).endswith(".npz"):
        return "npz"
    if loaded.dataset in _READERS_OF:
        return _READERS_OF[loaded.dataset]
    raise ArgumentError("the checkpoint does not say which dataset it was trained on: "
                        "pass --dataset cifar10|imagenet|folder|npz")


def prepare(args: argparse.Namespace, launch: Launch) -> Job:
    """Load and check everything a run needs, before any file is written."""
    if args.model is None:
        raise ArgumentError("give the base classifier with --model CKPT "
                            "(or try --demo, which uses the shipped one)")
    if args.data is None:
        raise ArgumentError("give the dataset with --data DIR (for --dataset npz, the .npz file)")
    device = resolve_device(args.device, launch)
    loaded = load_model(args.model, map_location=device)
    sigma = args.sigma if args.sigma is not None else loaded.sigma
    if sigma is None:
        raise ArgumentError(f"{args.model} records no training noise level: give --sigma S "
                            "(e.g. --sigma 0.25)")
    kind = _dataset_kind(args, loaded)
    extra = dataset_options(kind, loaded.num_classes, args.synsets)
    dataset = load_dataset(kind, args.data, skip=args.skip, max=args.max, **extra)
    if len(dataset) == 0:
        raise DatasetError(f"--data {args.data} with --skip {args.skip} --max {args.max} "
                           "selects no input: check --max")
    if dataset.num_classes > loaded.num_classes:
        raise ArgumentError(f"the dataset has {dataset.num_classes} classes but the model "
                            f"outputs {loaded.num_classes}: check --model and --data")
    noise = noise_for_norm(args.norm, sigma)
    smoothed = Smoothed(loaded.model, noise, loaded.num_classes, precision=args.precision,
                        compile=COMPILE[args.compile], cuda_graphs=args.cuda_graphs)
    optimizer = Optimizer.from_args(args) if args.method in MEMORY_METHODS else None
    settings = {
        "model_sha256": loaded.sha256, "arch": loaded.arch, "dataset": kind,
        "data": str(Path(args.data).resolve()), **extra, "norm": args.norm, "method": args.method,
        "sigma": float(sigma), "half_width": noise.half_width_of(float(sigma)),
        "n0": args.n0, "n": args.n, "alpha": args.alpha, "batch": args.batch,
        "skip": args.skip, "max": args.max, "precision": args.precision, "seed": args.seed,
        "device_type": device.type,
        # enough inputs to fill one forward batch with their n0 selection draws
        "inputs_per_batch": args.inputs_per_batch or max(1, args.batch // args.n0),
        "optimizer": None if optimizer is None else {**vars(optimizer), "theta0": (
            args.theta0 if args.method == "ancer" else None)},
    }
    info = {
        "versions": {"ancer": ancer.__version__, "torch": torch.__version__,
                     "numpy": np.__version__, "python": platform.python_version()},
        "command": sys.argv, "device": _device_name(device), "host": socket.gethostname(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "rank": launch.rank,
        "world_size": launch.world_size,
        # how the forward pass was run: results agree at float rounding, so not a setting
        "acceleration": {"compile": args.compile, "cuda_graphs": args.cuda_graphs},
    }
    return Job(args, loaded, dataset, smoothed, device, float(sigma), optimizer, settings, info)


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine()


def run(args: argparse.Namespace) -> Path:
    """Certify as ``args`` say (the ``certify`` command's run); the results file written:
    ``--out``, or this shard's file with ``--shard``. Under torchrun each rank certifies its
    shard and rank 0 then merges them into ``--out``."""
    launch = distributed.from_environment()
    shard = args.shard
    if launch.distributed:
        if shard is not None:
            raise ArgumentError("--shard and torchrun both split the inputs: give only one")
        shard = (launch.rank, launch.world_size)
    out = Path(args.out)
    if launch.distributed:
        _check_merge_target(out)
    job = prepare(args, launch)
    path = out if shard is None else shard_path(out, *shard)
    with distributed.process_group(launch):
        certify_inputs(job, path, shard, quiet=args.quiet, position=launch.local_rank)
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
    merge.merge_results([shard_path(out, i, count) for i in range(count)], out)


def certify_inputs(job: Job, path: Path, shard: Optional[tuple[int, int]] = None,
                   quiet: bool = False, position: int = 0) -> None:
    """Certify this shard's inputs of ``job`` into the results file ``path``, resuming it.

    The inputs are cut into fixed groups of ``job.group_size`` consecutive positions, and a
    group is always certified whole (again whole on resume, writing only its missing rows;
    a shard takes whole groups): batched floating-point arithmetic may round differently in
    another company, so this keeps every row, to the last digit, that of an uninterrupted
    single-process run. A shard of a data-dependent method runs no memory: it sees only its
    own inputs, so its rows are raw, answered at the merge."""
    groups = [g for number, g in enumerate(_groups(range(len(job.dataset)), job.group_size))
              if shard is None or number % shard[1] == shard[0]]
    positions = [p for group in groups for p in group]
    with open_results(path, job.settings, job.info) as writer:
        written = [job.dataset.indices[p] for p in positions if job.dataset.indices[p] in writer.done]
        memory, memory_file = _open_memory(job, path, written, shard)
        unanswered = _unanswered_rows(path, writer, memory)
        scales = (open_scales(path, job.dataset[0][0].shape, _file_order(path, writer))
                  if job.method == "ancer" else None)
        finished = set(memory.processed) if memory is not None else writer.done
        todo = [g for g in groups if not all(job.dataset.indices[p] in finished for p in g)]
        progress = Progress(len(positions), len(writer.done), _description(path, shard), quiet,
                            position)
        try:
            for group in todo:
                _certify_group(job, group, writer, memory, scales, progress, unanswered)
                if memory is not None:
                    memory.save(memory_file)
        finally:
            progress.close()
            if scales is not None:
                scales.close()
    if memory is not None:
        add_sidecar_info(path, memory=memory.report())


def _description(path: Path, shard: Optional[tuple[int, int]]) -> str:
    return base_name(path).name if shard is None else f"shard {shard[0]}/{shard[1]}"


def _file_order(path: Path, writer: ResultsWriter) -> list[int]:
    """The idx of the rows in ``path``, in file order."""
    return [int(i) for i in read_results(path).columns["idx"]] if writer.done else []


def _open_memory(job: Job, path: Path, written: Sequence[int],
                 shard: Optional[tuple[int, int]]) -> tuple[Optional[Memory], Path]:
    """The run's memory (loaded on resume), or None for a method that needs none and for a
    shard (its rows stay raw until the merge replays the memory). Its inputs must be the
    first rows of the results file, whole groups: it is saved after each group's rows."""
    where = memory_path(path)
    if job.method not in MEMORY_METHODS or shard is not None:
        return None, where
    memory = Memory.load(where) if where.exists() else Memory(job.args.norm)
    processed = list(memory.processed)
    if (memory.norm != job.args.norm or processed != list(written[:len(processed)])
            or (len(processed) % job.group_size and len(processed) != len(job.dataset))):
        raise ResultsError(f"{where} does not match {path} (another run's memory?): move it "
                           "away and pass a new --out, or restore the matching files")
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
                   progress: Progress, unanswered: dict[int, Row]) -> None:
    """Certify the inputs at dataset positions ``group`` and write their rows, in order;
    rows already written are checked against their recomputation when the memory did not
    save them (:func:`_check_recomputed`)."""
    args = job.args
    items = [job.dataset[p] for p in group]
    indices = [job.dataset.indices[p] for p in group]
    xs = torch.stack([x for x, _ in items])
    generators = [input_generator(args.seed, idx, job.device) for idx in indices]
    start = time.perf_counter()
    sigmas, thetas = _scales(job, xs, indices)
    if sigmas is None:
        certificates = job.smoothed.certify_batch(xs, args.n0, args.n, args.alpha, args.batch,
                                                  generators=generators)
    else:
        certificates = certify_with_scales(job.smoothed, xs, sigmas if thetas is None else thetas,
                                           args.n0, args.n, args.alpha, args.batch, generators)
    elapsed = (time.perf_counter() - start) / len(group)
    for i, ((x, label), idx, certificate) in enumerate(zip(items, indices, certificates)):
        sigma = job.sigma if sigmas is None else float(sigmas[i])
        row = make_row(idx, label, certificate, args.method, sigma, elapsed,
                       RAW if args.method in MEMORY_METHODS else NO_MEMORY)
        if memory is not None:
            outcome = memory.certify(x, certificate.label, certificate.region, key=idx)
            row = answered(row, outcome, memory)
        if idx in writer.done:  # certified again, with its group, for the memory and the rest
            if idx in unanswered:
                _check_recomputed(writer.path, unanswered[idx], row)
            continue
        if scales is not None:
            scales.append(idx, thetas[i].numpy())
        writer.write(row)
        progress.update(row)


def _scales(job: Job, xs: torch.Tensor, indices: Sequence[int]
            ) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """The per-input isotropic σ (dds; ancer: θ0) and per-dimension θ (ancer) of a group;
    (None, None) for the fixed σ. The optimizers draw from ``(seed, "optimize", idx)``,
    apart from CERTIFY's draws."""
    args, options = job.args, job.optimizer
    if options is None:
        return None, None
    common = dict(outputs=job.loaded.outputs, max_batch=args.batch, precision=args.precision,
                  seed=args.seed, indices=list(indices))
    model = job.smoothed.model  # the model CERTIFY evaluates: batch norm folded, on the device
    if args.method == "dds" or args.theta0 == "dds":
        dds = optimize_isotropic(model, xs, job.sigma, args.norm, **common,
                                 **({"iterations": options.iterations, "lr": options.lr,
                                     "samples": options.samples} if args.method == "dds" else {}))
        sigmas = dds.sigma
    else:
        sigmas = torch.full((len(xs),), job.sigma)
    if args.method == "dds":
        return sigmas, None
    ancer_scales = optimize_anisotropic(model, xs, sigmas, args.norm, options.iterations,
                                        options.lr, options.samples, options.kappa, **common)
    return sigmas, ancer_scales.sigma


#: --compile's choices as ``Smoothed``'s ``compile`` argument
COMPILE = {"auto": "auto", "on": True, "off": False}


def dataset_options(kind: str, num_classes: int, synsets: Optional[str]) -> dict[str, Any]:
    """The reader's options beyond the path, as recorded in the settings: the model's number
    of classes for an npz file, the synset list (absolute path) for ImageNet."""
    if kind == "npz":
        return {"num_classes": num_classes}
    if kind == "imagenet" and synsets is not None:
        return {"synsets": str(Path(synsets).resolve())}
    return {}


def make_row(idx: int, label: int, certificate: Certificate, method: str, sigma: float,
             elapsed: float, memory: str) -> Row:
    """The TSV row of one input's own certificate, before any memory (``memory``: ``raw``
    for a data-dependent method, whose answer :func:`certify.replay.answered` puts in, or
    ``-``).

    ``count_a`` is the estimation votes of the class selected from the n0 draws, the count
    ``p_lower`` bounds (so a radius can be recomputed for another alpha); ``count_label`` the
    votes for the true label (the base classifier's accuracy under noise); ``sigma`` the
    isotropic σ (ancer: its starting θ0)."""
    counts = certificate.counts
    selected = int(np.argmax(certificate.selection_counts))
    top_two = np.argsort(-counts, kind="stable")[:2]
    half_width = certificate.noise.half_width_of(sigma)
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
    )
