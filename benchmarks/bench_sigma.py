"""Choosing σ: the accuracy/radius trade-off of models trained and certified at σ = 0.12,
0.25 and 0.5, measured on the 100 CIFAR-10 test images shipped with ancer.

A model must be trained at the σ it is certified at (Cohen et al., ICML 2019, train and
certify each σ separately), so the script trains one CIFAR ResNet-20 per σ with the same
recipe through ``certify train`` (Gaussian data augmentation on the CIFAR-10 training
JPEGs, cosine schedule, seed 0; only σ differs), then certifies each on the shipped test
images through ``certify`` and writes ``certify report`` of the three runs.

``--data DIR`` is a folder holding ``cifar10/cifar10-train-jpeg.zip`` (the 50,000 training
images as ``train/<class>/<NNNN>.jpg``, classes in CIFAR-10's label order). Everything is
resumable: the training JPEGs are unzipped once into ``--work``, each training resumes from
its checkpoint's last finished epoch (``certify train --resume``), each certification from
its last written row (rerunning ``certify``), so rerunning the same command after an
interruption continues where it stopped. Results go to
``benchmarks/results/sigma-<tag>/`` (one TSV per σ, their ``.json`` settings, and
``report.md`` with the training accuracy of each model; a σ whose TSV holds every
image is not trained again)::

    PYTHONPATH=. python3 benchmarks/bench_sigma.py --data DATA_DIR --work /tmp/ancer-sigma \\
        --epochs 3 --n 1000 --threads 1
"""
from __future__ import annotations

import argparse
import contextlib
import io
import time
import zipfile
from pathlib import Path
from typing import List

import torch

from certify.cli import main as certify_main

RESULTS = Path(__file__).resolve().parent / "results"
SIGMAS = (0.12, 0.25, 0.5)
#: the CIFAR-10 test images shipped in certify/assets/cifar10_test_sample.npz
SHIPPED_IMAGES = 100


def unzip_train(data: Path, work: Path) -> Path:
    """The training images' folder under ``work``, unzipped once (a marker file says the
    extraction finished)."""
    done = work / "train.unzipped"
    if not done.exists():
        with zipfile.ZipFile(data / "cifar10" / "cifar10-train-jpeg.zip") as archive:
            archive.extractall(work)
        done.write_text("ok\n")
    return work / "train"


def trained_epochs(checkpoint: Path) -> int:
    """The epochs a checkpoint has finished (0 when it does not exist yet)."""
    if not checkpoint.exists():
        return 0
    return int(torch.load(checkpoint, map_location="cpu", weights_only=True)["epoch"])


def train(train_dir: Path, checkpoint: Path, sigma: float, epochs: int, threads: int) -> None:
    """Train (or resume) one ResNet-20 at ``sigma`` with the shipped model's recipe; a
    finished checkpoint is kept as it is (without decoding the images again)."""
    if trained_epochs(checkpoint) >= epochs:
        return
    args = ["train", "--arch", "cifar_resnet20", "--dataset", "folder", "--data", str(train_dir),
            "--preload", "--sigma", str(sigma), "--epochs", str(epochs), "--batch-size", "128",
            "--lr", "0.1", "--schedule", "cosine", "--weight-decay", "5e-4", "--seed", "0",
            "--threads", str(threads), "--resume", "--quiet", "--out", str(checkpoint)]
    print("certify " + " ".join(args), flush=True)
    if certify_main(args) != 0:
        raise SystemExit("certify train failed (see the error above)")


def certify(checkpoint: Path, out: Path, sigma: float, n: int) -> None:
    """Certify the shipped test images with the model at its own σ (resumes ``out``)."""
    args = ["--model", str(checkpoint), "--sigma", str(sigma), "--n0", "100", "--n", str(n),
            "--alpha", "0.001", "--quiet", "--out", str(out)]
    print("certify " + " ".join(args), flush=True)
    if certify_main(args) != 0:
        raise SystemExit("certify failed (see the error above)")


def rows_written(tsv: Path) -> int:
    """The result rows a TSV holds (0 when it does not exist yet)."""
    if not tsv.exists():
        return 0
    with tsv.open() as handle:
        return sum(1 for _ in handle) - 1


def record_training_accuracy(checkpoint: Path, record: Path) -> None:
    """Keep the last epoch's accuracy under noise on the training images beside the results
    (the checkpoint lives in ``--work``, which may not outlast the session)."""
    last = torch.load(checkpoint, map_location="cpu", weights_only=True)["history"][-1]
    record.write_text(f"{last['accuracy']:.4f} (epoch {last['epoch']})\n")


def main(argv: List[str] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True,
                        help="folder holding cifar10/cifar10-train-jpeg.zip")
    parser.add_argument("--work", type=Path, required=True,
                        help="folder for the unzipped images and the checkpoints")
    parser.add_argument("--epochs", type=int, default=3, help="training epochs per σ (default 3)")
    parser.add_argument("--n", type=int, default=1000, help="CERTIFY's n (default 1000)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--sigmas", default=",".join(map(str, SIGMAS)),
                        help="comma-separated σ values, trained and certified in this order "
                             "(default 0.12,0.25,0.5)")
    parser.add_argument("--tag", default=None,
                        help="results folder suffix (default resnet20-<epochs>ep-n<n>)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    sigmas = [float(s) for s in args.sigmas.split(",")]
    tag = args.tag or f"resnet20-{args.epochs}ep-n{args.n}"
    out_dir = RESULTS / f"sigma-{tag}"
    out_dir.mkdir(parents=True, exist_ok=True)
    args.work.mkdir(parents=True, exist_ok=True)
    train_dir = unzip_train(args.data, args.work)

    for sigma in sigmas:  # in the order given, so that a chosen σ finishes first
        checkpoint = args.work / f"cifar10_resnet20_sigma{sigma}_{args.epochs}ep.pth.tar"
        start = time.time()
        tsv = out_dir / f"sigma{sigma}.tsv"
        if rows_written(tsv) >= SHIPPED_IMAGES:  # certified in an earlier session
            continue
        train(train_dir, checkpoint, sigma, args.epochs, args.threads)
        record_training_accuracy(checkpoint, out_dir / f"sigma{sigma}-training-accuracy.txt")
        certify(checkpoint, tsv, sigma, args.n)
        print(f"σ = {sigma}: trained and certified ({time.time() - start:.0f} s in this run)",
              flush=True)

    sigmas = sorted(sigmas)
    tsvs = [out_dir / f"sigma{sigma}.tsv" for sigma in sigmas]
    records = {sigma: out_dir / f"sigma{sigma}-training-accuracy.txt" for sigma in sigmas}
    notes = [f"- σ = {sigma}: accuracy under noise on the training images "
             + (record.read_text().strip() if record.exists() else "not recorded")
             for sigma, record in records.items()]

    table = io.StringIO()
    with contextlib.redirect_stdout(table):
        labels = [arg for sigma in sigmas for arg in ("--label", f"σ={sigma}")]
        certify_main(["report", *map(str, tsvs), "--radii", "0:1.25:0.125", *labels])
    command = ("PYTHONPATH=. python3 benchmarks/bench_sigma.py --data DATA_DIR --work WORK "
               f"--epochs {args.epochs} --n {args.n} --threads {args.threads}")
    (out_dir / "report.md").write_text(
        f"# Choosing σ: CIFAR ResNet-20, {args.epochs} epochs per σ, n = {args.n}\n\n"
        f"`{command}`\n\n" + table.getvalue() + "\n" + "\n".join(notes) + "\n")
    print(table.getvalue())


if __name__ == "__main__":
    main()
