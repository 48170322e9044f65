"""The progress bar of a certification job, counted in forward passes (noise samples).

One bar whose unit is a sample: the rate and the ETA are known from the first forward batch,
not only after a whole group of inputs. Its total is every remaining input's n0 + n draws;
an input that stops early (sequential certification) gives back its unused draws when its
row is written, so the ETA is an upper bound that only improves. The postfix shows the
inputs written, the running certified accuracy and the abstain rate. Quiet with ``--quiet``
or when stderr is not a terminal.
"""

from __future__ import annotations

import sys
import time
from typing import Callable, Optional

from tqdm import tqdm

from certify.results import ABSTAIN, Row

#: an estimated run time (seconds) from which the progress bar says what would shorten it
LONG_RUN_SECONDS = 600.0
#: seconds of sampling before the estimate is trusted
MEASURE_SECONDS = 3.0


class Progress:
    """A tqdm bar over the samples of ``total`` inputs (``done`` of them certified before this
    run), ``per_input`` = n0 + n samples each."""

    def __init__(self, total: int, done: int, per_input: int, description: str, quiet: bool,
                 position: int = 0, hint: str = "", say: Callable[[str], None] = print) -> None:
        self._per_input = per_input
        self._hint, self._say = hint, say
        self._quiet = quiet
        self._bar = tqdm(total=(total - done) * per_input, desc=description, unit="sample",
                         unit_scale=True, position=position, dynamic_ncols=True,
                         disable=quiet or not sys.stderr.isatty())
        self._total_inputs, self._done_inputs = total, done
        self._rows = self._certified = self._abstained = 0
        self._hinted = False
        self._since: Optional[tuple[float, int]] = None
        self._postfix()

    def advance(self, samples: int) -> None:
        """Count ``samples`` forward passes just made (the engine's progress callback)."""
        self._bar.update(samples)
        if self._since is None:  # the first batch holds warm-up and compiling: not the pace
            self._since = (time.monotonic(), self._bar.n)
        self._hint_if_long()

    def update(self, row: Row) -> None:
        """Count one written row; an input that used fewer than n0 + n samples gives the rest
        back to the bar's total."""
        self._rows += 1
        self._done_inputs += 1
        self._certified += row.correct
        self._abstained += row.predict == ABSTAIN
        if row.samples >= 0 and row.samples < self._per_input:
            self._bar.total = max(self._bar.n, self._bar.total - (self._per_input - row.samples))
        self._postfix()

    def _hint_if_long(self) -> None:
        """Say the hint once, when the run's estimated remaining time passes
        ``LONG_RUN_SECONDS`` (estimated from at least a few seconds of sampling)."""
        if self._hinted or self._quiet or not self._hint:
            return
        started, first = self._since
        elapsed, made = time.monotonic() - started, self._bar.n - first
        if made <= 0 or elapsed < MEASURE_SECONDS:
            return
        remaining = (self._bar.total - self._bar.n) * elapsed / made
        if remaining > LONG_RUN_SECONDS:
            self._hinted = True
            text = f"this run needs up to {_duration(remaining)} more; {self._hint}"
            if self._bar.disable:
                self._say(text)
            else:
                self._bar.write(text, file=sys.stderr)

    def _postfix(self) -> None:
        postfix = {"inputs": f"{self._done_inputs}/{self._total_inputs}"}
        if self._rows:
            postfix["cert_acc"] = f"{self._certified / self._rows:.3f}"
            postfix["abstain"] = f"{self._abstained / self._rows:.3f}"
        self._bar.set_postfix(postfix, refresh=False)

    def close(self) -> None:
        self._bar.close()


def _duration(seconds: float) -> str:
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 60:.0f} min"
