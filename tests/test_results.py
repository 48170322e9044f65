"""The results TSV and its sidecar: schema, writing, reading (ours and Cohen et al.'s), resume."""

import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from ancer.errors import ArgumentError, ResultsError
from ancer.results import (COHEN_COLUMNS, COLUMNS, Row, Sidecar, check_compatible, done_indices,
                           parse_time, read_results, read_sidecar, shard_path, sidecar_path,
                           write_sidecar)
from ancer.writer import open_results

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = {"model_sha256": "ab12", "dataset": "cifar10", "norm": "l2", "method": "isotropic",
            "sigma": 0.25, "n0": 100, "n": 1000, "alpha": 0.001, "precision": "fp32",
            "seed": 0, "skip": 1}


def make_row(idx: int, label: int = 3, predict: int = 3, radius: float = 0.5, **fields) -> Row:
    values = dict(time=1.5, norm="l2", method="isotropic", sigma=0.25,
                  half_width=float("nan"), p_lower=0.9, proxy_radius=radius,
                  volume_radius=radius, log_volume=-1234.5, n0=100, n=1000, alpha=0.001,
                  count_a=950, counts_top2=((predict, 950), (1, 30)), precision="fp32")
    values.update(fields)
    return Row(idx=idx, label=label, predict=predict, radius=radius, **values)


def test_columns_start_with_cohen_s():
    assert COLUMNS[:6] == ("idx", "label", "predict", "radius", "correct", "time")
    assert COHEN_COLUMNS == COLUMNS[:6]
    assert len(set(COLUMNS)) == len(COLUMNS)


@pytest.mark.parametrize("text, seconds", [
    ("15.4", 15.4), ("1.0936", 1.0936), ("0:00:01.093600", 1.0936),
    ("1:02:03.5", 3723.5), ("0:00:07", 7.0), ("2 days, 1:00:00", 176400.0),
])
def test_parse_time(text, seconds):
    assert parse_time(text) == pytest.approx(seconds, abs=1e-9)


def test_row_line_is_full_precision_and_one_line():
    line = make_row(0, radius=0.49960000000000004, time=12.25).to_line()
    fields = line.split("\t")
    assert line.endswith("\n") and line.count("\n") == 1
    assert len(fields) == len(COLUMNS)
    assert fields[:6] == ["0", "3", "3", "0.49960000000000004", "1", "12.25"]
    assert dict(zip(COLUMNS, fields))["counts_top2"] == "3:950,1:30"
    assert dict(zip(COLUMNS, fields))["half_width"] == "nan"


def test_row_abstain_and_wrong_class():
    abstain = make_row(1, predict=-1, radius=0.0, log_volume=float("-inf"), counts_top2=())
    assert abstain.correct == 0
    assert abstain.to_line().split("\t")[:5] == ["1", "3", "-1", "0.0", "0"]
    assert make_row(2, label=1, predict=3).correct == 0


@pytest.mark.parametrize("fields, problem", [
    (dict(predict=-1, radius=0.3), "abstention"),
    (dict(radius=-0.1), "radius"),
    (dict(radius=float("nan")), "radius"),
    (dict(method="iso\ttropic"), "tabs"),
])
def test_row_rejects_impossible_values(fields, problem):
    with pytest.raises(ArgumentError, match=problem):
        make_row(0, **fields)


def test_write_then_read_round_trip(tmp_path):
    out = tmp_path / "results.tsv"
    rows = [make_row(0), make_row(20, predict=-1, radius=0.0, log_volume=float("-inf")),
            make_row(40, label=1, radius=1e-17)]
    with open_results(out, SETTINGS, {"torch": "2.13"}) as writer:
        assert writer.done == set()
        for row in rows:
            writer.write(row)
    assert out.read_text().splitlines()[0] == "\t".join(COLUMNS)
    table = read_results(out)
    assert table.header == COLUMNS and len(table) == 3 and table.partial_line is None
    assert table.columns["idx"].tolist() == [0, 20, 40]
    assert table.columns["correct"].tolist() == [1, 0, 0]
    assert table.columns["radius"].tolist() == [0.5, 0.0, 1e-17]
    assert table.columns["log_volume"][1] == -np.inf
    assert table.columns["method"].tolist() == ["isotropic"] * 3
    assert table.columns["counts_top2"][0] == "3:950,1:30"
    assert read_sidecar(out) == Sidecar(SETTINGS, {"torch": "2.13"})
    assert json.loads(sidecar_path(out).read_text())["settings"] == SETTINGS
    assert done_indices(out) == {0, 20, 40}
    with open_results(out, SETTINGS) as writer, pytest.raises(ResultsError, match="idx 20"):
        writer.write(make_row(20))


