"""Certified-accuracy curves and summary statistics of results files, side by side.

Certified accuracy at radius r is that of Cohen et al. 2019, §4 (see docs/design.md,
References; locuslab/smoothing `analyze.py`): the fraction of inputs that
the smoothed classifier classifies correctly with a certified radius of at least r,
``(df["correct"] & (df["radius"] >= radius)).mean()``. For anisotropic runs (ANCER,
Eiras et al. 2022) the certified radius is the proxy radius, that of the largest l_p ball
inside the certified region. Their volume radius ((Π a_i)^(1/d), the radius of the ball of
equal volume) is reported as the share of correct inputs whose volume radius is at least r:
not a certified accuracy, since a region of volume radius r need not contain any ball of
radius r. Radii of l1 and l2 runs are not comparable: the plot draws one panel per norm.
"""

from __future__ import annotations

import csv
import io
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Sequence, Union

import numpy as np

from ancer.errors import AncerError, ArgumentError, ResultsError
from ancer.labels import ABSTAIN
from ancer.results import ResultsTable, base_name, read_sidecar

if TYPE_CHECKING:  # matplotlib is optional: imported only to plot
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

DEFAULT_RADII = "0:2:0.25"
MAX_RADII = 10_000
CURVE_COLUMNS = ("radius", "proxy_radius", "volume_radius")
_CURVE_LABELS = {"radius": "certified accuracy @ r = {r:g}",
                 "proxy_radius": "certified accuracy (proxy radius) @ r = {r:g}",
                 "volume_radius": "share correct with volume radius >= {r:g} "
                                  "(not a certified accuracy)"}
_CURVE_KEYS = {"radius": "certified_accuracy", "proxy_radius": "proxy_certified_accuracy",
               "volume_radius": "volume_radius_share"}
#: the norm of files without a norm column: Cohen et al.'s, whose certificates are l2 balls
DEFAULT_NORM = "l2"
#: the settings whose values the plot's legend and warnings compare, as the TSV names them
COMPARED_SETTINGS = ("sigma", "n", "alpha")
#: how far past the largest certified radius of its runs a panel's x axis reaches
X_MARGIN = 1.05
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
    ``norm`` is the norm of the radii (:func:`run_norm`); ``forward_passes`` the base
    classifier's forward passes spent on all rows, selection and estimation (None unless
    every row recorded them).
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
    norm: str = DEFAULT_NORM
    forward_passes: int | None = None


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
        norm=run_norm(table),
        forward_passes=forward_passes(table),
    )


def run_norm(table: ResultsTable) -> str:
    """The norm of a run's radii: its rows' ``norm`` (l2 for Cohen et al.'s files, which lack
    the column); ResultsError when the rows mix norms."""
    norms = sorted(set(table.columns.get("norm", [DEFAULT_NORM]))) or [DEFAULT_NORM]
    if len(norms) > 1:
        raise ResultsError(f"{table.path} mixes {' and '.join(norms)} rows, whose radii are not "
                           "comparable: report each norm's rows from a file of their own")
    return str(norms[0])


def forward_passes(table: ResultsTable) -> int | None:
    """The forward passes of the base classifier spent on all rows (the ``samples`` column);
    None when the file has no such column or some row did not record it (-1)."""
    samples = table.columns.get("samples")
    if samples is None or len(samples) == 0 or (samples < 0).any():
        return None
    return int(samples.sum())


def run_settings(table: ResultsTable) -> dict[str, str]:
    """σ, n and alpha of a run as text, for those of the columns the file has (Cohen et
    al.'s files have none); ``low-high`` when its rows differ. A sequential run's n is its
    budget (its rows hold the draws each input made), read from its settings."""
    settings = {}
    sidecar = read_sidecar(table.path) if table.path.exists() else None
    recorded = sidecar.settings if sidecar is not None else {}
    for name in COMPARED_SETTINGS:
        column = table.columns.get(name)
        if name == "n" and recorded.get("sequential") and "n" in recorded:
            settings[name] = f"{int(recorded['n'])}"
        elif column is not None and len(column):
            low, high = (_number_text(v) for v in (column.min(), column.max()))
            settings[name] = low if low == high else f"{low}-{high}"
    return settings


