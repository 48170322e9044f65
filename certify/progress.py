"""The progress of a certification job, counted in forward passes (noise samples).

The unit is a sample: the rate and the ETA are known from the first forward batch, not only
after a whole group of inputs. The total is every remaining input's n0 + n draws; an input
that stops early (sequential certification) gives back its unused draws when its row is
written, so the ETA is an upper bound that only improves. On a terminal, one tqdm bar whose
postfix shows the inputs written, the running certified accuracy and the abstain rate. When
stderr is not a terminal (nohup, a batch job, ``2>log``), a plain line every
``every`` seconds instead, with the same numbers, the rate and the ETA. Nothing with
``--quiet``. A run whose estimate passes ``LONG_RUN_SECONDS`` says once what would shorten it.
"""

from __future__ import annotations

import sys
import time
from typing import Callable, Optional

from tqdm import tqdm

from ancer.results import ABSTAIN, Row

#: an estimated run time (seconds) from which the progress says what would shorten it
LONG_RUN_SECONDS = 600.0
#: seconds of sampling before the estimate is trusted
MEASURE_SECONDS = 3.0


class Progress:
    """The progress over the samples of ``total`` inputs (``done`` of them certified before
    this run), ``per_input`` = n0 + n samples each; ``every``: seconds between plain lines
    when stderr is not a terminal, said through ``say``."""

    def __init__(self, total: int, done: int, per_input: int, description: str, quiet: bool,
                 position: int = 0, hint: str = "", say: Callable[[str], None] = print,
                 every: float = 60.0) -> None:
        self._per_input, self._description = per_input, description
        self._hint, self._say, self._every = hint, say, every
        self._quiet = quiet
        self._made, self._total = 0, (total - done) * per_input
        self._bar = tqdm(total=self._total, desc=description, unit="sample", unit_scale=True,
                         position=position, dynamic_ncols=True,
                         disable=quiet or not sys.stderr.isatty())
        self._plain = not quiet and self._bar.disable
        self._total_inputs, self._done_inputs = total, done
        self._rows = self._certified = self._abstained = 0
        self._hinted = False
        self._since: Optional[tuple[float, int]] = None
        self._last_line = time.monotonic()
        self._postfix()

    def advance(self, samples: int) -> None:
        """Count ``samples`` forward passes just made (the engine's progress callback)."""
        self._made += samples
        self._bar.update(samples)
        if self._since is None:  # the first batch holds warm-up and compiling: not the pace
            self._since = (time.monotonic(), self._made)
        self._hint_if_long()
        self._line_if_due()

    def update(self, row: Row) -> None:
        """Count one written row; an input that used fewer than n0 + n samples gives the rest
        back to the total."""
        self._rows += 1
        self._done_inputs += 1
        self._certified += row.correct
        self._abstained += row.predict == ABSTAIN
        if 0 <= row.samples < self._per_input:
            self._total = max(self._made, self._total - (self._per_input - row.samples))
            self._bar.total = self._total
        self._postfix()

    def _remaining_seconds(self) -> Optional[float]:
        """The time the remaining samples take at the pace since the first batch (None
        before ``MEASURE_SECONDS`` of it)."""
        if self._since is None:
            return None
        started, first = self._since
        elapsed, made = time.monotonic() - started, self._made - first
        if made <= 0 or elapsed < MEASURE_SECONDS:
            return None
        return (self._total - self._made) * elapsed / made

    def _hint_if_long(self) -> None:
        """Say the hint once, when the run's estimated remaining time passes
        ``LONG_RUN_SECONDS``."""
        if self._hinted or self._quiet or not self._hint:
            return
        remaining = self._remaining_seconds()
        if remaining is not None and remaining > LONG_RUN_SECONDS:
            self._hinted = True
            text = f"this run needs up to {_duration(remaining)} more; {self._hint}"
            if self._bar.disable:
                self._say(text)
            else:
                self._bar.write(text, file=sys.stderr)

    def _line_if_due(self) -> None:
        """Without a bar, a plain progress line every ``every`` seconds."""
        now = time.monotonic()
        if not self._plain or now - self._last_line < self._every:
            return
        self._last_line = now
        self._say(self.line())

    def line(self) -> str:
        """The progress in one plain line: inputs and samples done, rate, ETA, certified
        accuracy and abstain rate so far."""
        parts = [f"{self._description}: {self._done_inputs}/{self._total_inputs} inputs",
                 f"{_count(self._made)}/{_count(self._total)} samples"]
        if self._since is not None:
            started, first = self._since
            elapsed = time.monotonic() - started
            if elapsed > 0 and self._made > first:
                parts.append(f"{_count((self._made - first) / elapsed)} samples/s")
        remaining = self._remaining_seconds()
        if remaining is not None:
            parts.append(f"ETA {_duration(remaining)}")
        if self._rows:
            parts.append(f"certified {self._certified / self._rows:.3f}, "
                         f"abstain {self._abstained / self._rows:.3f}")
        return ", ".join(parts)

    def _postfix(self) -> None:
        postfix = {"inputs": f"{self._done_inputs}/{self._total_inputs}"}
        if self._rows:
            postfix["cert_acc"] = f"{self._certified / self._rows:.3f}"
            postfix["abstain"] = f"{self._abstained / self._rows:.3f}"
        self._bar.set_postfix(postfix, refresh=False)

    def close(self) -> None:
        """Close the bar; without one, say where the run stopped in a last plain line."""
        self._bar.close()
        if self._plain and self._made:
            self._say(self.line())


def _count(number: float) -> str:
    """A count in 3 significant digits with k/M/G."""
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if number >= size:
            return f"{number / size:.3g}{unit}"
    return f"{number:.3g}"


def _duration(seconds: float) -> str:
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    if seconds < 60:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min"
