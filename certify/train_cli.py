"""``certify train``: train a base classifier for randomized smoothing.

The command-line face of :func:`ancer.train.train` (Gaussian data augmentation, Cohen et
al. 2019; uniform noise for l1, Yang et al. 2020; optional consistency regularization,
Jeong & Shin 2020). The dataset comes from :func:`ancer.data.load_dataset`; progress is a
tqdm bar per epoch with the loss and the accuracy under noise. Rerunning the same command
with ``--resume`` continues from the checkpoint's last finished epoch.
"""
from __future__ import annotations

import argparse
import sys
from typing import Callable, Optional

import torch

from ancer.data import load_dataset
from ancer.errors import ArgumentError
from ancer.models import available_models
from ancer.train import NOISES, SCHEDULES, Progress, TrainConfig, preload, train
from certify.arguments import Parser

PROG = "certify train"


def parser() -> argparse.ArgumentParser:
    """The parser of ``certify train``."""
    p = Parser(
        prog=PROG,
        description="Train a base classifier for randomized smoothing on noisy inputs "
                    "(Cohen et al. 2019; Yang et al. 2020; Jeong & Shin 2020). Writes a "
                    "checkpoint in Cohen et al.'s format after every epoch.",
    )
    p.add_argument("--arch", required=True, choices=available_models(), help="architecture")
    p.add_argument("--dataset", required=True, choices=("cifar10", "imagenet", "folder", "npz"),
                   help="reader of ancer.data (folder: <class>/<image> folders)")
    p.add_argument("--data", required=True, metavar="ROOT", help="the dataset's folder (npz: file)")
    p.add_argument("--split", default="train", help="split for cifar10/imagenet (default train)")
    p.add_argument("--norm-stats", default=None, choices=("cifar10", "imagenet", "imagenet32"),
                   help="normalization statistics (default: the architecture's)")
    p.add_argument("--preload", action="store_true",
                   help="decode every image once into memory before training (small datasets)")
    p.add_argument("--out", required=True, metavar="CKPT", help="checkpoint file")
    p.add_argument("--resume", action="store_true", help="continue from --out if it exists")

    noise = p.add_argument_group("noise")
    noise.add_argument("--sigma", type=float, required=True, help="noise standard deviation")
    noise.add_argument("--noise", choices=sorted(NOISES), default="gaussian",
                       help="gaussian (l2) or uniform (l1, half-width sqrt(3)*sigma)")
    noise.add_argument("--consistency", type=float, default=0.0, metavar="LAMBDA",
                       help="weight of the consistency term over two noisy copies (default 0: off)")

    opt = p.add_argument_group("optimization")
    opt.add_argument("--epochs", type=int, default=90)
    opt.add_argument("--batch-size", type=int, default=256)
    opt.add_argument("--lr", type=float, default=0.1)
    opt.add_argument("--momentum", type=float, default=0.9)
    opt.add_argument("--weight-decay", type=float, default=1e-4)
    opt.add_argument("--schedule", choices=SCHEDULES, default="step")
    opt.add_argument("--lr-step", type=int, default=30, help="epochs between decays (step)")
    opt.add_argument("--lr-gamma", type=float, default=0.1, help="decay factor (step)")
    opt.add_argument("--no-augment", action="store_true", help="no random crop and flip")
    opt.add_argument("--seed", type=int, default=0)

    run_ = p.add_argument_group("execution")
    run_.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    run_.add_argument("--workers", type=int, default=0, help="data loader processes")
    run_.add_argument("--threads", type=int, default=None, help="CPU threads of torch")
    run_.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def progress_bar(quiet: bool = False) -> Optional[Callable[[Progress], None]]:
    """A callback for :func:`ancer.train.train` drawing one tqdm bar per epoch (on
    stderr) and printing a line per finished epoch (on stdout); None when ``quiet``."""
    if quiet:
        return None
    from tqdm import tqdm

    bar = None

    def update(p: Progress) -> None:
        nonlocal bar
        if p.step == 1:
            bar = tqdm(total=p.steps, desc=f"epoch {p.epoch}/{p.epochs}", file=sys.stderr,
                       dynamic_ncols=True, mininterval=5.0)
        bar.update(1)
        bar.set_postfix(loss=f"{p.loss:.4f}", acc=f"{p.accuracy:.4f}", lr=f"{p.lr:.4g}",
                        refresh=False)
        if p.step == p.steps:
            bar.close()
            print(f"epoch {p.epoch}/{p.epochs}: loss {p.loss:.4f}, accuracy under noise "
                  f"{p.accuracy:.4f}", flush=True)

    return update


def run(args: argparse.Namespace) -> int:
    """Run ``certify train`` with parsed arguments; return the exit status."""
    if args.threads is not None:
        if args.threads < 1:
            raise ArgumentError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    config = TrainConfig(
        sigma=args.sigma, noise=args.noise, epochs=args.epochs, batch_size=args.batch_size,
        lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay,
        schedule=args.schedule, lr_step=args.lr_step, lr_gamma=args.lr_gamma,
        consistency=args.consistency, augment=not args.no_augment, seed=args.seed,
    )
    split = {"split": args.split} if args.dataset in ("cifar10", "imagenet") else {}
    data = load_dataset(args.dataset, args.data, **split)
    if args.preload:
        data = preload(data)
    result = train(args.arch, data, args.out, config, dataset=args.norm_stats,
                   device=args.device, resume=args.resume, workers=args.workers,
                   callback=progress_bar(args.quiet))
    if result.history:
        last = result.history[-1]
        print(f"trained {args.arch} for {last.epoch} epochs: loss {last.loss:.4f}, accuracy "
              f"under noise {last.accuracy:.4f}; checkpoint {result.checkpoint}")
    return 0
