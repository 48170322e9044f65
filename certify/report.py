"""Certified-accuracy curves and summary statistics of results files, side by side.

Certified accuracy at radius r is Cohen et al.'s (2019, "Certified adversarial robustness
via randomized smoothing", locuslab/smoothing `analyze.py`): the fraction of inputs that
the smoothed classifier classifies correctly with a certified radius of at least r,
``(df["correct"] & (df["radius"] >= radius)).mean()``. For anisotropic runs (ANCER,
Alfarra et al. 2022) the same curve is also drawn against the proxy radius (largest l_p
ball inside the certified region) and the volume radius ((Π a_i)^(1/d)).
"""

from __future__ import annotations

import csv
import io
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from ancer.errors import AncerError, ArgumentError, ResultsError
from certify.results import ABSTAIN, ResultsTable, base_name

DEFAULT_RADII = "0:2:0.25"
MAX_RADII = 10_000
CURVE_COLUMNS = ("radius", "proxy_radius", "volume_radius")
_CURVE_LABELS = {"radius": "certified accuracy",
                 "proxy_radius": "certified accuracy (proxy radius)",
                 "volume_radius": "certified accuracy (volume radius)"}
_CURVE_KEYS = {"radius": "certified_accuracy", "proxy_radius": "proxy_certified_accuracy",
               "volume_radius": "volume_certified_accuracy"}
#: the memory column's answers (its text before any ``:``), as the report counts them
MEMORY_ANSWERS = {"kept": "kept", "shrunk": "shrunk", "override": "overridden",
                  "abstain": "abstained", "raw": "raw (shard rows, not yet merged)"}
_RADII_HELP = "expected start:stop:step (e.g. 0:2:0.25) or a comma-separated list (e.g. 0,0.5,1)"


def parse_radii(spec: str) -> list[float]:
    """The radii of a spec: ``start:stop:step`` (stop included when a step lands on it)
    or a comma-separated list; sorted, each >= 0."""
    try:
        parts = [float(part) for part in spec.split(":" if ":" in spec else ",")]
    except ValueError:
        raise ArgumentError(f"--radii {spec!r}: {_RADII_HELP}") from None
    if not all(math.isfinite(p) for p in parts):
        raise ArgumentError(f"--radii {spec!r}: radii must be finite numbers")
    if ":" not in spec:
        radii = sorted(set(parts))
    elif len(parts) != 3:
        raise ArgumentError(f"--radii {spec!r}: {_RADII_HELP}")
    else:
        start, stop, step = parts
        if not step > 0 or not stop >= start:
            raise ArgumentError(f"--radii {spec!r}: need step > 0 and stop >= start, e.g. 0:2:0.25")
        count = math.floor((stop - start) / step + 1e-9) + 1
        if count > MAX_RADII:
            raise ArgumentError(f"--radii {spec!r} gives {count} radii, more than {MAX_RADII}: "
                                "use a larger step")
        # Rounded so that sums of steps equal the radii a user typed (0.1 * 3 is not 0.3).
        radii = [round(start + i * step, 12) for i in range(count)]
    if radii[0] < 0:
        raise ArgumentError(f"--radii {spec!r}: radii must be >= 0")
    return radii


def certified_accuracy(table: ResultsTable, radii: Sequence[float],
                       column: str = "radius") -> np.ndarray:
    """Fraction of rows with correct == 1 and ``column`` >= r, for each r in ``radii``
    (Cohen et al. 2019)."""
    correct = table.columns["correct"] == 1
    radius = table.columns[column]
    return np.array([np.mean(correct & (radius >= r)) for r in radii], dtype=np.float64)


