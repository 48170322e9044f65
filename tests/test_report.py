"""`certify report`: certified-accuracy curves and statistics against hand computations,
Cohen et al.'s published numbers, the plot (read back through matplotlib), and the command
line's one-line errors."""

import csv
import io
import subprocess
import sys
from pathlib import Path
from typing import List, Optional

import pytest

from ancer.errors import ArgumentError, ResultsError
from certify.cli import main
from certify.report import (certified_accuracy, format_report, parse_radii, plot_curves,
                            run_names, setting_warnings, summarize)
from ancer.results import COLUMNS, read_results

ROOT = Path(__file__).resolve().parents[1]

# An anisotropic run (ANCER: radius is the proxy radius) of six inputs, by hand.
#  idx  label predict radius correct proxy volume log_volume
#   0     3     3     0.5     1      0.5   0.9    -10
#   1     1     1     0.25    1      0.25  0.6    -20
#   2     2     5     0.75    0      0.75  1.2     -5    (wrong class)
#   3     4    -1     0.0     0      0.0   0.0    -inf   (abstain)
#   4     0     0     1.0     1      1.0   1.5     -2
#   5     7     7     0.1     1      0.1   0.2    -30
HAND_ROWS = [(0, 3, 3, 0.5, 0.9, -10.0), (1, 1, 1, 0.25, 0.6, -20.0), (2, 2, 5, 0.75, 1.2, -5.0),
             (3, 4, -1, 0.0, 0.0, float("-inf")), (4, 0, 0, 1.0, 1.5, -2.0),
             (5, 7, 7, 0.1, 0.2, -30.0)]
# At r = 0, 0.5, 1: radius: correct rows 0,1,4,5 -> 4/6; radius >= .5: rows 0,4 -> 2/6;
# radius >= 1: row 4 -> 1/6.
# Volume radius >= .5: rows 0,1,4 -> 3/6; >= 1: row 4 -> 1/6.
HAND_RADIUS_CURVE = [4 / 6, 2 / 6, 1 / 6]
HAND_VOLUME_CURVE = [4 / 6, 3 / 6, 1 / 6]
HAND_ACR = (0.5 + 0.25 + 1.0 + 0.1) / 6
HAND_LOG_VOLUME = (-10 - 20 - 2 - 30) / 4


def write_hand_tsv(path: Path, method: str = "ancer", norm: str = "l2", sigma: float = 0.25,
                   n: int = 1000, samples: Optional[List[int]] = None) -> Path:
    """The hand run; ``samples``: one forward-pass count per row (column left out if None)."""
    lines = ["\t".join(COLUMNS if samples else COLUMNS[:-3])]
    for number, (idx, label, predict, radius, volume, log_volume) in enumerate(HAND_ROWS):
        fields = [idx, label, predict, radius, int(predict == label), 2.5, norm, method, sigma,
                  "nan", 0.9, radius, volume, log_volume, 100, n, 0.001, 900, f"{predict}:900",
                  "fp32"]
        lines.append("\t".join(map(str, fields + (["-", -1, samples[number]] if samples else []))))
    path.write_text("\n".join(lines) + "\n")
    return path


def write_cohen_tsv(path: Path) -> Path:
    path.write_text("idx\tlabel\tpredict\tradius\tcorrect\ttime\n"
                    "0\t3\t3\t0.378\t1\t15.4\n20\t7\t-1\t0.0\t0\t15.6\n"
                    "40\t4\t4\t0.5\t1\t0:00:15.700000\n60\t7\t2\t0.941\t0\t15.8\n")
    return path


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize("spec, radii", [
    ("0:2:0.25", [0, 0.25, 0.5, 0.75, 1, 1.25, 1.5, 1.75, 2]),
    ("0:1:0.3", [0, 0.3, 0.6, 0.9]),
    ("0:0.3:0.1", [0, 0.1, 0.2, 0.3]),
    ("0.5:0.5:1", [0.5]),
    ("1,0.5,0,0.5", [0, 0.5, 1]),
    ("0.25", [0.25]),
])
def test_parse_radii(spec, radii):
    assert parse_radii(spec) == radii


@pytest.mark.parametrize("spec, problem", [
    ("0:2", "start:stop:step"), ("a:b:c", "start:stop:step"), ("", "start:stop:step"),
    ("0:2:0", "step > 0"), ("2:0:0.5", "stop >= start"), ("0:1e9:1e-3", "more than"),
    ("-1,0", ">= 0"), ("0,nan", "finite"), ("0:inf:1", "finite"), ("-1:1:1", ">= 0"),
])
def test_parse_radii_rejects(spec, problem):
    with pytest.raises(ArgumentError, match=problem):
        parse_radii(spec)


