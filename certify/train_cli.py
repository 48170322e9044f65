"""``certify train``: train a base classifier for randomized smoothing.

The command-line face of :func:`ancer.train.train`: Gaussian data augmentation (Cohen et al.
2019; uniform noise for l1, Yang et al. 2020) or a certified-training method of
:mod:`ancer.training_methods` (``--method consistency|macer|smoothadv``), from scratch or
from ``--init CKPT``. The dataset comes from :func:`ancer.data.load_dataset`; progress is a
tqdm bar per epoch with the loss, each of its terms and the accuracy under noise. Rerunning
the same command with ``--resume`` continues from the checkpoint's last finished epoch.

Flags and the parameters they set are listed once (:data:`CONFIG_FLAGS`,
:data:`METHOD_FLAGS`, :data:`CALL_FLAGS`): the parser, the translation to
:class:`ancer.train.TrainConfig` and the errors (``lower --batch-size``, not the Python
parameter's name) all derive from those tables.
"""
from __future__ import annotations

import argparse
import re
import sys
import warnings
from contextlib import contextmanager
from dataclasses import MISSING, fields
from typing import Callable, Iterator, Optional

import torch

from ancer.data import load_dataset
from ancer.errors import ArgumentError
from ancer.models import available_models
from ancer.noise import FAMILIES
from ancer.train import SCHEDULES, Progress, TrainConfig, preload, train
from ancer.training_methods import CONSISTENCY_LAMBDA, METHODS, GaussianAugmentation, make_method
from certify.arguments import Parser, _positive_int

PROG = "certify train"


#: TrainConfig's defaults, which the flags show and use
DEFAULTS = {f.name: f.default for f in fields(TrainConfig) if f.default is not MISSING}
#: TrainConfig's fields and their flags
CONFIG_FLAGS = {
    "sigma": "--sigma", "noise": "--noise", "epochs": "--epochs", "batch_size": "--batch-size",
    "lr": "--lr", "momentum": "--momentum", "weight_decay": "--weight-decay",
    "schedule": "--schedule", "lr_step": "--lr-step", "lr_gamma": "--lr-gamma",
    "augment": "--augment", "seed": "--seed", "method": "--method",
}
#: the hyperparameters of ancer.training_methods' methods and their flags
METHOD_FLAGS = {
    "copies": "--copies", "lbd": "--lbd", "eta": "--eta", "draws": "--draws",
    "beta": "--beta", "gamma": "--gamma", "epsilon": "--epsilon", "steps": "--attack-steps",
    "multi_noise": "--multi-noise", "warmup": "--warmup",
}
#: ancer.train.train's other parameters and their flags
CALL_FLAGS = {"arch": "--arch", "device": "--device", "workers": "--workers", "init": "--init"}
#: what each hyperparameter means, for --help
METHOD_HELP = {
    "copies": "noise draws per input (m)", "lbd": "weight of the regularizer (lambda)",
    "eta": "weight of the entropy of the mean prediction", "draws": "noise draws per input (k)",
    "beta": "inverse temperature of the soft smoothed classifier",
    "gamma": "hinge on the radius gap",
    "epsilon": "radius of the attack (l2; l1 with --noise uniform)",
    "steps": "PGD steps", "multi_noise": "train on every noisy copy of the attacked input",
    "warmup": "epochs over which the attack radius grows linearly to --epsilon",
}


def _method_defaults(name: str) -> str:
    """``method: default`` for each method with hyperparameter ``name``."""
    said = []
    for method, cls in METHODS.items():
        for f in fields(cls):
            if f.name == name:
                default = f.default if f.default is not MISSING else None
                if method == "consistency" and name == "lbd":  # depends on sigma
                    default = ", ".join(f"{lbd:g} at sigma <= {top:g}" for top, lbd in
                                        CONSISTENCY_LAMBDA).replace("at sigma <= inf", "above")
                said.append(f"{method}: {default}")
    return "; ".join(said)