def _number_text(value: np.generic) -> str:
    """An int as written, a float in its shortest general form (0.25, 0.001)."""
    return str(int(value)) if np.issubdtype(type(value), np.integer) else f"{float(value):g}"


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


#: a report's value: a number, text (the norm), or None when not available
ReportValue = Union[float, str, None]
#: a report's rows: (key, radius or None, label, one value per run)
ReportRows = list[tuple[str, Optional[float], str, list[ReportValue]]]


def report_rows(summaries: Sequence[Summary], radii: Sequence[float]) -> ReportRows:
    """The report as rows (key, radius or None, label, one value per run; None: not available).

    Proxy- and volume-radius rows are listed when some run is anisotropic, forward passes
    when some run recorded them.
    """
    rows: ReportRows = [("norm", None, "norm of the radii", [s.norm for s in summaries])]
    columns = ["radius"]
    if any(s.anisotropic for s in summaries):
        columns += ["proxy_radius", "volume_radius"]
    for column in columns:
        for i, r in enumerate(radii):
            values = [float(s.curves[column][i]) if column in s.curves else None for s in summaries]
            rows.append((_CURVE_KEYS[column], r, _CURVE_LABELS[column].format(r=r), values))
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
    return rows + _forward_pass_rows(summaries) + _memory_rows(summaries)


def _forward_pass_rows(summaries: Sequence[Summary]) -> ReportRows:
    """The forward passes in all and per input, when some run recorded them (a sequential
    run stops early per input; a fixed-n one spends n0 + n on each)."""
    passes = [s.forward_passes for s in summaries]
    if all(p is None for p in passes):
        return []
    return [("forward_passes", None, "forward passes (selection + estimation), total", passes),
            ("forward_passes_per_input", None, "forward passes per input (mean)",
             [None if p is None else p / s.rows for p, s in zip(passes, summaries)])]