@dataclass(frozen=True)
class Summary:
    """One run's report.

    ``curves`` maps each radius column the file has (radius, proxy_radius, volume_radius)
    to its certified accuracy at each requested radius. ``clean_accuracy`` is the smoothed
    classifier's accuracy (predict == label); ``acr`` the average certified radius, mean of
    radius·correct; ``mean_log_volume`` the mean log-volume of the certified regions of
    correctly classified inputs (None when the file has no log-volume or no such input).
    ``memory`` counts the memory column's answers of a data-dependent run (None for other
    runs and files without the column). ``noisy_accuracy`` is the base classifier's accuracy
    under the smoothing noise, Σ count_label / Σ n over the rows (None when not recorded).
    """

    name: str
    rows: int
    anisotropic: bool
    curves: dict[str, np.ndarray]
    clean_accuracy: float
    noisy_accuracy: float | None
    abstain_rate: float
    acr: float
    mean_log_volume: float | None
    memory: dict[str, int] | None = None


def memory_counts(table: ResultsTable) -> dict[str, int] | None:
    """How many rows the memory kept, shrunk, overrode, made abstain, or left raw; None when
    the file has no memory column or its run has no memory (all ``-``)."""
    column = table.columns.get("memory")
    answers = [] if column is None else [text.split(":", 1)[0] for text in column if text != "-"]
    if not answers:
        return None
    return {answer: answers.count(answer) for answer in MEMORY_ANSWERS}


def summarize(table: ResultsTable, radii: Sequence[float], name: str) -> Summary:
    """The report of one results table at ``radii``; ResultsError if it has no rows."""
    if len(table) == 0:
        raise ResultsError(f"{table.path} holds no rows yet: nothing to report; "
                           "wait for the run to write some")
    columns = table.columns
    correct = columns["correct"] == 1
    log_volume = columns.get("log_volume")
    return Summary(
        name=name,
        rows=len(table),
        anisotropic=table.anisotropic,
        curves={c: certified_accuracy(table, radii, c) for c in CURVE_COLUMNS if c in columns},
        clean_accuracy=float(np.mean(columns["predict"] == columns["label"])),
        noisy_accuracy=noisy_accuracy(table),
        abstain_rate=float(np.mean(columns["predict"] == ABSTAIN)),
        acr=float(np.mean(columns["radius"] * correct)),
        mean_log_volume=(float(np.mean(log_volume[correct]))
                         if log_volume is not None and correct.any() else None),
        memory=memory_counts(table),
    )


def noisy_accuracy(table: ResultsTable) -> float | None:
    """The base classifier's accuracy under noise: the fraction of all n draws that voted for
    the true label; None unless every row recorded ``count_label``."""
    votes = table.columns.get("count_label")
    if votes is None or (votes < 0).any():
        return None
    return float(votes.sum() / table.columns["n"].sum())


def run_names(paths: Sequence[str | os.PathLike]) -> list[str]:
    """Column names of runs: the file name without ``.tsv``, or the path when two clash."""
    stems = [base_name(p).name for p in paths]
    return [stem if stems.count(stem) == 1 else str(base_name(p)) for stem, p in zip(stems, paths)]


def report_rows(summaries: Sequence[Summary],
                radii: Sequence[float]) -> list[tuple[str, float | None, str, list[float | None]]]:
    """The report as rows (key, radius or None, label, one value per run; None: not available).

    Proxy- and volume-radius curves are listed when some run is anisotropic.
    """
    columns = ["radius"]
    if any(s.anisotropic for s in summaries):
        columns += ["proxy_radius", "volume_radius"]
    rows = []
    for column in columns:
        for i, r in enumerate(radii):
            values = [float(s.curves[column][i]) if column in s.curves else None for s in summaries]
            rows.append((_CURVE_KEYS[column], r, f"{_CURVE_LABELS[column]} @ r = {r:g}", values))
    rows += [
        ("clean_accuracy", None, "smoothed classifier's accuracy (abstain = wrong)",
         [s.clean_accuracy for s in summaries]),
        ("abstain_rate", None, "abstain rate", [s.abstain_rate for s in summaries]),
        ("noisy_accuracy", None, "base classifier's accuracy under noise",
         [s.noisy_accuracy for s in summaries]),
        ("acr", None, "average certified radius (ACR)", [s.acr for s in summaries]),
        ("mean_log_volume", None, "mean log-volume (certified, correct)",
         [s.mean_log_volume for s in summaries]),
        ("rows", None, "inputs", [s.rows for s in summaries]),
    ]
    return rows + _memory_rows(summaries)


