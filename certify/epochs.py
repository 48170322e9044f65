"""The progress of a training run (``certify train``, ``certify train-denoiser``): a tqdm bar
per epoch on stderr, and a line per finished epoch on stdout."""
from __future__ import annotations

import sys
from typing import Any, Callable, Dict, Optional


def epoch_bar(quiet: bool, postfix: Callable[[Any], Dict[str, str]],
              summary: Callable[[Any], str]) -> Optional[Callable[[Any], None]]:
    """A training callback: for each step's progress ``p`` (with ``step``, ``steps``,
    ``epoch`` and ``epochs``), the epoch's bar shows ``postfix(p)``, and the epoch's last
    step prints ``epoch E/EPOCHS: summary(p)``; None when ``quiet``."""
    if quiet:
        return None
    from tqdm import tqdm

    bar = None

    def update(p: Any) -> None:
        nonlocal bar
        if p.step == 1:
            bar = tqdm(total=p.steps, desc=f"epoch {p.epoch}/{p.epochs}", file=sys.stderr,
                       dynamic_ncols=True, mininterval=5.0)
        bar.update(1)
        bar.set_postfix(postfix(p), refresh=False)
        if p.step == p.steps:
            bar.close()
            print(f"epoch {p.epoch}/{p.epochs}: {summary(p)}", flush=True)

    return update
