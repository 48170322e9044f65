"""Checks of configuration fields, each raising the field's :class:`ArgumentError`.

One definition of "an integer >= low", "a finite number in [low, high]", "one of these
choices", "True or False" and "a checkpoint path a run may write", for certification
(:class:`ancer.engine.CertifyConfig`) and training (:class:`ancer.train.TrainConfig`, the
methods of :mod:`ancer.training_methods`, :class:`ancer.denoise_train.DenoiseConfig` and the
functions that train).
Every error names its field (``owner.field`` for Python, a flag for a command line: see
:meth:`ArgumentError.spelled`), says what the value is not, and what to give instead.
"""
from __future__ import annotations

import math
import numbers
from pathlib import Path
from typing import Any, Sequence

from ancer.errors import ArgumentError


def _example(field: str, example: str) -> str:
    """The tail of a fix that shows a good value of ``field`` (none when ``example`` is "")."""
    return f", e.g. {{{field}}}{example}" if example else ""


def check_int(owner: str, field: str, value: Any, low: int, example: str = "") -> int:
    """``value`` is an integer >= ``low`` (an int, a numpy integer or an integral real such as
    ``1e5``; not a bool), returned as an int, else ``owner.field``'s ArgumentError, whose fix
    shows ``example`` when given."""
    integral = (isinstance(value, numbers.Real) and not isinstance(value, bool)
                and math.isfinite(value) and value == int(value))
    if not integral or value < low:
        raise ArgumentError.of_field(owner, field, f"{value!r} is not an integer >= {low}",
                                     f"give an integer >= {low}" + _example(field, example))
    return int(value)


def check_number(owner: str, field: str, value: Any, low: float, high: float = math.inf,
                 strict: bool = False, example: str = "") -> float:
    """``value`` is a finite real (not a bool) in [low, high] ((low, high] when ``strict``),
    returned as a float, else ``owner.field``'s ArgumentError, whose fix shows ``example``
    when given."""
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = (value > low if strict else value >= low) and value <= high
    if not ok:
        bound = f"> {low:g}" if strict else f">= {low:g}"
        bound += f" and <= {high:g}" if math.isfinite(high) else ""
        raise ArgumentError.of_field(owner, field, f"{value!r} is not a finite number {bound}",
                                     f"give a number {bound}" + _example(field, example))
    return float(value)


def set_int(config: Any, field: str, low: int, example: str = "") -> None:
    """Check ``config.field`` with :func:`check_int` (owner: the config's class) and store it
    back as an int; ``config`` may be a frozen dataclass, checking itself on creation."""
    value = check_int(type(config).__name__, field, getattr(config, field), low, example)
    object.__setattr__(config, field, value)


def set_number(config: Any, field: str, low: float, high: float = math.inf,
               strict: bool = False, example: str = "") -> None:
    """Check ``config.field`` with :func:`check_number` (owner: the config's class) and store
    it back as a float; ``config`` may be a frozen dataclass, checking itself on creation."""
    value = check_number(type(config).__name__, field, getattr(config, field), low, high, strict,
                         example)
    object.__setattr__(config, field, value)


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
