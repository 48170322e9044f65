"""Certified training compared: fine-tune the shipped ResNet-20 with each training method,
certify each model, and compare isotropic, dds and ANCER certificates on each.

Protocol (issue 18; resumable: every stage's output is kept in ``--work`` and every finished
stage's numbers go to ``results/training-<device>-subset<N>.json`` and ``.md`` at once, so a
rerun of the same command skips what is done and continues an interrupted training run from
its last finished epoch; a stage counts as done only while its output is there: a training
stage needs its checkpoint in ``--work`` (at that epoch or later), and a certify stage whose
checkpoint is gone retrains it first, which gives the same weights, since training depends
only on the seed, the subset and ``--threads``):

1. **Fine-tune.** Every method starts from the shipped ResNet-20
   (``certify/assets/cifar10_resnet20_sigma0.25.pth.tar``: 10 epochs of Gaussian
   augmentation at σ = 0.25) and trains ``--epochs`` E epochs on the 50,000 CIFAR-10
   training images (``cifar10/cifar10-train-jpeg.zip`` of ``--data``, decoded once and
   cached in ``--work``) -- reduced here to a fixed subset of ``--train-images`` N (default
   10,000) of them, the same for every method: the first N of
   ``torch.randperm(50000, generator=torch.Generator().manual_seed(0))``, sorted -- with the
   same optimizer: SGD, lr 0.01 cosine-annealed over the E
   epochs (of N/batch steps each), momentum 0.9, weight decay 5e-4 (the shipped model's), crop and flip, seed 0.
   Methods and their hyperparameters are the authors' CIFAR-10 defaults
   (:mod:`ancer.training_methods`): ``gaussian`` (the control, Gaussian augmentation
   continued, batch 128), ``consistency`` (m = 2, λ = 20, η = 0.5; batch 64 × 2 copies = 128
   noisy inputs per step, half the authors' 256: their batch of 256 split into 2 chunks of
   128 inputs × 2 copies), ``macer`` (k = 16, β = 16, γ = 8, λ = 12; batch 64, the authors'),
   ``smoothadv`` (PGD, 10 steps, ε = 0.25, m = 2 multi-noise; batch 64 × 2 copies, likewise
   half the authors' 256; warm-up 1 epoch, as the authors' fine-tuning command).
2. **Certify** the 100 shipped CIFAR-10 test images (``certify/assets/cifar10_test_sample.npz``)
   with each model at n0 = 100, n = 10,000, α = 0.001 (``certify --method isotropic``):
   certified accuracy at r = 0 / 0.25 / 0.5 / 0.75, the average certified radius (ACR),
   the base classifier's accuracy under noise, and the training seconds per epoch.
3. **ANCER comparison** on each model: ``certify --method dds`` and ``--method ancer``
   (their default optimizer settings) on the first ``--ancer-inputs`` images, against the
   isotropic rows of the same images: certified accuracy at proxy radius 0.25 / 0.5 / 0.75
   and the mean log-volume of the certified regions of correctly classified inputs.

Stages run cheapest-informative first: the Gaussian and consistency fine-tunes, their
isotropic certificates, then MACER's and SmoothAdv's (each about 15× a Gaussian epoch), then
theirs, then the dds/ANCER comparisons. Time on this 2-core shared CPU at one thread: at
50,000 images a Gaussian epoch took 417 s, a consistency epoch 701 s, MACER and SmoothAdv
about 1.7 h each, and an isotropic certification of the 100 images at n = 10,000 about
40 min; steps measured at N = 128 (AMD EPYC, the other core busy): Gaussian 0.7 s per
128 images, consistency 0.5 s, MACER 13 s and SmoothAdv 5 s per 64. At N = 10,000 and
E = 2 training takes about 1.5-2 h (Gaussian and consistency 1-2 min per epoch, MACER and
SmoothAdv 15-35 min), the four isotropic certifications about 2.6 h and the eight dds/ANCER
runs on 50 images (sampling plus ANCER's optimizer, 15-30 s an input) about 5 h: about 9 h
in all. Run it in the background and rerun the same command to resume; on two cores, two
processes with disjoint ``--methods`` halve the wall time (they share the results files,
which are rewritten under a lock), e.g.

    nohup timeout 10800 env PYTHONPATH=. python3 benchmarks/bench_training.py \\
        --data DATA --threads 1 --commit --methods gaussian,consistency > a.log 2>&1 &
    nohup timeout 10800 env PYTHONPATH=. python3 benchmarks/bench_training.py \\
        --data DATA --threads 1 --commit --methods macer,smoothadv > b.log 2>&1 &

The work folder is not part of the repository; ``--snapshot`` keeps the checkpoints in
``benchmarks/results/training-run/`` (committed), from which a run in a fresh clone restores
them instead of training again.

Reductions of the issue's protocol, at the scale this machine allows: every method is
fine-tuned E = 2 epochs over a fixed 10,000-image subset of the training set
(``--train-images``) rather than over all 50,000 images (at full size MACER and SmoothAdv
take about 1.7 h per epoch each here, and the protocol about a day), and the ANCER
comparison uses the first ``--ancer-inputs`` (default 50) of the 100 images; everything else
is as specified.
"""
from __future__ import annotations