def test_summary_equals_hand_computation(tmp_path):
    table = read_results(write_hand_tsv(tmp_path / "ancer.tsv"))
    summary = summarize(table, [0, 0.5, 1], "ancer")
    assert summary.anisotropic and summary.rows == 6
    assert summary.curves["radius"].tolist() == pytest.approx(HAND_RADIUS_CURVE)
    assert summary.curves["proxy_radius"].tolist() == pytest.approx(HAND_RADIUS_CURVE)
    assert summary.curves["volume_radius"].tolist() == pytest.approx(HAND_VOLUME_CURVE)
    assert summary.clean_accuracy == pytest.approx(4 / 6)
    assert summary.abstain_rate == pytest.approx(1 / 6)
    assert summary.acr == pytest.approx(HAND_ACR)
    assert summary.mean_log_volume == pytest.approx(HAND_LOG_VOLUME)


def test_radius_just_below_r_is_not_certified_at_r(tmp_path):
    path = tmp_path / "r.tsv"
    path.write_text("idx\tlabel\tpredict\tradius\tcorrect\ttime\n0\t1\t1\t0.4996\t1\t1.0\n")
    assert certified_accuracy(read_results(path), [0.4996, 0.5]).tolist() == [1.0, 0.0]


def test_markdown_side_by_side(tmp_path, capsys):
    ancer = write_hand_tsv(tmp_path / "ancer.tsv")
    cohen = write_cohen_tsv(tmp_path / "noise_0.25")
    code, out, err = run_cli(capsys, "report", str(ancer), str(cohen), "--radii", "0:1:0.5")
    assert code == 0 and err == ""
    lines = out.splitlines()
    assert lines[0] == "| | ancer | noise_0.25 |"
    rows = {line.split(" | ")[0].lstrip("| "): line.split(" | ")[1:] for line in lines[2:]}
    assert rows["norm of the radii"] == ["l2", "l2 |"]
    # Cohen's file: correct rows idx 0 (0.378), 40 (0.5) of four.
    assert rows["certified accuracy @ r = 0"] == ["0.6667", "0.5000 |"]
    assert rows["certified accuracy @ r = 0.5"] == ["0.3333", "0.2500 |"]
    assert rows["share correct with volume radius >= 0.5 (not a certified accuracy)"] == [
        "0.5000", "— |"]
    assert not any("certified accuracy (volume" in label for label in rows)
    assert rows["abstain rate"] == ["0.1667", "0.2500 |"]
    assert rows["average certified radius (ACR)"] == [f"{HAND_ACR:.4f}", f"{0.878 / 4:.4f} |"]
    assert rows["mean log-volume (certified, correct)"] == ["-15.5000", "— |"]
    assert rows["inputs"] == ["6", "4 |"]
    assert not any("forward passes" in label for label in rows)  # neither file records them


def test_csv_full_precision(tmp_path, capsys):
    ancer = write_hand_tsv(tmp_path / "ancer.tsv")
    code, out, _ = run_cli(capsys, "report", str(ancer), "--radii", "0,0.5,1", "--format", "csv")
    assert code == 0
    rows = list(csv.reader(io.StringIO(out)))
    assert rows[0] == ["quantity", "radius", "ancer"]
    assert rows[1] == ["norm", "", "l2"]
    values = {(key, r): float(v) if v else None for key, r, v in rows[2:]}
    assert values[("certified_accuracy", "0.5")] == 2 / 6
    assert values[("volume_radius_share", "0.5")] == 3 / 6
    assert values[("acr", "")] == pytest.approx(HAND_ACR, abs=1e-15)
    assert values[("mean_log_volume", "")] == HAND_LOG_VOLUME
    assert values[("rows", "")] == 6


def test_isotropic_runs_list_only_the_radius_curve(tmp_path):
    table = read_results(write_hand_tsv(tmp_path / "iso.tsv", method="isotropic"))
    text = format_report([summarize(table, [0.0], "iso")], [0.0])
    assert "proxy" not in text and "volume radius" not in text


def test_run_names_are_stems_unless_they_clash():
    assert run_names(["a/results.tsv", "b/noise_0.25"]) == ["results", "noise_0.25"]
    assert run_names(["a/results.tsv", "b/results.tsv"]) == ["a/results", "b/results"]


