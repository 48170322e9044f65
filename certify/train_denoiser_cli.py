"""``certify train-denoiser``: train a denoiser for denoised smoothing.

The command-line face of :func:`ancer.denoise_train.train_denoiser` (Salman et al.,
NeurIPS 2020: the MSE objective, or the stability objective through a frozen classifier).
The dataset comes from :func:`ancer.data.load_dataset`; progress is a tqdm bar per epoch.
Rerunning the same command with ``--resume`` continues from the checkpoint's last
finished epoch.
"""
from __future__ import annotations

import argparse
import sys
from typing import Callable, Optional

import torch

from ancer.data import load_dataset
from ancer.denoise_train import OBJECTIVES, DenoiseConfig, DenoiseProgress, train_denoiser
from ancer.denoisers.archs import DENOISER_ARCHITECTURES
from ancer.errors import ArgumentError
from ancer.models import load_model
from ancer.train import preload
from certify.arguments import Parser, _positive_float, _positive_int

PROG = "certify train-denoiser"


def parser() -> argparse.ArgumentParser:
    """The parser of ``certify train-denoiser``: every flag states its default."""
    p = Parser(
        prog=PROG,
        description="Train a denoiser D for denoised smoothing of a classifier f (Salman et "
                    "al., NeurIPS 2020), by MSE or by the stability objective "
                    "CE(f(D(x+noise)), f(x)) through a frozen classifier. Writes a checkpoint "
                    "in the authors' {'arch', 'state_dict'} layout after every epoch.",
    )
    p.add_argument("--arch", required=True, choices=list(DENOISER_ARCHITECTURES),
                   help="denoiser architecture; cifar_dncnn_small is ancer's small DnCNN "
                        "(required)")
    p.add_argument("--dataset", required=True, choices=("cifar10", "imagenet", "folder", "npz"),
                   help="reader of ancer.data (folder: <class>/<image> folders; required)")
    p.add_argument("--data", required=True, metavar="ROOT",
                   help="the dataset's folder (npz: file; required)")
    p.add_argument("--split", default="train",
                   help="split for cifar10/imagenet (default %(default)s)")
    p.add_argument("--preload", action="store_true",
                   help="decode every image once into memory first, for small datasets "
                        "(default off)")
    p.add_argument("--out", required=True, metavar="CKPT", help="checkpoint file (required)")
    p.add_argument("--resume", action="store_true",
                   help="continue from --out if it exists (default off: an existing --out is "
                        "an error)")
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
    opt.add_argument("--no-augment", action="store_true",
                     help="no random crop and flip (default off: crop and flip)")
    opt.add_argument("--seed", type=int, default=0,
                     help="seed of the initialization, order and noise (default %(default)s)")

    run_ = p.add_argument_group("execution")
    run_.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                      help="cpu, cuda or cuda:N (default %(default)s here)")
    run_.add_argument("--workers", type=int, default=0,
                      help="data loader processes (default %(default)s)")
    run_.add_argument("--threads", type=_positive_int, default=None,
                      help="CPU threads of torch (default: torch's own choice)")
    run_.add_argument("--quiet", action="store_true", help="no progress bar (default off)")
    return p


def progress_bar(quiet: bool) -> Optional[Callable[[DenoiseProgress], None]]:
    """A tqdm bar per epoch on stderr and a line per finished epoch on stdout."""
    if quiet:
        return None
    from tqdm import tqdm

    bar = None

    def update(p: DenoiseProgress) -> None:
        nonlocal bar
        if p.step == 1:
            bar = tqdm(total=p.steps, desc=f"epoch {p.epoch}/{p.epochs}", file=sys.stderr,
                       dynamic_ncols=True, mininterval=5.0)
        bar.update(1)
        shown = {"loss": f"{p.loss:.5f}", "lr": f"{p.lr:.3g}"}
        if p.agreement is not None:
            shown["agree"] = f"{p.agreement:.4f}"
        bar.set_postfix(shown, refresh=False)
        if p.step == p.steps:
            bar.close()
            agreement = "" if p.agreement is None else f", agreement with f(x) {p.agreement:.4f}"
            print(f"epoch {p.epoch}/{p.epochs}: loss {p.loss:.5f}{agreement}", flush=True)

    return update


def run(args: argparse.Namespace) -> int:
    """Run ``certify train-denoiser`` with parsed arguments; return the exit status."""
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.objective == "stability" and args.classifier is None:
        raise ArgumentError("--objective stability needs the frozen classifier: add "
                            "--classifier CKPT")
    try:
        config = DenoiseConfig(
            sigma=args.sigma, objective=args.objective, epochs=args.epochs,
            batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay,
            lr_step=args.lr_step, lr_gamma=args.lr_gamma, augment=not args.no_augment,
            seed=args.seed)
    except ArgumentError as error:  # the config's names are the flags' with dashes
        raise ArgumentError("--" + str(error).replace("_", "-")) from None
    classifier = None
    if args.classifier is not None:
        classifier = load_model(args.classifier, map_location=args.device).model
    split = {"split": args.split} if args.dataset in ("cifar10", "imagenet") else {}
    data = load_dataset(args.dataset, args.data, **split)
    if args.preload:
        data = preload(data)
    result = train_denoiser(args.arch, data, args.out, config, classifier=classifier,
                            init=args.init, device=args.device, resume=args.resume,
                            workers=args.workers, callback=progress_bar(args.quiet))
    if result.history:
        last = result.history[-1]
        print(f"trained {args.arch} ({args.objective}, sigma {args.sigma:g}) for {last.epoch} "
              f"epochs: loss {last.loss:.5f}; checkpoint {result.checkpoint}")
    return 0