def test_partial_last_line_is_dropped_and_reported(tmp_path):
    out = tmp_path / "results.tsv"
    with open_results(out, SETTINGS) as writer:
        writer.write(make_row(0))
        writer.write(make_row(1))
    cut = make_row(2).to_line()[:17]
    with open(out, "a") as handle:
        handle.write(cut)
    table = read_results(out)
    assert table.columns["idx"].tolist() == [0, 1]
    assert table.partial_line == cut
    assert done_indices(out) == {0, 1}


def test_a_new_run_creates_the_folder_of_its_results(tmp_path):
    out = tmp_path / "runs" / "r110" / "results.tsv"
    with open_results(out, SETTINGS) as writer:
        writer.write(make_row(0))
    assert read_results(out).columns["idx"].tolist() == [0]
    (tmp_path / "file").write_text("")
    with pytest.raises(ResultsError, match="cannot create the folder"):
        open_results(tmp_path / "file" / "results.tsv", SETTINGS)


def test_resume_truncates_the_partial_line_and_appends(tmp_path):
    out = tmp_path / "results.tsv"
    with open_results(out, SETTINGS) as writer:
        writer.write(make_row(0))
    cut = make_row(1).to_line()[:25]
    with open(out, "a") as handle:
        handle.write(cut)
    with open_results(out, dict(SETTINGS)) as writer:
        assert writer.done == {0} and writer.dropped_line == cut
        writer.write(make_row(1))
    expected = "\t".join(COLUMNS) + "\n" + make_row(0).to_line() + make_row(1).to_line()
    assert out.read_text() == expected


def test_resume_with_other_settings_names_them_and_the_fix(tmp_path):
    out = tmp_path / "results.tsv"
    open_results(out, SETTINGS).close()
    with pytest.raises(ResultsError) as error:
        open_results(out, {**SETTINGS, "sigma": 0.5, "n": 10_000})
    message = str(error.value)
    assert "sigma: 0.25 on disk, 0.5 now" in message and "n: 1000 on disk, 10000 now" in message
    assert "--out" in message and "same flags" in message and str(out) in message


def test_resume_refuses_a_file_without_sidecar(tmp_path):
    out = tmp_path / "noise_0.25"
    out.write_text("idx\tlabel\tpredict\tradius\tcorrect\ttime\n0\t3\t3\t0.378\t1\t15.4\n")
    with pytest.raises(ResultsError, match="no settings file noise_0.25.json.*new --out"):
        open_results(out, SETTINGS)


def test_a_file_cut_inside_its_header_starts_anew(tmp_path):
    out = tmp_path / "results.tsv"
    out.write_text("idx\tlab")
    with open_results(out, SETTINGS) as writer:
        writer.write(make_row(7))
    assert read_results(out).columns["idx"].tolist() == [7]


def test_check_compatible():
    check_compatible(SETTINGS, dict(SETTINGS))
    check_compatible({"shape": [3, 32, 32]}, {"shape": (3, 32, 32)})  # as JSON stores it
    with pytest.raises(ResultsError, match=r"seed: None on disk, 1 now.*--out"):
        check_compatible({}, {"seed": 1})


def test_sidecar_and_shard_names():
    assert sidecar_path("runs/results.tsv") == Path("runs/results.json")
    assert sidecar_path("noise_0.25") == Path("noise_0.25.json")  # Cohen et al.'s names
    assert shard_path("runs/results.tsv", 1, 4) == Path("runs/results.shard1of4.tsv")
    assert sidecar_path(shard_path("results.tsv", 0, 2)) == Path("results.shard0of2.json")
    with pytest.raises(ArgumentError, match="0 <= i < k"):
        shard_path("results.tsv", 2, 2)


def test_read_cohen_imagenet_file_with_clock_times(tmp_path):
    path = tmp_path / "noise_0.50"
    path.write_text("idx\tlabel\tpredict\tradius\tcorrect\ttime\n"
                    "0\t0\t0\t1.05\t1\t0:01:41.210744\n"
                    "100\t1\t-1\t0.0\t0\t0:01:40.983466\n"
                    "200\t2\t7\t0.25\t0\t1:00:00\n")
    table = read_results(path)
    assert table.header == COHEN_COLUMNS
    assert table.columns["time"].tolist() == pytest.approx([101.210744, 100.983466, 3600.0])
    assert table.columns["predict"].tolist() == [0, -1, 7]
    assert not table.anisotropic