def _memory_rows(summaries: Sequence[Summary]) -> list[tuple[str, None, str, list[float | None]]]:
    """The memory's counts, when some run has a memory; raw rows only when some file has
    them."""
    counted = [s.memory for s in summaries]
    if not any(counted):
        return []
    answers = [a for a in MEMORY_ANSWERS if a != "raw" or any(c and c["raw"] for c in counted)]
    return [(f"memory_{answer}", None, f"memory: {MEMORY_ANSWERS[answer]}",
             [None if c is None else c[answer] for c in counted]) for answer in answers]


def format_report(summaries: Sequence[Summary], radii: Sequence[float], fmt: str = "md") -> str:
    """The report as a Markdown table (``md``, 4 decimals) or CSV (``csv``, full precision):
    one row per statistic, one column per run."""
    rows = report_rows(summaries, radii)
    names = [s.name for s in summaries]
    if fmt == "csv":
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(["quantity", "radius", *names])
        for key, r, _, values in rows:
            writer.writerow([key, "" if r is None else repr(r),
                             *("" if v is None else repr(v) for v in values)])
        return out.getvalue()
    if fmt != "md":
        raise ArgumentError(f"--format {fmt!r}: choose md or csv")
    lines = ["| | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for key, _, label, values in rows:
        counts = key == "rows" or key.startswith("memory_")
        shown = ["—" if v is None else f"{int(v)}" if counts else f"{v:.4f}" for v in values]
        lines.append(f"| {label} | " + " | ".join(shown) + " |")
    return "\n".join(lines) + "\n"


def plot_curves(runs: Sequence[tuple[str, ResultsTable]], path: str | os.PathLike,
                r_max: float) -> None:
    """Save a plot of certified accuracy against radius, 0 to ``r_max``, one colour per run;
    anisotropic runs add their proxy-radius (dashed) and volume-radius (dotted) curves.

    The image type follows the file's extension (.png, or any other matplotlib writes).
    """
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise AncerError("--plot needs matplotlib, which is not installed: "
                         "pip install matplotlib (or pip install ancer[plot])") from None
    path = Path(path)
    figure = Figure(figsize=(6, 4), dpi=120)
    kind = path.suffix.lower().lstrip(".")
    if kind not in figure.canvas.get_supported_filetypes():
        raise ArgumentError(f"--plot {str(path)!r}: unknown image type {path.suffix!r}; "
                            "name the file with .png")
    if not path.parent.is_dir():
        raise ArgumentError(f"--plot {str(path)!r}: folder {str(path.parent)!r} does not exist; "
                            "create it or choose another path")
    axes = figure.add_subplot()
    grid = np.linspace(0.0, r_max if r_max > 0 else 1.0, 401)
    styles = {"radius": "-", "proxy_radius": "--", "volume_radius": ":"}
    for number, (name, table) in enumerate(runs):
        columns = CURVE_COLUMNS if table.anisotropic else ("radius",)
        for column in columns:
            label = name if column == "radius" else f"{name} ({column.replace('_', ' ')})"
            axes.plot(grid, certified_accuracy(table, grid, column), styles[column],
                      color=f"C{number % 10}", label=label)
    axes.set_xlabel("radius")
    axes.set_ylabel("certified accuracy")
    axes.set_ylim(0.0, 1.0)
    axes.set_xlim(0.0, grid[-1])
    axes.grid(alpha=0.3)
    axes.legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(path, format=kind)