def test_forward_passes_total_and_per_input(tmp_path, capsys):
    """A sequential run (stops early per input) beside a fixed-n one (n0 + n = 1100 each)."""
    sequential = write_hand_tsv(tmp_path / "seq.tsv", samples=[300, 1100, 200, 1100, 150, 250])
    fixed = write_hand_tsv(tmp_path / "fixed.tsv", samples=[1100] * 6)
    unknown = write_hand_tsv(tmp_path / "unknown.tsv", samples=[1100, -1] + [1100] * 4)
    code, out, err = run_cli(capsys, "report", str(sequential), str(fixed), str(unknown),
                             str(write_cohen_tsv(tmp_path / "cohen")), "--radii", "0")
    assert code == 0 and err == ""
    rows = {line.split(" | ")[0].lstrip("| "): line.split(" | ")[1:] for line in out.splitlines()}
    total = rows["forward passes (selection + estimation), total"]
    assert total == ["3100", "6600", "—", "— |"]
    assert rows["forward passes per input (mean)"] == [f"{3100 / 6:.1f}", "1100.0", "—", "— |"]


def _hand_runs(tmp_path, **variants) -> list:
    """(name, table) of the hand run written once per keyword (its write_hand_tsv options)."""
    return [(name, read_results(write_hand_tsv(tmp_path / f"{name}.tsv", **options)))
            for name, options in variants.items()]


def test_plot_has_one_panel_per_norm_with_named_axes_fitted_limits_and_legends(tmp_path):
    pytest.importorskip("matplotlib")
    runs = _hand_runs(tmp_path, a2=dict(method="isotropic"), a1=dict(norm="l1"),
                      b2=dict(method="isotropic", n=100000))
    runs.append(("cohen", read_results(write_cohen_tsv(tmp_path / "cohen"))))
    figure = plot_curves(runs, tmp_path / "curves.png")
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    l2, l1 = figure.axes
    assert [l2.get_xlabel(), l1.get_xlabel()] == ["l2 radius", "l1 radius"]
    assert l2.get_ylabel() == l1.get_ylabel() == "certified accuracy"
    # Largest radius of a correct input: 1.0 (hand run), 0.5 (Cohen's): a little past it.
    assert 1.0 < l2.get_xlim()[1] <= 1.1 and 1.0 < l1.get_xlim()[1] <= 1.1
    assert l2.get_xlim()[0] == 0.0 and l2.get_ylim() == (0.0, 1.0)
    assert [t.get_text() for t in l2.get_legend().get_texts()] == [
        "a2 (σ=0.25, n=1000, abstain 17%)", "b2 (σ=0.25, n=100000, abstain 17%)",
        "cohen (n unknown, abstain 25%)"]
    assert [t.get_text() for t in l1.get_legend().get_texts()] == [
        "a1 (σ=0.25, n=1000, abstain 17%, proxy radius)"]