import argparse
import fcntl
import json
import math
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path
from typing import Callable, Dict, List, Tuple

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import RESULTS, device_label, environment, markdown_table  # noqa: E402
from ancer.data import ArrayDataset, load_dataset  # noqa: E402
from ancer.models.checkpoint import read_checkpoint  # noqa: E402
from ancer.train import TrainConfig, preload, train  # noqa: E402
from ancer.training_methods import make_method  # noqa: E402
from certify.cli import main as certify_main  # noqa: E402
from ancer.results import read_results  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "certify" / "assets" / "cifar10_resnet20_sigma0.25.pth.tar"
ARCH, SIGMA = "cifar_resnet20", 0.25
#: the methods in the order they are trained, each with its batch size and hyperparameters
METHODS: Dict[str, Tuple[int, dict]] = {
    "gaussian": (128, {}),
    "consistency": (64, {}),
    "macer": (64, {}),
    "smoothadv": (64, {"warmup": 1}),
}
CHEAP, COSTLY = ("gaussian", "consistency"), ("macer", "smoothadv")
TRAIN_SIZE = 50_000  #: CIFAR-10's training images
SUBSET_RULE = ("the first N of torch.randperm(50000, generator=torch.Generator().manual_seed(0)), "
               "sorted")
#: where --snapshot keeps a protocol's checkpoints in the repository
KEPT = RESULTS / "training-run"
RADII = (0.0, 0.25, 0.5, 0.75)
PROXY_RADII = (0.25, 0.5, 0.75)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True,
                        help="the shared data folder holding cifar10/cifar10-train-jpeg.zip")
    parser.add_argument("--work", type=Path, default=REPO / "benchmarks" / "work" / "training",
                        help="where checkpoints, the decoded training set and the certificates "
                             "are kept between runs (default %(default)s)")
    parser.add_argument("--epochs", type=int, default=2, help="fine-tuning epochs E (default 2)")
    parser.add_argument("--train-images", type=int, default=10_000,
                        help="fine-tune on a fixed seeded subset of this many of the 50,000 "
                             "training images (default 10000)")
    parser.add_argument("--results", type=Path, default=RESULTS,
                        help="folder of the results files (default %(default)s)")
    parser.add_argument("--n", type=int, default=10_000, help="certification samples (default 10000)")
    parser.add_argument("--ancer-inputs", type=int, default=50,
                        help="images of the dds/ancer comparison (default 50)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--commit", action="store_true",
                        help="git-commit the results files after every finished stage")
    parser.add_argument("--methods", default=",".join(METHODS),
                        help="the methods whose stages this process runs (default all): two "
                             "processes with disjoint methods share the results files, e.g. "
                             "--methods gaussian,consistency beside --methods macer,smoothadv")
    parser.add_argument("--snapshot", action="store_true",
                        help="keep this protocol's checkpoints in benchmarks/results/"
                             "training-run/ (weights only for those that finished their E "
                             "epochs), from which a fresh clone's run resumes, then exit")
    args = parser.parse_args()
    args.methods = [m for m in args.methods.split(",") if m]
    if not args.methods or any(m not in METHODS for m in args.methods):
        raise SystemExit(f"--methods takes a comma-separated list of {', '.join(METHODS)}, "
                         f"not {','.join(args.methods)}")
    largest = max(batch for batch, _ in METHODS.values())
    if not largest <= args.train_images <= TRAIN_SIZE:
        raise SystemExit(f"--train-images must be between {largest} (the largest batch) and "
                         f"{TRAIN_SIZE}, not {args.train_images}")
    if args.epochs < 1:
        raise SystemExit(f"--epochs must be at least 1, not {args.epochs}")
    if args.commit and args.results.resolve() != RESULTS.resolve():
        raise SystemExit(f"--commit commits only into {RESULTS}; drop --commit or --results")
    return args