def parser() -> argparse.ArgumentParser:
    """The parser of ``certify train``: every flag has a help that states its default."""
    p = Parser(
        prog=PROG,
        description="Train a base classifier for randomized smoothing on noisy inputs: "
                    "Gaussian or uniform augmentation (Cohen et al. 2019; Yang et al. 2020), "
                    "consistency regularization (Jeong & Shin 2020), MACER (Zhai et al. 2020) "
                    "or SmoothAdv (Salman et al. 2019). Writes a checkpoint in Cohen et al.'s "
                    "format after every epoch.",
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
    p.add_argument("--init", default=None, metavar="CKPT",
                   help="start from this checkpoint's weights (same --arch and class count), "
                        "with a fresh optimizer: fine-tuning (default: a fresh initialization)")

    noise = p.add_argument_group("noise and method")
    noise.add_argument("--sigma", type=float, required=True,
                       help="noise standard deviation, 0 to train on clean inputs with "
                            "--method gaussian (required)")
    noise.add_argument("--noise", choices=sorted(FAMILIES), default=DEFAULTS["noise"],
                       help="gaussian (l2) or uniform (l1, half-width sqrt(3)*sigma) "
                            "(default %(default)s)")
    noise.add_argument("--method", choices=list(METHODS), default=GaussianAugmentation.name,
                       help="training objective: noise augmentation (gaussian), consistency "
                            "regularization, MACER or SmoothAdv (default %(default)s)")
    for name, flag in METHOD_FLAGS.items():
        options = dict(action=argparse.BooleanOptionalAction) if name == "multi_noise" else \
            dict(type=int if name in ("copies", "draws", "steps", "warmup") else float)
        if name != "multi_noise":
            options["metavar"] = {"copies": "M", "draws": "K", "lbd": "LAMBDA"}.get(name, name.upper())
        noise.add_argument(flag, dest="method_" + name, default=None, **options,
                           help=f"{METHOD_HELP[name]} (default {_method_defaults(name)})")

    opt = p.add_argument_group("optimization")
    opt.add_argument("--epochs", type=int, default=DEFAULTS["epochs"],
                     help="epochs in all; --resume continues up to this number "
                          "(default %(default)s)")
    opt.add_argument("--batch-size", type=int, default=DEFAULTS["batch_size"],
                     help="inputs per SGD step (default %(default)s)")
    opt.add_argument("--lr", type=float, default=DEFAULTS["lr"],
                     help="initial learning rate of SGD (default %(default)s)")
    opt.add_argument("--momentum", type=float, default=DEFAULTS["momentum"],
                     help="SGD momentum (default %(default)s)")
    opt.add_argument("--weight-decay", type=float, default=DEFAULTS["weight_decay"],
                     help="SGD weight decay (default %(default)s)")
    opt.add_argument("--schedule", choices=SCHEDULES, default=DEFAULTS["schedule"],
                     help="learning-rate schedule: step decay every --lr-step epochs or cosine "
                          "annealing to 0 (default %(default)s)")
    opt.add_argument("--lr-step", type=int, default=DEFAULTS["lr_step"],
                     help="epochs between decays of the step schedule (default %(default)s)")
    opt.add_argument("--lr-gamma", type=float, default=DEFAULTS["lr_gamma"],
                     help="decay factor of the step schedule (default %(default)s)")
    opt.add_argument("--augment", action=argparse.BooleanOptionalAction, default=DEFAULTS["augment"],
                     help="random crop and flip (default %(default)s; --no-augment: none)")
    opt.add_argument("--seed", type=int, default=DEFAULTS["seed"],
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


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The TrainConfig the parsed flags describe: each field from its flag of
    :data:`CONFIG_FLAGS`, the method from ``--method`` and the flags of :data:`METHOD_FLAGS`
    given on the command line (the others keep the method's defaults at ``--sigma``)."""
    given = {name: getattr(args, "method_" + name) for name in METHOD_FLAGS
             if getattr(args, "method_" + name) is not None}
    values = {name: getattr(args, name) for name in CONFIG_FLAGS}
    with flags_in_errors():
        values["method"] = make_method(args.method, args.sigma, **given)
        return TrainConfig(**values)


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
        terms = p.terms if len(p.terms) > 1 else {}  # a single term is the loss itself
        bar.set_postfix(loss=f"{p.loss:.4f}", **{k: f"{v:.4f}" for k, v in terms.items()},
                        acc=f"{p.accuracy:.4f}", lr=f"{p.lr:.4g}", refresh=False)
        if p.step == p.steps:
            bar.close()
            said = "".join(f", {k} {v:.4f}" for k, v in terms.items())
            print(f"epoch {p.epoch}/{p.epochs}: loss {p.loss:.4f}{said}, accuracy under noise "
                  f"{p.accuracy:.4f}", flush=True)

    return update


#: every parameter name of ancer.train and ancer.training_methods, and its flag
API_FLAGS = {**CONFIG_FLAGS, **METHOD_FLAGS, **CALL_FLAGS}
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
    config = config_from_args(args)
    split = {"split": args.split} if args.dataset in ("cifar10", "imagenet") else {}
    data = load_dataset(args.dataset, args.data, **split)
    if args.preload:
        data = preload(data)
    with flags_in_errors(), warnings.catch_warnings():
        warnings.showwarning = _print_warning
        result = train(args.arch, data, args.out, config, dataset=args.norm_stats,
                       device=args.device, resume=args.resume, init=args.init,
                       workers=args.workers, callback=progress_bar(args.quiet))
    if result.history:
        last = result.history[-1]
        print(f"trained {args.arch} for {last.epoch} epochs ({config.method.name}): loss "
              f"{last.loss:.4f}, accuracy under noise {last.accuracy:.4f}; checkpoint "
              f"{result.checkpoint}")
    return 0


def _print_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """A warning of ancer.train as one line on stderr."""
    print(f"{PROG}: warning: {message}", file=sys.stderr, flush=True)
