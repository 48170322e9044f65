"""Checks of configuration fields, each raising the field's :class:`ArgumentError`.

One definition of "an integer >= low", "a finite number in [low, high]", "one of these
choices", "True or False" and "a checkpoint path a run may write", for training
(:class:`ancer.train.TrainConfig`, the methods of :mod:`ancer.training_methods`,
:class:`ancer.denoise_train.DenoiseConfig` and the functions that train).
Every error names its field (``owner.field`` for Python, a flag for a command line: see
:meth:`ArgumentError.spelled`), says what the value is not, and what to give instead.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

from ancer.errors import ArgumentError


def check_int(owner: str, field: str, value: Any, low: int) -> int:
    """``value`` is an int (not a bool) >= ``low``, else ``owner.field``'s ArgumentError."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ArgumentError.of_field(owner, field, f"{value!r} is not an integer >= {low}",
                                     f"give an integer >= {low}")
    return value


def check_number(owner: str, field: str, value: Any, low: float, high: float = math.inf,
                 strict: bool = False) -> float:
    """``value`` is a finite real (not a bool) in [low, high] ((low, high] when ``strict``),
    else ``owner.field``'s ArgumentError."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = (value > low if strict else value >= low) and value <= high
    if not ok:
        bound = f"> {low:g}" if strict else f">= {low:g}"
        bound += f" and <= {high:g}" if math.isfinite(high) else ""
        raise ArgumentError.of_field(owner, field, f"{value!r} is not a finite number {bound}",
                                     f"give a number {bound}")
    return value


def check_choice(owner: str, field: str, value: Any, choices: Sequence[Any]) -> Any:
    """``value`` is one of ``choices``, else ``owner.field``'s ArgumentError."""
    if value not in choices:
        raise ArgumentError.of_field(owner, field, f"{value!r} is not a choice",
                                     f"give one of {', '.join(map(str, choices))}")
    return value


def check_bool(owner: str, field: str, value: Any) -> bool:
    """``value`` is True or False, else ``owner.field``'s ArgumentError."""
    if not isinstance(value, bool):
        raise ArgumentError.of_field(owner, field, f"{value!r} is not True or False",
                                     f"give {{{field}:True}} or {{{field}:False}}")
    return value


def check_checkpoint_path(checkpoint: Path, resume: bool) -> None:
    """A training run may write ``checkpoint``: its folder exists, and it does not exist
    unless the run resumes it (so that no finished run is overwritten by mistake);
    else the ArgumentError of argument ``checkpoint``."""
    if checkpoint.exists() and not resume:
        raise ArgumentError.of_field(
            "", "checkpoint", f"{str(checkpoint)!r} exists",
            "add {resume:True} to continue that run, or give another {checkpoint}PATH")
    if not checkpoint.parent.is_dir():
        raise ArgumentError.of_field(
            "", "checkpoint", f"the folder {str(checkpoint.parent)!r} does not exist",
            "create it, or give another {checkpoint}PATH")


def not_resumable(owner: str, field: str, path: Path, now: str, was: str,
                  same: str) -> ArgumentError:
    """The error of resuming the checkpoint ``path``, trained with ``owner.field`` ``was``,
    at ``now``; ``same`` (a fix, in which ``{name}`` is field ``name`` given) resumes it."""
    return ArgumentError.of_field(
        owner, field, f"{now}, but the checkpoint {str(path)!r} to resume was trained with {was}",
        f"give {same} to resume it, or another {{checkpoint}}PATH to start afresh")
