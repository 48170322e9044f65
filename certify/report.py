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

The report is a Markdown table, a CSV, or a LaTeX ``tabular`` (booktabs rules) as papers
print it: certified accuracy at the chosen radii and the ACR, one column per run, the best
value of each row in bold, as Cohen et al.'s ``analyze.py`` marks it. A sequential run's
radii are the grid radii it passed, so its ACR has a row of its own.
"""

from __future__ import annotations

import csv
import io
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Optional, Sequence, Union

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
#: the rows of the report's curves: the certified radius (for anisotropic runs the proxy
#: radius, which their ``radius`` column holds; a separate proxy row would repeat it) and,
#: for anisotropic runs only, the volume radius (an isotropic run's equals its radius)
_CURVE_LABELS = {"radius": "certified accuracy @ r = {r:g}",
                 "volume_radius": "share correct with volume radius >= {r:g} "
                                  "(not a certified accuracy)"}
_CURVE_KEYS = {"radius": "certified_accuracy", "volume_radius": "volume_radius_share"}
#: the report's formats (``--format``)
FORMATS = ("md", "csv", "latex")
#: the ``bound`` column's value in the rows of a sequential run
SEQUENTIAL_BOUND = "group-sequential"
#: the norm of files without a norm column: Cohen et al.'s, whose certificates are l2 balls
DEFAULT_NORM = "l2"
#: the settings whose values the plot's legend and warnings compare, as the TSV names them
COMPARED_SETTINGS = ("sigma", "n", "alpha")
#: how far past the largest certified radius of its runs a panel's x axis reaches
X_MARGIN = 1.05
#: where a panel's legend starts, in axes coordinates: below the x axis and its label
LEGEND_BELOW = -0.16
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
    every row recorded them); ``sigma`` the run's σ as text (:func:`run_settings`; None
    in files without the column); ``sequential`` whether its radii are grid radii
    (:func:`is_sequential`), which makes its ACR another quantity than a fixed-n run's.
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
    sigma: str | None = None
    sequential: bool = False


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
        sigma=run_settings(table).get("sigma"),
        sequential=is_sequential(table),
    )


def is_sequential(table: ResultsTable) -> bool:
    """Whether a run certified sequentially: its radii are then the grid radii each input
    passed, not σ Φ⁻¹(p_A), so its ACR is not comparable with a fixed-n run's."""
    bounds = table.columns.get("bound")
    return bounds is not None and bool((bounds == SEQUENTIAL_BOUND).any())


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

    Volume-radius rows are listed when some run is anisotropic (with values for those runs
    only), σ when some file records it, forward passes when some run recorded them. The ACR
    of sequential runs has a row of its own (:func:`acr_rows`).
    """
    rows: ReportRows = [("norm", None, "norm of the radii", [s.norm for s in summaries])]
    if any(s.sigma is not None for s in summaries):
        rows.append(("sigma", None, "noise σ", [s.sigma for s in summaries]))
    rows += curve_rows(summaries, radii, "radius")
    if any(s.anisotropic for s in summaries):
        rows += curve_rows(summaries, radii, "volume_radius")
    rows += [
        ("clean_accuracy", None, "smoothed classifier's accuracy (abstain = wrong)",
         [s.clean_accuracy for s in summaries]),
        ("abstain_rate", None, "abstain rate", [s.abstain_rate for s in summaries]),
        ("noisy_accuracy", None, "base classifier's accuracy under noise",
         [s.noisy_accuracy for s in summaries]),
        *acr_rows(summaries),
        ("mean_log_volume", None, "mean log-volume (certified, correct)",
         [s.mean_log_volume for s in summaries]),
        ("rows", None, "inputs", [s.rows for s in summaries]),
    ]
    return rows + _forward_pass_rows(summaries) + _memory_rows(summaries)


def curve_rows(summaries: Sequence[Summary], radii: Sequence[float], column: str) -> ReportRows:
    """One row per radius of a curve; the volume-radius curve has values for anisotropic
    runs only."""
    rows: ReportRows = []
    for i, r in enumerate(radii):
        values = [float(s.curves[column][i])
                  if column in s.curves and (column == "radius" or s.anisotropic) else None
                  for s in summaries]
        rows.append((_CURVE_KEYS[column], r, _CURVE_LABELS[column].format(r=r), values))
    return rows


def acr_rows(summaries: Sequence[Summary]) -> ReportRows:
    """The average certified radius: one row for fixed-n runs, and one for sequential runs,
    whose radii are the grid radii they passed (rounded down to the grid, so their ACR is
    smaller than a fixed-n run's of the same inputs and is not compared with it)."""
    rows: ReportRows = []
    if not all(s.sequential for s in summaries):
        rows.append(("acr", None, "average certified radius (ACR)",
                     [None if s.sequential else s.acr for s in summaries]))
    if any(s.sequential for s in summaries):
        rows.append(("acr_grid", None, "ACR of grid radii (sequential runs: radii rounded down "
                     "to the grid, not comparable with a fixed-n ACR)",
                     [s.acr if s.sequential else None for s in summaries]))
    return rows


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


def format_report(summaries: Sequence[Summary], radii: Sequence[float], fmt: str = "md",
                  title: str | None = None) -> str:
    """The report as a Markdown table (``md``, 4 decimals), CSV (``csv``, full precision) or
    LaTeX (``latex``, :func:`latex_table`): one row per statistic, one column per run.
    ``title`` heads the Markdown table and captions the LaTeX one (the CSV has none)."""
    rows = report_rows(summaries, radii)
    names = [s.name for s in summaries]
    if fmt == "latex":
        return latex_table(summaries, rows, title)
    if fmt == "csv":
        return csv_lines([["quantity", "radius", *names]]) + format_csv_rows(rows)
    if fmt != "md":
        raise ArgumentError(f"--format {fmt!r}: choose one of {', '.join(FORMATS)}")
    lines = [f"**{title}**", ""] if title else []
    lines += ["| | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for key, _, label, values in rows:
        lines.append(f"| {label} | " + " | ".join(_shown(key, v) for v in values) + " |")
    return "\n".join(lines) + "\n"


def format_csv_rows(rows: ReportRows) -> str:
    """Report rows as CSV lines (no header): key, radius, one value per run."""
    return csv_lines([key, "" if r is None else repr(r), *(_csv_text(v) for v in values)]
                     for key, r, _, values in rows)


def csv_lines(rows: Iterable[Sequence[str]]) -> str:
    """Rows of text as CSV lines."""
    out = io.StringIO()
    csv.writer(out, lineterminator="\n").writerows(rows)
    return out.getvalue()


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


#: LaTeX's special characters, and the Greek letters and signs the report's text may hold,
#: as a LaTeX table writes them
_TEX_TEXT = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#",
             "_": r"\_", "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}",
             "^": r"\textasciicircum{}", "σ": r"$\sigma$", "α": r"$\alpha$", "λ": r"$\lambda$",
             "ε": r"$\varepsilon$", "θ": r"$\theta$", "κ": r"$\kappa$", "≥": r"$\geq$",
             "≤": r"$\leq$", "—": "---", "–": "--"}
#: what a LaTeX cell shows for a value that is not available
TEX_MISSING = "--"
#: the preamble a LaTeX table of the report needs
TEX_PACKAGES = r"\usepackage{booktabs}"


def tex_escape(text: str) -> str:
    """``text`` as LaTeX typesets it literally: specials escaped, Greek letters in math."""
    return "".join(_TEX_TEXT.get(ch, ch) for ch in text)


def _tex_norm(norm: str) -> str:
    return rf"$\ell_{norm[1:]}$" if norm in ("l1", "l2") else tex_escape(norm)


def _tex_row(cells: Sequence[str]) -> str:
    return " & ".join(cells) + r" \\"


def _tex_numbers(values: Sequence[ReportValue], digits: int, bold: bool) -> list[str]:
    """Numbers to ``digits`` decimals, the largest in bold when ``bold`` and two or more are
    given (Cohen et al.'s ``analyze.py`` marks the best run at each radius so)."""
    shown = [None if v is None else f"{float(v):.{digits}f}" for v in values]
    present = [float(t) for t in shown if t is not None]
    bold = bold and len(present) > 1
    best = max(present, default=None)
    return [TEX_MISSING if t is None else rf"\textbf{{{t}}}" if bold and float(t) == best else t
            for t in shown]


def latex_table(summaries: Sequence[Summary], rows: ReportRows, title: str | None = None) -> str:
    """The report as papers print it: a ``tabular`` with booktabs rules (preamble:
    ``\\usepackage{booktabs}``), one column per run, rows σ, certified accuracy at each
    radius (2 decimals) and ACR (3 decimals), the best run of each row in bold when the runs
    share a norm and are more than one; in a ``table`` with a caption when ``title`` is
    given."""
    norms = list(dict.fromkeys(s.norm for s in summaries))
    bold = len(summaries) > 1 and len(norms) == 1
    by_key = {}
    for key, r, _, values in rows:
        by_key.setdefault(key, []).append((r, values))
    body = [_tex_row(["", *(tex_escape(s.name) for s in summaries)]), r"\midrule"]
    if len(norms) > 1:
        body.append(_tex_row(["norm", *(_tex_norm(s.norm) for s in summaries)]))
    if "sigma" in by_key:
        body.append(_tex_row([r"$\sigma$", *(TEX_MISSING if v is None else tex_escape(str(v))
                                             for v in by_key["sigma"][0][1])]))
    radius = _tex_norm(norms[0]) + " radius" if len(norms) == 1 else "radius"
    body += [r"\midrule", _tex_row([f"certified accuracy at {radius}", *[""] * len(summaries)])]
    body += [_tex_row([f"$r = {r:g}$", *_tex_numbers(values, 2, bold)])
             for r, values in by_key["certified_accuracy"]]
    body.append(r"\midrule")
    labels = {"acr": "ACR", "acr_grid": "ACR, grid radii (sequential)"}
    body += [_tex_row([label, *_tex_numbers(by_key[key][0][1], 3, bold)])
             for key, label in labels.items() if key in by_key]
    lines = [f"% certify report: certified accuracy and average certified radius (ACR); "
             f"needs {TEX_PACKAGES}",
             rf"\begin{{tabular}}{{l{'r' * len(summaries)}}}", r"\toprule", *body,
             r"\bottomrule", r"\end{tabular}"]
    if title:
        lines[1:1] = [r"\begin{table}", r"\centering", rf"\caption{{{tex_escape(title)}}}"]
        lines.append(r"\end{table}")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- per class


@dataclass(frozen=True)
class ClassCurve:
    """One class of a run: its label, name (None when the run does not record names), the
    number of its inputs and their certified accuracy at each radius."""

    label: int
    name: str | None
    inputs: int
    curve: np.ndarray


def per_class(table: ResultsTable, radii: Sequence[float]) -> list[ClassCurve]:
    """Certified accuracy at each radius among the inputs of each true label (Cohen et al.'s
    statistic restricted to one class), by label."""
    labels = table.columns["label"]
    correct = table.columns["correct"] == 1
    radius = table.columns["radius"]
    names = class_names_of(table)
    curves = []
    for label in sorted({int(v) for v in labels}):
        mine = labels == label
        curve = np.array([np.mean((correct & (radius >= r))[mine]) for r in radii])
        name = names[label] if names is not None and 0 <= label < len(names) else None
        curves.append(ClassCurve(label, name, int(mine.sum()), curve))
    return curves


def class_names_of(table: ResultsTable) -> list[str] | None:
    """The class names a run recorded (a class-folder dataset's), else None."""
    sidecar = read_sidecar(table.path) if table.path.exists() else None
    classes = None if sidecar is None else sidecar.settings.get("classes")
    return list(classes) if isinstance(classes, list) else None


def per_class_rows(runs: Sequence[tuple[str, ResultsTable]], radii: Sequence[float]) -> ReportRows:
    """Per-class certified accuracy as report rows (key ``certified_accuracy_class_<label>``,
    one column per run, None where a run has no input of the class), for the CSV."""
    by_run = [{c.label: c for c in per_class(table, radii)} for _, table in runs]
    rows: ReportRows = []
    for label in sorted(set().union(*by_run)):
        for i, r in enumerate(radii):
            values = [float(c[label].curve[i]) if label in c else None for c in by_run]
            rows.append((f"certified_accuracy_class_{label}", r,
                         f"class {label}: certified accuracy @ r = {r:g}", values))
    return rows


def format_per_class(name: str, table: ResultsTable, radii: Sequence[float],
                     fmt: str = "md") -> str:
    """One run's per-class certified accuracy as a table: a row per class (label, name when
    recorded, inputs), a column per radius; Markdown (4 decimals) or LaTeX (2 decimals)."""
    curves = per_class(table, radii)
    def title(c: ClassCurve) -> str:
        return f"{c.label}" + (f" ({c.name})" if c.name else "")
    if fmt == "latex":
        lines = [f"% certify report --per-class: {tex_escape(name)}; needs {TEX_PACKAGES}",
                 rf"\begin{{tabular}}{{lr{'r' * len(radii)}}}", r"\toprule",
                 _tex_row(["class", "inputs", *(f"$r = {r:g}$" for r in radii)]), r"\midrule"]
        lines += [_tex_row([tex_escape(title(c)), str(c.inputs), *_tex_numbers(c.curve, 2, False)])
                  for c in curves]
        return "\n".join([*lines, r"\bottomrule", r"\end{tabular}"]) + "\n"
    lines = [f"**{name}: certified accuracy per class**", "",
             "| class | inputs | " + " | ".join(f"r = {r:g}" for r in radii) + " |",
             "|---|---:|" + "---:|" * len(radii)]
    lines += [f"| {title(c)} | {c.inputs} | " + " | ".join(f"{v:.4f}" for v in c.curve) + " |"
              for c in curves]
    return "\n".join(lines) + "\n"


def plot_curves(runs: Sequence[tuple[str, ResultsTable]], path: str | os.PathLike,
                title: str | None = None) -> Figure:
    """Save a plot of certified accuracy against radius to ``path`` and return its Figure.

    One panel per norm, in the order the runs bring them (the radii of l1 and l2 runs are
    not comparable), one colour per run. Each panel's x axis runs from 0 to a little past
    the largest certified radius of its runs (where their last curve reaches 0); each
    legend entry gives the run's name (its ``--label``), σ, n and abstain rate, and the
    legend sits below the panel, where it cannot cover a curve. ``title`` heads the figure.
    The image type follows the file's extension (.png, or any other matplotlib writes);
    missing folders are created.
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
    if title:
        figure.suptitle(title)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # the legends below the panels are part of the image: the saved area grows to hold them
        figure.savefig(path, format=kind, bbox_inches="tight")
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
    """A run's legend entry: its name, σ (when recorded), n (``n unknown`` in Cohen et al.'s
    files) and abstain rate; anisotropic runs add that their radius is the proxy radius."""
    settings = run_settings(table)
    n = settings.get("n")
    sigma = f"σ={settings['sigma']}, " if "sigma" in settings else ""
    abstain = float(np.mean(table.columns["predict"] == ABSTAIN))
    proxy = ", proxy radius" if table.anisotropic else ""
    sequential = " sequential" if is_sequential(table) else ""
    size = "n unknown" if n is None else f"n={n}{sequential}"
    return f"{name} ({sigma}{size}, abstain {abstain:.0%}{proxy})"


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
    axes.legend(fontsize="small", loc="upper center", bbox_to_anchor=(0.5, LEGEND_BELOW),
                frameon=False)


def _largest_certified_radius(table: ResultsTable) -> float:
    """The largest radius certified for a correctly classified input (0.0 when none)."""
    radii = table.columns["radius"][table.columns["correct"] == 1]
    return float(radii.max()) if len(radii) else 0.0
