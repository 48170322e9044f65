"""``certify train``: train a base classifier for randomized smoothing.

The command-line face of :func:`ancer.train.train`: Gaussian data augmentation (Cohen et al.
2019; uniform noise for l1, Yang et al. 2020) or a certified-training method of
:mod:`ancer.training_methods` (``--method consistency|macer|smoothadv``), from scratch or
from ``--init CKPT``. The dataset comes from :func:`ancer.data.load_dataset`; progress is a
tqdm bar per epoch with the loss, each of its terms and the accuracy under noise. Rerunning
the same command with ``--resume`` continues from the checkpoint's last finished epoch.

Every flag's ``dest`` is the name of the parameter it sets (a field of
:class:`ancer.train.TrainConfig`, a hyperparameter of :mod:`ancer.training_methods` or an
argument of :func:`ancer.train.train`), so that the parser is the one table from flags to
parameters: :func:`config_from_args` reads the fields from it, and ``certify``'s main
names each field of an error by its flag (``--batch-size``, ``--attack-steps``, ``--out``).
"""
from __future__ import annotations

import argparse
import sys
import warnings
from dataclasses import MISSING, fields
from typing import Callable, Optional

import torch

from ancer.data import load_dataset
from ancer.models import available_models
from ancer.noise import FAMILIES
from ancer.train import SCHEDULES, Progress, TrainConfig, preload, train
from ancer.training_methods import METHODS, GaussianAugmentation, make_method
from certify.arguments import Parser, add_training_execution_flags, add_training_set_flags
from certify.epochs import epoch_bar

PROG = "certify train"


#: TrainConfig's defaults, which the flags show and use
DEFAULTS = {f.name: f.default for f in fields(TrainConfig) if f.default is not MISSING}
#: the hyperparameters of ancer.training_methods' methods and their flags
METHOD_FLAGS = {
    "copies": "--copies", "lbd": "--lbd", "eta": "--eta", "draws": "--draws",
    "beta": "--beta", "gamma": "--gamma", "epsilon": "--epsilon", "steps": "--attack-steps",
    "multi_noise": "--multi-noise", "warmup": "--warmup",
}
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
    return "; ".join(f"{method}: {cls.default_text(name)}" for method, cls in METHODS.items()
                     if name in {f.name for f in fields(cls)})


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
    add_training_set_flags(p)
    p.add_argument("--norm-stats", default=None, choices=("cifar10", "imagenet", "imagenet32"),
                   help="normalization statistics (default: the architecture's)")
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
        noise.add_argument(flag, dest=name, default=None, **options,
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

    add_training_execution_flags(p)
    return p


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The TrainConfig the parsed flags describe: each field from the flag of that ``dest``,
    the method from ``--method`` and the flags of :data:`METHOD_FLAGS` given on the command
    line (the others keep the method's defaults at ``--sigma``)."""
    given = {name: getattr(args, name) for name in METHOD_FLAGS
             if getattr(args, name) is not None}
    values = {f.name: getattr(args, f.name) for f in fields(TrainConfig)}
    values["method"] = make_method(args.method, args.sigma, **given)
    return TrainConfig(**values)


def progress_bar(quiet: bool = False) -> Optional[Callable[[Progress], None]]:
    """A callback for :func:`ancer.train.train`: a tqdm bar per epoch (on stderr) with the
    loss, each of its terms, the accuracy under noise and the learning rate, and a line per
    finished epoch (on stdout); None when ``quiet``."""
    def terms(p: Progress) -> dict:
        return p.terms if len(p.terms) > 1 else {}  # a single term is the loss itself

    def postfix(p: Progress) -> dict:
        return {"loss": f"{p.loss:.4f}", **{k: f"{v:.4f}" for k, v in terms(p).items()},
                "acc": f"{p.accuracy:.4f}", "lr": f"{p.lr:.4g}"}

    def summary(p: Progress) -> str:
        said = "".join(f", {k} {v:.4f}" for k, v in terms(p).items())
        return f"loss {p.loss:.4f}{said}, accuracy under noise {p.accuracy:.4f}"

    return epoch_bar(quiet, postfix, summary)


def run(args: argparse.Namespace) -> int:
    """Run ``certify train`` with parsed arguments; return the exit status."""
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    config = config_from_args(args)
    split = {"split": args.split} if args.dataset in ("cifar10", "imagenet") else {}
    data = load_dataset(args.dataset, args.data, **split)
    if args.preload:
        data = preload(data)
    with warnings.catch_warnings():
        warnings.showwarning = _print_warning
        result = train(args.arch, data, args.checkpoint, config, dataset=args.norm_stats,
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