class Bench:
    """The stages, their stored results and the results files."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.work = args.work
        self.work.mkdir(parents=True, exist_ok=True)
        (self.work / ".gitignore").write_text("*\n")
        # checkpoints and certificates of one subset size and epoch count, apart from others'
        self.run_dir = self.work / f"subset{args.train_images}-epochs{args.epochs}"
        self.run_dir.mkdir(exist_ok=True)
        self.kept = KEPT / self.run_dir.name
        self.restore()
        self.stem = f"training-{device_label(torch.device('cpu'))}-subset{args.train_images}"
        self.path = args.results / f"{self.stem}.json"
        self.protocol = {"epochs": args.epochs, "train_images": args.train_images,
                         "train_subset": SUBSET_RULE, "n": args.n, "n0": 100, "alpha": 0.001,
                         "ancer_inputs": args.ancer_inputs, "sigma": SIGMA, "arch": ARCH}
        self.results = json.loads(self.path.read_text()) if self.path.exists() else {}
        stored = self.results.get("protocol")
        if stored is not None and stored != json.loads(json.dumps(self.protocol)):
            differ = sorted(k for k in set(stored) | set(self.protocol)
                            if stored.get(k) != self.protocol.get(k))
            raise SystemExit(f"{self.path} holds results of another protocol (differs in "
                             f"{', '.join(differ)}); rerun with its flags, or pass --results "
                             "another folder")
        self.results.setdefault("stages", {})
        self._data = None

    # -- bookkeeping ---------------------------------------------------------------------
    def done(self, key: str) -> bool:
        return key in self.results["stages"]

    def finish(self, key: str, value: dict) -> None:
        """Store a finished stage's numbers, rewrite the results files, commit them. The
        files are read again and written under a lock, so that processes running other
        methods' stages (``--methods``) keep each other's stages."""
        with open(self.work / "results.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if self.path.exists():
                self.results = json.loads(self.path.read_text())
                self.results.setdefault("stages", {})
            self.results["stages"][key] = value
            self.results["environment"] = environment(torch.device("cpu"))
            self.results["protocol"] = self.protocol
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text(json.dumps(self.results, indent=2) + "\n")
            md = self.path.with_suffix(".md")
            md.write_text(self.markdown())
            print(f"[{time.strftime('%H:%M:%S')}] stage {key} done: {value}", flush=True)
            if self.args.commit:
                self.commit(key, md)

    def commit(self, key: str, md: Path) -> None:
        """Commit the results files (retried while another git command holds the index)."""
        for attempt in range(5):
            add = subprocess.run(["git", "add", str(self.path), str(md)], cwd=REPO)
            commit = subprocess.run(["git", "commit", "-q", "-m",
                                     f"bench_training: stage {key}", "--", str(self.path), str(md)],
                                    cwd=REPO)
            if add.returncode == 0 and commit.returncode == 0:
                break
            time.sleep(10)  # another git command holds the index lock

    # -- data ----------------------------------------------------------------------------
    def training_subset(self) -> ArrayDataset:
        """The ``--train-images`` N images every method is fine-tuned on: the first N of a
        permutation of the 50,000 drawn from a generator seeded 0, in index order."""
        full = self.training_set()
        if len(full) != TRAIN_SIZE:
            raise SystemExit(f"--data holds {len(full)} training images, not CIFAR-10's "
                             f"{TRAIN_SIZE}; point --data at the CIFAR-10 folder")
        order = torch.randperm(TRAIN_SIZE, generator=torch.Generator().manual_seed(0))
        keep = order[:self.args.train_images].sort().values
        return ArrayDataset(f"cifar10-train-subset{len(keep)}", full.images[keep],
                            full.labels[keep], full.num_classes, list(full.classes))

    def training_set(self) -> ArrayDataset:
        """The 50,000 training images, decoded once into a cached uint8 tensor file."""
        if self._data is None:
            cache = self.work / "cifar10-train-uint8.pt"
            if not cache.exists():
                folder = self.work / "cifar10-train"
                if not (folder / "train").is_dir():
                    with zipfile.ZipFile(self.args.data / "cifar10" / "cifar10-train-jpeg.zip") as z:
                        z.extractall(folder)
                data = preload(load_dataset("folder", folder / "train"))
                torch.save({"images": data.images, "labels": data.labels,
                            "classes": list(data.classes)}, cache)
            saved = torch.load(cache, weights_only=True)
            self._data = ArrayDataset("cifar10-train", saved["images"], saved["labels"], 10,
                                      saved["classes"])
        return self._data

    def restore(self) -> None:
        """Copy into the work folder the checkpoints a snapshot (``--snapshot``) kept and
        the work folder lacks (a fresh clone's run resumes from the committed snapshot)."""
        if self.kept.is_dir():
            for kept in self.kept.iterdir():
                if not (self.run_dir / kept.name).exists():
                    shutil.copy2(kept, self.run_dir / kept.name)

    def snapshot(self) -> None:
        """Keep this protocol's checkpoints in the repository, so that a fresh clone's run
        does not train again: those that finished their E epochs without their optimizer
        state (certification needs the weights only), the others whole (to resume)."""
        self.kept.mkdir(parents=True, exist_ok=True)
        for method in METHODS:
            source, kept = self.checkpoint(method), self.kept / self.checkpoint(method).name
            if not source.exists():
                continue
            saved = read_checkpoint(source, trust=False, map_location=torch.device("cpu"))
            if saved["epoch"] >= self.args.epochs:
                saved.pop("optimizer", None)
            torch.save(saved, kept)
            print(f"kept {kept} ({saved['epoch']} epochs)", flush=True)

    def checkpoint(self, method: str) -> Path:
        return self.run_dir / f"{method}.pth.tar"

    def trained_epochs(self, method: str) -> int:
        """The epochs the method's checkpoint holds (0 when it is missing)."""
        path = self.checkpoint(method)
        if not path.exists():
            return 0
        return int(read_checkpoint(path, trust=False, map_location=torch.device("cpu"))["epoch"])

    # -- stages --------------------------------------------------------------------------
    def fine_tune(self, method: str, epoch: int) -> None:
        key = f"train/{method}/epoch{epoch}"
        if self.done(key) and self.trained_epochs(method) >= epoch:
            return
        batch, overrides = METHODS[method]
        config = TrainConfig(sigma=SIGMA, epochs=self.args.epochs, batch_size=batch, lr=0.01,
                             momentum=0.9, weight_decay=5e-4, schedule="cosine",
                             method=make_method(method, SIGMA, **overrides), seed=0)
        result = train(ARCH, self.training_subset(), self.checkpoint(method), config,
                       resume=True, init=SHIPPED, until=epoch, callback=_log_progress(method))
        h = result.history[epoch - 1]
        self.finish(key, {"loss": h.loss, "accuracy_under_noise_train": h.accuracy,
                          "terms": h.terms, "seconds": h.seconds, "lr": h.lr,
                          "method": config.method.record(), "batch_size": batch})

    def certify(self, method: str, kind: str) -> None:
        key = f"certify/{method}/{kind}"
        if self.done(key):
            return
        for epoch in range(1, self.args.epochs + 1):  # (re)train what is missing
            self.fine_tune(method, epoch)
        out = self.run_dir / f"{method}-{kind}.tsv"
        extra = [] if kind == "isotropic" else ["--max", str(self.args.ancer_inputs)]
        argv = ["--model", str(self.checkpoint(method)), "--method", kind, "--n", str(self.args.n),
                "--n0", "100", "--alpha", "0.001", "--seed", "0", "--compile", "on",
                "--quiet", "--out", str(out), *extra]
        print(f"[{time.strftime('%H:%M:%S')}] certify " + " ".join(argv), flush=True)
        start = time.perf_counter()
        if certify_main(argv) != 0:
            raise SystemExit(f"certify failed for {key}")
        self.finish(key, {**summarize(out, self.args.ancer_inputs),
                          "seconds_this_run": time.perf_counter() - start})

    def run(self) -> None:
        E = self.args.epochs
        stages: List[Callable[[], None]] = []
        cheap, costly = ([m for m in group if m in self.args.methods] for group in (CHEAP, COSTLY))
        stages += [lambda m=m, e=e: self.fine_tune(m, e) for e in range(1, E + 1) for m in cheap]
        stages += [lambda m=m: self.certify(m, "isotropic") for m in cheap]
        stages += [lambda m=m, e=e: self.fine_tune(m, e) for e in range(1, E + 1) for m in costly]
        stages += [lambda m=m: self.certify(m, "isotropic") for m in costly]
        stages += [lambda m=m, k=k: self.certify(m, k) for k in ("ancer", "dds")
                   for m in METHODS if m in self.args.methods]
        for stage in stages:
            stage()
        print(f"all stages of {', '.join(self.args.methods)} done", flush=True)

    # -- the report ----------------------------------------------------------------------
    def markdown(self) -> str:
        stages, E, A = self.results["stages"], self.args.epochs, self.args.ancer_inputs
        N = self.args.train_images
        lines = [f"# Certified training: {E}-epoch fine-tunes of the shipped ResNet-20 (σ = {SIGMA})\n",
                 f"Every method fine-tuned {E} epoch{'s' * (E != 1)} over a fixed {N:,}-image subset of the "
                 f"CIFAR-10 training set ({SUBSET_RULE}; a reduction of the full "
                 f"{TRAIN_SIZE:,}-image protocol at the scale this machine allows). "
                 f"Device: {environment(torch.device('cpu'))['device']}. Certification: the 100 "
                 f"shipped CIFAR-10 test images, n0 = 100, n = {self.args.n}, α = 0.001. "
                 "`-`: not measured yet.\n"]
        header = ["method", "s / epoch", *[f"cert. acc. r={r:g}" for r in RADII], "ACR",
                  "ACR − control", "acc. under noise", "clean (smoothed) acc."]
        rows, control = [], stages.get("certify/gaussian/isotropic", {}).get("acr")
        for method in METHODS:
            seconds = [stages[k]["seconds"] for k in (f"train/{method}/epoch{e}" for e in range(1, E + 1))
                       if k in stages]
            iso = stages.get(f"certify/{method}/isotropic")
            row = [method, f"{np.mean(seconds):.0f} ({len(seconds)}/{E} epochs)" if seconds else "-"]
            if iso:
                row += [f"{a:.2f}" for a in iso["certified_accuracy"]] + [f"{iso['acr']:.3f}"]
                row += [f"{iso['acr'] - control:+.3f}" if control is not None else "-"]
                row += [f"{iso['accuracy_under_noise']:.3f}", f"{iso['clean_accuracy']:.2f}"]
            else:
                row += ["-"] * (len(header) - 2)
            rows.append(row)
        lines.append(markdown_table(header, rows))
        lines.append(f"\nANCER comparison on the first {A} images (certified accuracy at proxy "
                     "radius r; mean log-volume of the certified regions of correct inputs):\n")
        header = ["model", "certificate", *[f"r={r:g}" for r in PROXY_RADII], "mean log-volume"]
        rows = []
        for method in METHODS:
            for kind in ("isotropic", "dds", "ancer"):
                run = stages.get(f"certify/{method}/{kind}")
                comparison = run and (run["first"] if kind == "isotropic" else run)
                rows.append([method, kind] + ([f"{a:.2f}" for a in comparison["proxy_accuracy"]]
                                               + [f"{comparison['mean_log_volume']:.1f}"]
                                               if comparison else ["-"] * 4))
        lines.append(markdown_table(header, rows))
        return "\n".join(lines)


def _metrics(columns: Dict[str, np.ndarray], keep: np.ndarray) -> dict:
    correct = (columns["correct"] == 1) & keep
    count = keep.sum()
    radius, proxy = columns["radius"], columns["proxy_radius"]
    return {
        "inputs": int(count),
        "certified_accuracy": [float((correct & (radius >= r)).sum() / count) for r in RADII],
        "acr": float((radius * correct).sum() / count),
        "proxy_accuracy": [float((correct & (proxy >= r)).sum() / count) for r in PROXY_RADII],
        "mean_log_volume": float(columns["log_volume"][correct].mean()) if correct.any() else math.nan,
        "clean_accuracy": float(((columns["predict"] == columns["label"]) & keep).sum() / count),
        "accuracy_under_noise": float(columns["count_label"][keep].sum()
                                      / columns["n"][keep].sum()),
    }


def summarize(path: Path, first_inputs: int) -> dict:
    """The numbers of a results file: over all its rows, and over dataset indices below
    ``first_inputs`` (the ANCER comparison's images)."""
    columns = read_results(path).columns
    everything = np.ones(len(columns["idx"]), dtype=bool)
    first = columns["idx"] < first_inputs
    return {**_metrics(columns, everything), "first": _metrics(columns, first)}


def _log_progress(method: str) -> Callable:
    """A training callback printing a line every tenth of an epoch (for the log file)."""
    def update(p) -> None:
        if p.step == p.steps or p.step % max(1, p.steps // 10) == 0:
            terms = ", ".join(f"{k} {v:.4f}" for k, v in p.terms.items())
            print(f"[{time.strftime('%H:%M:%S')}] {method} epoch {p.epoch}/{p.epochs} step "
                  f"{p.step}/{p.steps}: loss {p.loss:.4f} ({terms}), acc {p.accuracy:.4f}",
                  flush=True)
    return update


if __name__ == "__main__":
    arguments = parse_args()
    torch.set_num_threads(arguments.threads)
    bench = Bench(arguments)
    if arguments.snapshot:
        bench.snapshot()
    else:
        bench.run()
