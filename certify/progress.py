"""The progress bar of a certification job: inputs/s, ETA, running certified accuracy and
abstain rate. Quiet with ``--quiet`` or when stderr is not a terminal."""

from __future__ import annotations

import sys

from tqdm import tqdm

from certify.results import ABSTAIN, Row


class Progress:
    """A tqdm bar over ``total`` inputs of which ``done`` were certified before this run."""

    def __init__(self, total: int, done: int, description: str, quiet: bool,
                 position: int = 0) -> None:
        self._bar = tqdm(total=total, initial=done, desc=description, unit="input",
                         position=position, dynamic_ncols=True,
                         disable=quiet or not sys.stderr.isatty())
        self._rows = self._certified = self._abstained = 0

    def update(self, row: Row) -> None:
        """Count one written row (accuracy and abstain rate are over this run's rows)."""
        self._rows += 1
        self._certified += row.correct
        self._abstained += row.predict == ABSTAIN
        self._bar.set_postfix(cert_acc=f"{self._certified / self._rows:.3f}",
                              abstain=f"{self._abstained / self._rows:.3f}", refresh=False)
        self._bar.update(1)

    def close(self) -> None:
        self._bar.close()
