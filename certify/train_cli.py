"""``certify train``: train a base classifier for randomized smoothing.

The command-line face of :func:`ancer.train.train` (Gaussian data augmentation, Cohen et
al. 2019; uniform noise for l1, Yang et al. 2020; optional consistency regularization,
Jeong & Shin 2020). The dataset comes from :func:`ancer.data.load_dataset`; progress is a
tqdm bar per epoch with the loss and the accuracy under noise. Rerunning the same command
with ``--resume`` continues from the checkpoint's last finished epoch. Errors name the flags
(``lower --batch-size``), not the parameters of the Python API they come from.
"""
from __future__ import annotations

import argparse
import re
import sys
from contextlib import contextmanager
from typing import Callable, Iterator, Optional

import torch

from ancer.data import load_dataset
from ancer.errors import ArgumentError
from ancer.models import available_models
from ancer.train import NOISES, SCHEDULES, Progress, TrainConfig, preload, train
from certify.arguments import Parser, _positive_int

PROG = "certify train"


def parser() -> argparse.ArgumentParser:
    """The parser of ``certify train``: every flag has a help that states its default."""
    p = Parser(
        prog=PROG,
        description="Train a base classifier for randomized smoothing on noisy inputs "
                    "(Cohen et al. 2019; Yang et al. 2020; Jeong & Shin 2020). Writes a "
                    "checkpoint in Cohen et al.'s format after every epoch.",
    )
    p.add_argument("--arch", required=True, choices=available_models(),
                   help="architecture (required)")
    p.add_argument("--dataset", required=True, choices=("cifar10", "imagenet", "folder", "npz"),
                   help="reader of ancer.data (folder: <class>/<image> folders; required)")
    p.add_argument("--data", required=True, metavar="ROOT",
                   help="the dataset's folder (npz: file; required)")
    p.add_argument("--split", default="train",
                   help="split for cifar10/imagenet (default %(default)s)")
    p.add_argument("--norm-stats", default=None, choices=("cifar10", "imagenet", "imagenet32"),
                   help="normalization statistics (default: the architecture's)")
    p.add_argument("--preload", action="store_true",
                   help="decode every image once into memory before training, for small "
                        "datasets (default off)")
    p.add_argument("--out", required=True, metavar="CKPT", help="checkpoint file (required)")
    p.add_argument("--resume", action="store_true",
                   help="continue from --out if it exists (default off: an existing --out is "
                        "an error)")

    noise = p.add_argument_group("noise")
    noise.add_argument("--sigma", type=float, required=True,
                       help="noise standard deviation, 0 to train on clean inputs (required)")
    noise.add_argument("--noise", choices=sorted(NOISES), default="gaussian",
                       help="gaussian (l2) or uniform (l1, half-width sqrt(3)*sigma) "
                            "(default %(default)s)")
    noise.add_argument("--consistency", type=float, default=0.0, metavar="LAMBDA",
                       help="weight of the consistency term over two noisy copies "
                            "(default %(default)s: off)")

    opt = p.add_argument_group("optimization")
    opt.add_argument("--epochs", type=int, default=90,
                     help="epochs in all; --resume continues up to this number "
                          "(default %(default)s)")
    opt.add_argument("--batch-size", type=int, default=256,
                     help="inputs per SGD step (default %(default)s)")
    opt.add_argument("--lr", type=float, default=0.1,
                     help="initial learning rate of SGD (default %(default)s)")
    opt.add_argument("--momentum", type=float, default=0.9,
                     help="SGD momentum (default %(default)s)")
    opt.add_argument("--weight-decay", type=float, default=1e-4,
                     help="SGD weight decay (default %(default)s)")
    opt.add_argument("--schedule", choices=SCHEDULES, default="step",
                     help="learning-rate schedule: step decay every --lr-step epochs or cosine "
                          "annealing to 0 (default %(default)s)")
    opt.add_argument("--lr-step", type=int, default=30,
                     help="epochs between decays of the step schedule (default %(default)s)")
    opt.add_argument("--lr-gamma", type=float, default=0.1,
                     help="decay factor of the step schedule (default %(default)s)")
    opt.add_argument("--no-augment", action="store_true",
                     help="no random crop and flip (default off: crop and flip)")
    opt.add_argument("--seed", type=int, default=0,
                     help="seed of the initialization, data order and noise "
                          "(default %(default)s)")

    run_ = p.add_argument_group("execution")
    run_.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                      help="cpu, cuda or cuda:N (default %(default)s here: cuda wherever CUDA "
                           "is available)")
    run_.add_argument("--workers", type=int, default=0,
                      help="data loader processes (default %(default)s: load in this process)")
    run_.add_argument("--threads", type=_positive_int, default=None,
                      help="CPU threads of torch (default: torch's own choice)")
    run_.add_argument("--quiet", action="store_true", help="no progress bar (default off)")
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


#: ancer.train's parameter names and the flags of certify train that set them
API_FLAGS = {
    "arch": "--arch", "sigma": "--sigma", "noise": "--noise", "epochs": "--epochs",
    "batch_size": "--batch-size", "lr": "--lr", "momentum": "--momentum",
    "weight_decay": "--weight-decay", "schedule": "--schedule", "lr_step": "--lr-step",
    "lr_gamma": "--lr-gamma", "consistency": "--consistency", "seed": "--seed",
    "device": "--device", "workers": "--workers",
}
#: phrases of ancer.train's messages and what the command line calls them
API_PHRASES = {"resume=True": "--resume", "another checkpoint path": "another --out"}
# A parameter name, with its ``=value`` when the message gives one (value quoted or bare).
_API_NAME = re.compile(r"\b(?P<name>%s)\b(?:=(?P<value>'[^']*'|[^\s,;:)]*))?"
                       % "|".join(API_FLAGS))


def in_flags(message: str) -> str:
    """An error message of :mod:`ancer.train` in the command line's words: ``batch_size=256``
    reads ``--batch-size 256``, ``resume=True`` ``--resume``, ``another checkpoint path``
    ``another --out``."""
    for phrase, words in API_PHRASES.items():
        message = message.replace(phrase, words)
    return _API_NAME.sub(_flag, message)


def _flag(match: re.Match) -> str:
    """The flag of a matched parameter name, with its value unquoted when it has one."""
    value = match["value"]
    return API_FLAGS[match["name"]] + (" " + value.strip("'") if value else "")


@contextmanager
def flags_in_errors() -> Iterator[None]:
    """Re-raise the ArgumentErrors of :mod:`ancer.train` with the flags in place of its
    parameter names (see :func:`in_flags`)."""
    try:
        yield
    except ArgumentError as error:
        raise ArgumentError(in_flags(str(error))) from None


def run(args: argparse.Namespace) -> int:
    """Run ``certify train`` with parsed arguments; return the exit status."""
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    with flags_in_errors():
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
    with flags_in_errors():
        result = train(args.arch, data, args.out, config, dataset=args.norm_stats,
                       device=args.device, resume=args.resume, workers=args.workers,
                       callback=progress_bar(args.quiet))
    if result.history:
        last = result.history[-1]
        print(f"trained {args.arch} for {last.epoch} epochs: loss {last.loss:.4f}, accuracy "
              f"under noise {last.accuracy:.4f}; checkpoint {result.checkpoint}")
    return 0
