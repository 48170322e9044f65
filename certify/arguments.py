"""Argument types shared by the ``certify`` command and its subcommands: a parser whose
errors are one-line ``ArgumentError``s, and validated number types."""

from __future__ import annotations

import argparse
import math
import re
from typing import Callable, NoReturn

import torch

from ancer.errors import ArgumentError


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are ArgumentError, so main prints them in one line.
    Every subcommand's parser should be one."""

    def error(self, message: str) -> NoReturn:
        raise ArgumentError(f"{message} (see '{self.prog} --help')")


def _number(kind: Callable[[str], float], test: Callable[[float], bool],
            requirement: str) -> Callable[[str], float]:
    """An argparse type: ``kind(text)`` that must pass ``test``, else an error naming
    ``requirement``."""
    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number; give {requirement}") \
                from None
        if not test(value):
            raise argparse.ArgumentTypeError(f"{text!r} is out of range; give {requirement}")
        return value
    parse.__name__ = kind.__name__  # argparse names the type in some messages
    return parse


_positive_float = _number(float, lambda v: math.isfinite(v) and v > 0, "a number > 0")
_probability = _number(float, lambda v: 0 < v < 1, "a number strictly between 0 and 1")
_positive_int = _number(int, lambda v: v >= 1, "an integer >= 1")
_int = _number(int, lambda v: True, "an integer")


def _shard(text: str) -> tuple[int, int]:
    """``i/k`` with 0 <= i < k: this job's shard of the inputs (job arrays, no torchrun)."""
    match = re.fullmatch(r"(\d+)/(\d+)", text)
    if match is None or not 0 <= int(match[1]) < int(match[2]):
        raise argparse.ArgumentTypeError(f"{text!r}: give i/k with 0 <= i < k, e.g. 0/4 for the "
                                         "first of four shards")
    return int(match[1]), int(match[2])


def _device(text: str) -> str:
    if re.fullmatch(r"cpu|cuda(:\d+)?", text) is None:
        raise argparse.ArgumentTypeError(f"{text!r}: give cpu, cuda or cuda:N")
    return text


def _radii(text: str) -> tuple[float, ...]:
    """``r1,r2,...``: the radii of sequential certification (checked further by the config)."""
    try:
        radii = tuple(float(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give radii as numbers separated by commas, "
                                         "e.g. 0.25,0.5,0.75") from None
    return radii


def add_training_set_flags(p: argparse.ArgumentParser) -> None:
    """The flags of a training run's data and checkpoint, shared by ``certify train`` and
    ``certify train-denoiser``: --dataset, --data, --split, --preload, --out, --resume."""
    p.add_argument("--dataset", required=True, choices=("cifar10", "imagenet", "folder", "npz"),
                   help="reader of ancer.data (folder: <class>/<image> folders; required)")
    p.add_argument("--data", required=True, metavar="ROOT",
                   help="the dataset's folder (npz: file; required)")
    p.add_argument("--split", default="train",
                   help="split for cifar10/imagenet (default %(default)s)")
    p.add_argument("--preload", action="store_true",
                   help="decode every image once into memory before training, for small "
                        "datasets (default off)")
    p.add_argument("--out", dest="checkpoint", required=True, metavar="CKPT",
                   help="checkpoint file, written after every epoch (required)")
    p.add_argument("--resume", action="store_true",
                   help="continue from --out if it exists (default off: an existing --out is "
                        "an error)")


def add_training_execution_flags(p: argparse.ArgumentParser) -> None:
    """The execution flags of a training run: --device, --workers, --threads, --quiet."""
    run_ = p.add_argument_group("execution")
    run_.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                      help="cpu, cuda or cuda:N (default %(default)s here: cuda wherever CUDA "
                           "is available)")
    run_.add_argument("--workers", type=int, default=0,
                      help="data loader processes (default %(default)s: load in this process)")
    run_.add_argument("--threads", type=_positive_int, default=None,
                      help="CPU threads of torch (default: torch's own choice)")
    run_.add_argument("--quiet", action="store_true", help="no progress bar (default off)")
