"""The TSV row of a certified input, and the check of a row certified again on resume."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from ancer.errors import ResultsError
from ancer.smoothing import Certificate
from certify.results import COLUMNS, NO_MEMORY, RAW, Row


def check_recomputed(path: Path, written: Row, row: Row) -> None:
    """``row``, certified again on resume, must equal the ``written`` one that the memory
    did not save, or the memory would go on from a certificate the file does not report."""
    def same(before: Any, now: Any) -> bool:
        both_nan = isinstance(before, float) and isinstance(now, float) and math.isnan(before) and math.isnan(now)
        return before == now or both_nan

    differences = [(name, getattr(written, name), getattr(row, name)) for name in COLUMNS
                   if name not in ("time", "correct") and not same(getattr(written, name), getattr(row, name))]
    if differences:
        name, before, now = differences[0]
        raise ResultsError(
            f"resuming {path}: idx {row.idx} was written before the run stopped but its memory "
            f"answer was not saved, and certifying it again gives another row ({name} "
            f"{before!r} on disk, {now!r} now; nondeterministic GPU kernels?); the memory "
            f"cannot go on from a row it did not answer: delete the rows from idx {row.idx} on "
            f"from {path} and resume"
        )


def memory_text(certificate: Certificate, uses_memory: bool) -> str:
    """The memory column: ``-`` for a method without a memory, ``raw`` for a shard's own
    certificate, else the memory's answer (kept, shrunk:<factor>, override:<idx>, abstain)."""
    if not uses_memory:
        return NO_MEMORY
    return RAW if certificate.memory is None else certificate.memory.summary


def make_row(idx: int, label: int, certificate: Certificate, method: str, elapsed: float,
             uses_memory: bool) -> Row:
    """The TSV row of one input's certificate (the memory's answer, the input's own
    certificate in a shard of a ``uses_memory`` method, ``raw``).

    ``p_lower``, ``count_a``, ``counts_top2`` and ``n`` describe the input's own CERTIFY
    (before any memory): ``count_a`` is the estimation votes of the class selected from the
    n0 draws, the count ``p_lower`` bounds; ``count_label`` the votes for the true label (the
    base classifier's accuracy under noise); ``sigma`` the isotropic σ (dds: the input's;
    ancer: the σ its scales started from); ``samples`` the forward passes spent."""
    counts = certificate.counts
    top_two = np.argsort(-counts, kind="stable")[:2]
    noise = certificate.noise
    sigma = certificate.start_sigma if certificate.start_sigma is not None else float(noise.sigma)
    half_width = noise.half_width_of(sigma)
    return Row(
        idx=int(idx), label=int(label), predict=int(certificate.label),
        radius=float(certificate.radius),
        time=float(elapsed), norm=certificate.norm, method=method, sigma=float(sigma),
        half_width=math.nan if half_width is None else float(half_width),
        p_lower=float(certificate.p_lower), proxy_radius=float(certificate.proxy_radius),
        volume_radius=float(certificate.volume_radius), log_volume=float(certificate.log_volume),
        n0=certificate.n0, n=certificate.n, alpha=certificate.alpha,
        count_a=int(counts[certificate.selected]),
        counts_top2=tuple((int(c), int(counts[c])) for c in top_two),
        precision=certificate.precision, memory=memory_text(certificate, uses_memory), count_label=int(counts[label]),
        samples=int(certificate.samples), bound=certificate.bound,
    )