def _memory_rows(summaries: Sequence[Summary]) -> ReportRows:
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
                             *(_csv_text(v) for v in values)])
        return out.getvalue()
    if fmt != "md":
        raise ArgumentError(f"--format {fmt!r}: choose md or csv")
    lines = ["| | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for key, _, label, values in rows:
        lines.append(f"| {label} | " + " | ".join(_shown(key, v) for v in values) + " |")
    return "\n".join(lines) + "\n"


def _csv_text(value: ReportValue) -> str:
    """A value of the CSV: numbers at full precision (repr), text as it is, empty when not
    available."""
    return "" if value is None else value if isinstance(value, str) else repr(value)


def _shown(key: str, value: ReportValue) -> str:
    """A value of the Markdown table: counts as integers, the mean forward passes per input
    to 0.1, text as it is, other numbers to 4 decimals; ``—`` when not available."""
    if value is None:
        return "—"
    if isinstance(value, str):
        return value
    if key in ("rows", "forward_passes") or key.startswith("memory_"):
        return f"{int(value)}"
    return f"{value:.1f}" if key == "forward_passes_per_input" else f"{value:.4f}"


def plot_curves(runs: Sequence[tuple[str, ResultsTable]], path: str | os.PathLike) -> Figure:
    """Save a plot of certified accuracy against radius to ``path`` and return its Figure.

    One panel per norm, in the order the runs bring them (the radii of l1 and l2 runs are
    not comparable), one colour per run. Each panel's x axis runs from 0 to a little past
    the largest certified radius of its runs (where their last curve reaches 0); each
    legend entry gives the run's name, n and abstain rate. The image type follows the file's
    extension (.png, or any other matplotlib writes); missing folders are created.
    """
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise AncerError("--plot needs matplotlib, which is not installed: "
                         "pip install matplotlib (or pip install ancer[plot])") from None
    path = Path(path)
    panels = _panels(runs)
    figure = Figure(figsize=(5.5 * len(panels), 4), dpi=120)
    kind = path.suffix.lower().lstrip(".")
    if kind not in figure.canvas.get_supported_filetypes():
        raise ArgumentError(f"--plot {str(path)!r}: unknown image type {path.suffix!r}; "
                            "name the file with .png")
    for axes, (norm, members) in zip(figure.subplots(1, len(panels), squeeze=False)[0],
                                     panels.items()):
        _draw_panel(axes, norm, members)
    figure.tight_layout()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(path, format=kind)
    except OSError as error:
        raise ArgumentError(f"--plot {str(path)!r}: cannot write it in {str(path.parent)!r} "
                            f"({error.strerror or error}); choose a folder you can write") from None
    return figure


def setting_warnings(runs: Sequence[tuple[str, ResultsTable]]) -> list[str]:
    """One line for each setting (sigma, n, alpha) in which the runs on one panel of the plot
    differ, naming each run's value; runs whose file lacks the column are left out."""
    lines = []
    for norm, members in _panels(runs).items():
        recorded = [(name, run_settings(table)) for _, name, table in members]
        for setting in COMPARED_SETTINGS:
            values = [(name, settings[setting]) for name, settings in recorded
                      if setting in settings]
            if len({value for _, value in values}) > 1:
                listed = ", ".join(f"{name} {value}" for name, value in values)
                lines.append(f"runs on the {norm} panel differ in {setting} ({listed}): "
                             "their curves are not like for like")
    return lines


def legend_label(name: str, table: ResultsTable) -> str:
    """A run's legend entry: its name, n (``n unknown`` in Cohen et al.'s files) and abstain
    rate; anisotropic runs add that their radius is the proxy radius."""
    n = run_settings(table).get("n")
    abstain = float(np.mean(table.columns["predict"] == ABSTAIN))
    proxy = ", proxy radius" if table.anisotropic else ""
    bounds = table.columns.get("bound")
    sequential = " sequential" if bounds is not None and (bounds == "group-sequential").any() else ""
    size = "n unknown" if n is None else f"n={n}{sequential}"
    return f"{name} ({size}, abstain {abstain:.0%}{proxy})"


def _panels(runs: Sequence[tuple[str, ResultsTable]]
            ) -> dict[str, list[tuple[int, str, ResultsTable]]]:
    """The runs of each norm as (number on the command line, name, table), by norm in the
    order the runs bring them."""
    panels: dict[str, list[tuple[int, str, ResultsTable]]] = {}
    for number, (name, table) in enumerate(runs):
        panels.setdefault(run_norm(table), []).append((number, name, table))
    return panels


def _draw_panel(axes: Axes, norm: str, members: Sequence[tuple[int, str, ResultsTable]]) -> None:
    """Draw the certified-accuracy curves of one norm's runs, x from 0 to a little past their
    largest certified radius (to 1 when none certified anything)."""
    largest = max(_largest_certified_radius(table) for _, _, table in members)
    right = largest * X_MARGIN if largest > 0 else 1.0
    grid = np.linspace(0.0, right, 401)
    for number, name, table in members:
        axes.plot(grid, certified_accuracy(table, grid), color=f"C{number % 10}",
                  label=legend_label(name, table))
    axes.set_title(f"{norm} certificates")
    axes.set_xlabel(f"{norm} radius")
    axes.set_ylabel("certified accuracy")
    axes.set_xlim(0.0, right)
    axes.set_ylim(0.0, 1.0)
    axes.grid(alpha=0.3)
    axes.legend(fontsize="small")


def _largest_certified_radius(table: ResultsTable) -> float:
    """The largest radius certified for a correctly classified input (0.0 when none)."""
    radii = table.columns["radius"][table.columns["correct"] == 1]
    return float(radii.max()) if len(radii) else 0.0
