"""``certify train-denoiser``: train a denoiser for denoised smoothing.

The command-line face of :func:`ancer.denoise_train.train_denoiser` (Salman et al.
2020: the MSE objective, or the stability objective through a frozen classifier).
The dataset comes from :func:`ancer.data.load_dataset`; progress is a tqdm bar per epoch.
Rerunning the same command with ``--resume`` continues from the checkpoint's last
finished epoch. Every flag's ``dest`` is the name of the parameter it sets (a field of
:class:`ancer.denoise_train.DenoiseConfig` or an argument of ``train_denoiser``), so that
the parser is the one table from flags to parameters, and ``certify``'s main names each
field of an error by its flag.
"""
from __future__ import annotations

import argparse
from dataclasses import fields
from typing import Callable, Optional

import torch

from ancer.data import load_dataset
from ancer.denoise_train import OBJECTIVES, DenoiseConfig, DenoiseProgress, train_denoiser
from ancer.denoisers.archs import DENOISER_ARCHITECTURES
from ancer.errors import ArgumentError
from ancer.models import load_model
from ancer.train import preload
from certify.arguments import (Parser, _positive_float, _positive_int, add_training_execution_flags,
                                add_training_set_flags)
from certify.epochs import epoch_bar

PROG = "certify train-denoiser"


def parser() -> argparse.ArgumentParser:
    """The parser of ``certify train-denoiser``: every flag states its default."""
    p = Parser(
        prog=PROG,
        description="Train a denoiser D for denoised smoothing of a classifier f (Salman et "
                    "al. 2020), by MSE or by the stability objective "
                    "CE(f(D(x+noise)), f(x)) through a frozen classifier. Writes a checkpoint "
                    "in the authors' {'arch', 'state_dict'} layout after every epoch.",
    )
    p.add_argument("--arch", required=True, choices=list(DENOISER_ARCHITECTURES),
                   help="denoiser architecture; cifar_dncnn_small is ancer's small DnCNN "
                        "(required)")
    add_training_set_flags(p)
    p.add_argument("--init", metavar="CKPT",
                   help="start from this denoiser checkpoint, e.g. an MSE-trained one before "
                        "the stability objective (default: the architecture's identity "
                        "initialization)")

    obj = p.add_argument_group("objective")
    obj.add_argument("--sigma", type=_positive_float, required=True,
                     help="noise standard deviation on [0, 1] images (required)")
    obj.add_argument("--objective", choices=OBJECTIVES, default="mse",
                     help="mse (denoising) or stability (needs --classifier) "
                          "(default %(default)s)")
    obj.add_argument("--classifier", metavar="CKPT",
                     help="the frozen classifier of the stability objective (any checkpoint "
                          "certify --model reads)")

    opt = p.add_argument_group("optimization (Adam)")
    opt.add_argument("--epochs", type=_positive_int, default=90,
                     help="epochs in all; --resume continues up to this number "
                          "(default %(default)s)")
    opt.add_argument("--batch-size", type=_positive_int, default=256,
                     help="images per step (default %(default)s)")
    opt.add_argument("--lr", type=_positive_float, default=1e-3,
                     help="initial learning rate (default %(default)s)")
    opt.add_argument("--weight-decay", type=float, default=1e-4,
                     help="weight decay (default %(default)s)")
    opt.add_argument("--lr-step", type=_positive_int, default=30,
                     help="epochs between decays of the learning rate (default %(default)s)")
    opt.add_argument("--lr-gamma", type=float, default=0.1,
                     help="decay factor (default %(default)s)")
    opt.add_argument("--augment", action=argparse.BooleanOptionalAction, default=True,
                     help="random crop and flip (default %(default)s; --no-augment: none)")
    opt.add_argument("--seed", type=int, default=0,
                     help="seed of the initialization, order and noise (default %(default)s)")

    add_training_execution_flags(p)
    return p


def progress_bar(quiet: bool) -> Optional[Callable[[DenoiseProgress], None]]:
    """A tqdm bar per epoch on stderr (the loss, the learning rate and, for the stability
    objective, the agreement with f(x)) and a line per finished epoch on stdout."""
    def postfix(p: DenoiseProgress) -> dict:
        shown = {"loss": f"{p.loss:.5f}", "lr": f"{p.lr:.3g}"}
        return shown if p.agreement is None else {**shown, "agree": f"{p.agreement:.4f}"}

    def summary(p: DenoiseProgress) -> str:
        agreement = "" if p.agreement is None else f", agreement with f(x) {p.agreement:.4f}"
        return f"loss {p.loss:.5f}{agreement}"

    return epoch_bar(quiet, postfix, summary)


def run(args: argparse.Namespace) -> int:
    """Run ``certify train-denoiser`` with parsed arguments; return the exit status."""
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.objective == "stability" and args.classifier is None:
        raise ArgumentError("--objective stability needs the frozen classifier: add "
                            "--classifier CKPT")
    config = DenoiseConfig(**{f.name: getattr(args, f.name) for f in fields(DenoiseConfig)})
    classifier = None
    if args.classifier is not None:
        classifier = load_model(args.classifier, map_location=args.device).model
    split = {"split": args.split} if args.dataset in ("cifar10", "imagenet") else {}
    data = load_dataset(args.dataset, args.data, **split)
    if args.preload:
        data = preload(data)
    result = train_denoiser(args.arch, data, args.checkpoint, config, classifier=classifier,
                            init=args.init, device=args.device, resume=args.resume,
                            workers=args.workers, callback=progress_bar(args.quiet))
    if result.history:
        last = result.history[-1]
        print(f"trained {args.arch} ({args.objective}, sigma {args.sigma:g}) for {last.epoch} "
              f"epochs: loss {last.loss:.5f}; checkpoint {result.checkpoint}")
    return 0
