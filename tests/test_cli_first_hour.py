"""What a new user meets in the first hour: the headline command without --data, Ctrl-C,
two runs on one --out, growing --max, an idle shard, the demo's clean-up."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from certify import demo
from ancer.results import read_results, read_sidecar
from cli_helpers import certify, make_files, rows_without_time

REPO = Path(__file__).resolve().parents[1]
SHIPPED = demo.CHECKPOINT.is_file() and demo.SAMPLE.is_file()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return make_files(tmp_path_factory.mktemp("first-hour"))


def _argv(files, out, *more):
    return ["--model", str(files["model"]), "--data", str(files["data"]), "--sigma", "0.25",
            "--n0", "50", "--n", "200", "--batch", "200", "--quiet", "--out", str(out), *more]


def _start(argv: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "certify", *argv], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})


def _wait_for_rows(process: subprocess.Popen, out: Path, rows: int, limit: float = 120) -> None:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline and process.poll() is None:
        if out.exists() and out.read_bytes().count(b"\n") >= rows + 1:
            return
        time.sleep(0.01)
    raise AssertionError(f"no {rows} rows in {out} in time: {process.poll()}")


SLOW = ("--n", "20000", "--batch", "1000", "--inputs-per-batch", "1", "--max", "8")


def test_ctrl_c_exits_130_in_one_line_and_resume_equals_an_uninterrupted_run(files, tmp_path):
    out = tmp_path / "interrupted.tsv"
    process = _start(_argv(files, out, *SLOW))
    _wait_for_rows(process, out, 2)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 130
    lines = err.strip().splitlines()
    assert 1 <= len(lines) <= 2, err
    assert lines[-1].startswith("certify: interrupted: ") and "rerun the same command" in lines[-1]
    kept = len(read_results(out))
    assert f"{kept} rows kept in {out}" in lines[-1] and 2 <= kept < 8
    assert certify(*_argv(files, out, *SLOW)) == 0
    assert certify(*_argv(files, tmp_path / "whole.tsv", *SLOW)) == 0
    assert rows_without_time(out) == rows_without_time(tmp_path / "whole.tsv")


def test_a_second_run_on_the_same_out_is_refused_in_one_line(files, tmp_path, capsys):
    out = tmp_path / "busy.tsv"
    process = _start(_argv(files, out, *SLOW))
    try:
        _wait_for_rows(process, out, 1)
        assert certify(*_argv(files, out, *SLOW)) == 1
        error = capsys.readouterr().err.strip()
        assert len(error.splitlines()) == 1
        assert "is being written by another certify run" in error and "pid" in error
    finally:
        process.kill()
        process.wait()
    assert certify(*_argv(files, out, *SLOW)) == 0  # the lock dies with its process


def test_max_can_grow_but_not_shrink(files, tmp_path, capsys):
    out = tmp_path / "grow.tsv"
    assert certify(*_argv(files, out, "--max", "5")) == 0
    assert certify(*_argv(files, out, "--max", "11")) == 0
    assert read_sidecar(out).settings["max"] == 11
    assert certify(*_argv(files, tmp_path / "whole.tsv", "--max", "11")) == 0
    assert rows_without_time(out) == rows_without_time(tmp_path / "whole.tsv")
    assert certify(*_argv(files, out, "--max", "4")) == 1
    error = capsys.readouterr().err
    assert "--max may grow between runs, not shrink" in error
    assert certify(*_argv(files, out, "--max", "11", "--n", "300")) == 1  # other settings: refused
    assert "n: 200 on disk, 300 now" in capsys.readouterr().err


def test_a_shard_with_nothing_to_do_says_so(files, tmp_path, capsys):
    out = tmp_path / "sharded.tsv"
    assert certify(*_argv(files, out, "--max", "2", "--inputs-per-batch", "1",
                          "--shard", "3/4")) == 0
    err = capsys.readouterr().err
    assert "shard 3/4 has nothing to do" in err


@pytest.mark.skipif(not SHIPPED, reason="the shipped assets are not built")
def test_without_data_a_cifar10_model_certifies_the_shipped_images(tmp_path, capsys):
    out = tmp_path / "headline.tsv"
    assert certify("--model", str(demo.CHECKPOINT), "--n0", "20", "--n", "40", "--max", "3",
                   "--quiet", "--out", str(out)) == 0
    err = capsys.readouterr().err
    assert "no --data given: certifying the 100 CIFAR-10 test images shipped with ancer" in err
    assert "no --sigma given: using σ = 0.25" in err
    assert len(read_results(out)) == 3
    assert read_sidecar(out).settings["dataset"] == "npz"


def test_without_data_another_dataset_is_told_what_to_pass(files, tmp_path, capsys):
    argv = _argv(files, tmp_path / "out.tsv")
    del argv[argv.index("--data"):argv.index("--data") + 2]
    assert certify(*argv) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "--data" in error


@pytest.mark.skipif(not SHIPPED, reason="the shipped assets are not built")
def test_the_demo_leaves_no_temporary_folder(capsys):
    before = set(Path(tempfile.gettempdir()).glob("certify-demo-*"))
    assert certify("--demo", "--max", "2", "--n", "50", "--quiet") == 0
    assert set(Path(tempfile.gettempdir()).glob("certify-demo-*")) == before
    out = capsys.readouterr().out
    assert "certified accuracy @ r = 0" in out
    assert out.splitlines()[-1].startswith("the results were written to a temporary folder, "
                                           "now removed; keep them with --out FILE")


@pytest.mark.skipif(not SHIPPED, reason="the shipped assets are not built")
def test_the_demo_keeps_its_results_with_out_and_says_where(tmp_path, capsys):
    out = tmp_path / "demo.tsv"
    assert certify("--demo", "--max", "2", "--n", "50", "--quiet", "--out", str(out)) == 0
    assert len(read_results(out)) == 2
    assert capsys.readouterr().out.splitlines()[-1] == (
        f"results in {out}; see them with 'certify report {out}'")
