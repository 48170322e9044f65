"""`certify report`: certified-accuracy curves and statistics against hand computations,
Cohen et al.'s published numbers, the plot, and the command line's one-line errors."""

import csv
import io
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ancer.errors import ArgumentError
from certify.cli import main
from certify.report import (certified_accuracy, format_report, parse_radii, run_names,
                            summarize)
from certify.results import COLUMNS, read_results

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


def write_hand_tsv(path: Path, method: str = "ancer") -> Path:
    lines = ["\t".join(COLUMNS)]
    for idx, label, predict, radius, volume, log_volume in HAND_ROWS:
        lines.append("\t".join(map(str, [
            idx, label, predict, radius, int(predict == label), 2.5, "l2", method, 0.25, "nan",
            0.9, radius, volume, log_volume, 100, 1000, 0.001, 900, f"{predict}:900", "fp32"])))
    path.write_text("\n".join(lines) + "\n")
    return path


def write_cohen_tsv(path: Path) -> Path:
    path.write_text("idx\tlabel\tpredict\tradius\tcorrect\ttime\n"
                    "0\t3\t3\t0.378\t1\t15.4\n20\t7\t-1\t0.0\t0\t15.6\n"
                    "40\t4\t4\t0.5\t1\t0:00:15.700000\n60\t7\t2\t0.941\t0\t15.8\n")
    return path


def shared_data_dir() -> Path:
    return Path(os.environ.get("ANCER_SHARED_DATA", ROOT.parent / "shared" / "data"))


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
    # Cohen's file: correct rows idx 0 (0.378), 40 (0.5) of four.
    assert rows["certified accuracy @ r = 0"] == ["0.6667", "0.5000 |"]
    assert rows["certified accuracy @ r = 0.5"] == ["0.3333", "0.2500 |"]
    assert rows["certified accuracy (volume radius) @ r = 0.5"] == ["0.5000", "— |"]
    assert rows["abstain rate"] == ["0.1667", "0.2500 |"]
    assert rows["average certified radius (ACR)"] == [f"{HAND_ACR:.4f}", f"{0.878 / 4:.4f} |"]
    assert rows["mean log-volume (certified, correct)"] == ["-15.5000", "— |"]
    assert rows["inputs"] == ["6", "4 |"]


def test_csv_full_precision(tmp_path, capsys):
    ancer = write_hand_tsv(tmp_path / "ancer.tsv")
    code, out, _ = run_cli(capsys, "report", str(ancer), "--radii", "0,0.5,1", "--format", "csv")
    assert code == 0
    rows = list(csv.reader(io.StringIO(out)))
    assert rows[0] == ["quantity", "radius", "ancer"]
    values = {(key, r): float(v) if v else None for key, r, v in rows[1:]}
    assert values[("certified_accuracy", "0.5")] == 2 / 6
    assert values[("volume_certified_accuracy", "0.5")] == 3 / 6
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


def test_plot_is_a_png(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    Image = pytest.importorskip("PIL.Image")
    png = tmp_path / "curves.png"
    code, _, err = run_cli(capsys, "report", str(write_hand_tsv(tmp_path / "ancer.tsv")),
                           str(write_cohen_tsv(tmp_path / "cohen.tsv")), "--plot", str(png))
    assert code == 0 and err == ""
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(png) as image:
        assert image.format == "PNG" and image.width >= 300 and image.height >= 200
        assert len(image.convert("RGB").getcolors(maxcolors=1 << 16) or range(1 << 16)) > 20


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
    (["report", "{dir}/good.tsv", "--plot", "{dir}/no/c.png"], "does not exist"),
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


def test_cohen_published_curve():
    """Cohen et al. 2019, CIFAR-10 ResNet-110 at sigma = 0.25: 0.75 / 0.60 / 0.43 / 0.27."""
    path = (shared_data_dir() / "reference-results" / "cohen2019"
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