def test_plot_x_axis_fits_the_data_not_the_radii(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    path = tmp_path / "cohen"
    path.write_text("idx\tlabel\tpredict\tradius\tcorrect\ttime\n0\t3\t3\t0.2\t1\t1.0\n"
                    "1\t3\t4\t0.9\t0\t1.0\n")
    figure = plot_curves([("cohen", read_results(path))], tmp_path / "c.png")
    (axes,) = figure.axes
    assert 0.2 < axes.get_xlim()[1] <= 0.22  # the correct input's radius, not the wrong one's
    curve = axes.get_lines()[0]
    assert curve.get_ydata()[0] == 0.5 and curve.get_ydata()[-1] == 0.0


def test_plot_warns_when_runs_on_one_panel_differ_in_sigma_n_or_alpha(tmp_path):
    runs = _hand_runs(tmp_path, a=dict(sigma=0.25), b=dict(sigma=0.5, n=100),
                      c=dict(sigma=0.5, norm="l1"))
    assert setting_warnings(runs) == [
        "runs on the l2 panel differ in sigma (a 0.25, b 0.5): their curves are not like for like",
        "runs on the l2 panel differ in n (a 1000, b 100): their curves are not like for like"]
    cohen = ("cohen", read_results(write_cohen_tsv(tmp_path / "cohen")))
    assert setting_warnings([runs[0], cohen]) == []  # Cohen's files record none of them


def test_plot_is_written_into_a_new_folder_and_warnings_go_to_stderr(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    png = tmp_path / "new" / "folder" / "curves.png"
    a = write_hand_tsv(tmp_path / "a.tsv")
    b = write_hand_tsv(tmp_path / "b.tsv", sigma=0.5)
    code, out, err = run_cli(capsys, "report", str(a), str(b), "--plot", str(png))
    assert code == 0 and out.startswith("| | a | b |")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert err.splitlines() == ["certify: warning: runs on the l2 panel differ in sigma "
                                "(a 0.25, b 0.5): their curves are not like for like"]


def test_a_file_mixing_norms_is_refused(tmp_path):
    path = write_hand_tsv(tmp_path / "mixed.tsv")
    lines = path.read_text().splitlines()
    lines[2] = lines[2].replace("\tl2\t", "\tl1\t")
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ResultsError, match="mixes l1 and l2 rows"):
        summarize(read_results(path), [0.0], "mixed")


def test_plot_without_matplotlib_says_how_to_install(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    code, out, err = run_cli(capsys, "report", str(write_hand_tsv(tmp_path / "a.tsv")),
                             "--plot", str(tmp_path / "c.png"))
    assert code != 0 and out == ""
    assert err.count("\n") == 1 and "pip install matplotlib" in err and "ancer[plot]" in err


# {dir}: a folder holding good.tsv (the hand run), empty.tsv (header only), other.tsv (no
# results file). The certification run's flags are checked in test_cli_run.py.
BAD_ARGUMENTS = [
    (["report"], "required: RESULTS.tsv"),
    (["report", "{dir}/missing.tsv"], "no such results file"),
    (["report", "{dir}"], "is a directory"),
    (["report", "{dir}/other.tsv"], "not a results file"),
    (["report", "{dir}/empty.tsv"], "no rows yet"),
    (["report", "{dir}/good.tsv", "--radii", "0:2"], "start:stop:step"),
    (["report", "{dir}/good.tsv", "--radii", "0:2:-1"], "step > 0"),
    (["report", "{dir}/good.tsv", "--format", "xml"], "invalid choice: 'xml'"),
    (["report", "{dir}/good.tsv", "--plot", "{dir}/good.tsv/c.png"], "cannot write it"),
    (["report", "{dir}/good.tsv", "--plot", "{dir}/c.xyz"], "unknown image type"),
    (["report", "{dir}/good.tsv", "--bogus"], "unrecognized arguments: --bogus"),
]


@pytest.mark.parametrize("argv, problem", BAD_ARGUMENTS)
def test_each_bad_argument_gives_one_line(tmp_path, capsys, argv, problem):
    write_hand_tsv(tmp_path / "good.tsv")
    (tmp_path / "empty.tsv").write_text("\t".join(COLUMNS) + "\n")
    (tmp_path / "other.tsv").write_text("name\tscore\nx\t1\n")
    code, out, err = run_cli(capsys, *(arg.replace("{dir}", str(tmp_path)) for arg in argv))
    assert code != 0 and out == ""
    assert err.count("\n") == 1 and err.startswith("certify: error: "), err
    assert problem in err, err


def test_help_exits_zero(capsys):
    for argv in (["--help"], ["report", "--help"]):
        code, out, _ = run_cli(capsys, *argv)
        assert code == 0 and "usage: certify" in out
    assert "certify report" in run_cli(capsys, "--help")[1]


def test_python_dash_m_certify_report(tmp_path):
    """The real command: one line on stderr, exit status 2, no traceback."""
    ancer = write_hand_tsv(tmp_path / "ancer.tsv")
    command = [sys.executable, "-m", "certify", "report", str(ancer), "--radii", "1:0:1"]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.splitlines() == ["certify: error: --radii '1:0:1': need step > 0 and "
                                        "stop >= start, e.g. 0:2:0.25"]


def test_cohen_published_curve(shared_data):
    """Cohen et al. 2019, CIFAR-10 ResNet-110 at sigma = 0.25: 0.75 / 0.60 / 0.43 / 0.27."""
    path = (shared_data / "reference-results" / "cohen2019"
            / "cifar10_resnet110_noise_0.25_test_sigma_0.25.tsv")
    if not path.exists():
        pytest.skip(f"shared data absent: {path}")
    summary = summarize(read_results(path), parse_radii("0:0.75:0.25"), "cohen")
    assert summary.rows == 500
    assert summary.curves["radius"].tolist() == pytest.approx([0.748, 0.600, 0.428, 0.266])
    assert [round(v, 2) for v in summary.curves["radius"]] == [0.75, 0.60, 0.43, 0.27]


def test_noisy_accuracy_is_the_share_of_all_draws_that_voted_for_the_label(tmp_path):
    # Two rows of n = 1000 and 500 draws whose true labels got 900 and 100 votes.
    lines = ["\t".join(COLUMNS)]
    for idx, n, votes in [(0, 1000, 900), (1, 500, 100)]:
        lines.append("\t".join(map(str, [
            idx, 1, 1, 0.5, 1, 2.5, "l2", "isotropic", 0.25, "nan", 0.9, 0.5, 0.5, -10.0,
            100, n, 0.001, votes, f"1:{votes}", "fp32", "-", votes])))
    path = tmp_path / "noisy.tsv"
    path.write_text("\n".join(lines) + "\n")
    summary = summarize(read_results(path), [0.0], "noisy")
    assert summary.noisy_accuracy == pytest.approx((900 + 100) / 1500)
    # Files that do not record the votes for the label (Cohen's, older ones) report none.
    assert summarize(read_results(write_hand_tsv(tmp_path / "hand.tsv")), [0.0], "h").noisy_accuracy is None