@pytest.mark.parametrize("text, problem", [
    ("", "no complete header"),
    ("idx\tlabel\tpredict\tradius\tcorrect", "no complete header"),
    ("a\tb\tc\n", "not a results file"),
    ("idx\tlabel\tpredict\tradius\tcorrect\ttime\n0\t3\t3\t0.5\t1\n1\t3\t3\t0.5\t1\t2.0\n",
     "line 2: 5 fields"),
    ("idx\tlabel\tpredict\tradius\tcorrect\ttime\n0\t3\t3\tzero\t1\t2.0\n",
     "line 2: column radius"),
    ("idx\tlabel\tpredict\tradius\tcorrect\ttime\n0\t3\t3\t0.5\t0\t2.0\n", "line 2: correct=0"),
    ("idx\tlabel\tpredict\tradius\tcorrect\ttime\n0\t3\t-1\t0.5\t0\t2.0\n", "line 2: radius 0.5"),
])
def test_read_rejects_corrupt_files(tmp_path, text, problem):
    path = tmp_path / "bad.tsv"
    path.write_text(text)
    with pytest.raises(ResultsError, match=problem):
        read_results(path)


def test_read_missing_file(tmp_path):
    with pytest.raises(ResultsError, match="no such results file"):
        read_results(tmp_path / "missing.tsv")
    assert done_indices(tmp_path / "missing.tsv") == set()


def test_broken_sidecar(tmp_path):
    out = tmp_path / "results.tsv"
    sidecar_path(out).write_text("{not json")
    with pytest.raises(ResultsError, match="not valid JSON"):
        read_sidecar(out)
    sidecar_path(out).write_text('{"settings": {}}')
    with pytest.raises(ResultsError, match="not an ancer results sidecar"):
        read_sidecar(out)
    write_sidecar(out, Sidecar({"a": 1}))
    assert read_sidecar(out) == Sidecar({"a": 1}, {})


def test_kill_9_loses_no_finished_row(tmp_path):
    """A writer killed while writing leaves complete rows and at most a partial last line."""
    out = tmp_path / "results.tsv"
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(ROOT)!r})
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from test_results import SETTINGS, make_row
        from ancer.writer import open_results
        with open_results({str(out)!r}, SETTINGS) as writer:
            i = 0
            while True:
                writer.write(make_row(i, radius=i / 7))
                i += 1
    """)
    process = subprocess.Popen([sys.executable, "-c", script])
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and len(done_indices(out)) < 50:
            time.sleep(0.05)
    finally:
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
    table = read_results(out)
    assert len(table) >= 50
    assert table.columns["idx"].tolist() == list(range(len(table)))
    assert table.columns["radius"].tolist() == [i / 7 for i in range(len(table))]
    with open_results(out, SETTINGS) as writer:
        assert writer.done == set(range(len(table)))
        writer.write(make_row(10_000))
    assert read_results(out).partial_line is None
    assert math.isclose(read_results(out).columns["radius"][-1], 0.5)


def test_a_certificate_s_row_reports_its_own_certify_and_the_memory_s_answer():
    from ancer.noise import Gaussian
    from ancer.results import make_row as row_of
    from ancer.smoothing import Certificate

    noise = Gaussian(0.5)
    counts, selection = np.array([5, 90, 3, 2]), np.array([0, 9, 1, 0])
    certificate = Certificate(1, 0.8, noise.region(torch.zeros(3), 0.8), "l2", counts, selection,
                              n0=10, n=100, alpha=0.001, precision="fp32", noise=noise,
                              samples=110)
    row = row_of(7, 2, certificate, "isotropic", 0.5, uses_memory=False)
    assert (row.predict, row.correct, row.count_a, row.count_label) == (1, 0, 90, 3)
    assert row.counts_top2 == ((1, 90), (0, 5)) and row.memory == "-" and row.samples == 110
    assert row.radius == pytest.approx(0.5 * 0.8416212335729143) and math.isnan(row.half_width)
    assert row_of(7, 2, certificate, "dds", 0.5, uses_memory=True).memory == "raw"
