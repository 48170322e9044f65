"""End-to-end tests of ``certify`` runs (certify/jobs.py) on a tiny model and dataset.

The model is a TorchScript archive (``load_model`` needs no architecture for it) whose
class is the brightest channel of a 3×8×8 image; the dataset is a 24-image npz whose
labels are that channel, a few images made ambiguous so that some inputs abstain.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from ancer.memory import Memory
from ancer.noise import noise_for_norm
from ancer.optimize import certify_with_scales, optimize_anisotropic
from ancer.seeding import input_generator
from ancer.smoothing import Smoothed
from certify import demo
from ancer.results import read_results, scales_path, sidecar_path
from cli_helpers import N_INPUTS, certify, make_files, rows_without_time

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    return make_files(tmp_path_factory.mktemp("run"))


def base_args(files, out: Path, *more: str) -> list[str]:
    return ["--model", str(files["model"]), "--data", str(files["data"]), "--sigma", "0.25",
            "--n0", "50", "--n", "200", "--batch", "200", "--quiet", "--out", str(out), *more]


ANCER_OPTIONS = ("--method", "ancer", "--opt-iterations", "4", "--opt-samples", "16",
                 "--max", "10", "--inputs-per-batch", "3")


@pytest.fixture(scope="module")
def reference(files, tmp_path_factory) -> dict[str, Path]:
    """Uninterrupted single-process runs: isotropic l2 and ancer."""
    root = tmp_path_factory.mktemp("reference")
    runs = {"isotropic": root / "iso.tsv", "ancer": root / "ancer.tsv"}
    assert certify(*base_args(files, runs["isotropic"])) == 0
    assert certify(*base_args(files, runs["ancer"], *ANCER_OPTIONS)) == 0
    return runs


def test_isotropic_rows_match_the_python_api(files, reference):
    table = read_results(reference["isotropic"])
    assert list(table.columns["idx"]) == list(range(N_INPUTS))
    model = torch.jit.load(str(files["model"]))
    smoothed = Smoothed(model, noise_for_norm("l2", 0.25), 3)
    data = np.load(files["data"])
    xs = torch.from_numpy(data["x"]).permute(0, 3, 1, 2).contiguous().float() / 255
    for row, idx in enumerate(table.columns["idx"]):
        cert = smoothed.certify(xs[idx], 50, 200, 0.001, 200, generator=input_generator(0, idx))
        assert table.columns["predict"][row] == cert.label
        assert table.columns["radius"][row] == cert.radius
        assert table.columns["p_lower"][row] == cert.p_lower
        assert table.columns["label"][row] == data["y"][idx]
        assert table.columns["precision"][row] == "fp32"
    assert (table.columns["predict"] == -1).any() and (table.columns["predict"] >= 0).any()


@pytest.mark.filterwarnings("ignore::ancer.accelerate.AccelerationWarning")
def test_acceleration_flags_leave_the_rows_unchanged(files, reference, tmp_path):
    out = tmp_path / "accelerated.tsv"
    # on the CPU --cuda-graphs is ignored with a warning (test_speed_equivalence compiles)
    assert certify(*base_args(files, out, "--compile", "off", "--cuda-graphs")) == 0
    assert rows_without_time(out) == rows_without_time(reference["isotropic"])
    info = json.loads(sidecar_path(out).read_text())["info"]
    assert info["acceleration"] == {"compile": "off", "cuda_graphs": True,
                                    "compile_resolved": False}


def test_l1_dds_run_writes_per_input_sigma(files, tmp_path):
    out = tmp_path / "dds.tsv"
    assert certify(*base_args(files, out, "--norm", "l1", "--method", "dds", "--skip", "3",
                              "--opt-iterations", "3", "--opt-samples", "16")) == 0
    table = read_results(out)
    assert list(table.columns["idx"]) == list(range(0, N_INPUTS, 3))
    sigma, half_width = table.columns["sigma"], table.columns["half_width"]
    np.testing.assert_allclose(half_width, np.sqrt(3) * sigma)
    assert len(set(sigma)) > 1 and set(table.columns["norm"]) == {"l1"}
    assert Memory.load(tmp_path / "dds.memory.pt").counts["inputs"] == len(table)


def test_ancer_rows_match_optimizer_certify_and_memory(files, reference):
    table = read_results(reference["ancer"])
    scales = np.load(scales_path(reference["ancer"]))
    assert list(scales["idx"]) == list(table.columns["idx"]) == list(range(10))
    model = torch.jit.load(str(files["model"]))
    data = np.load(files["data"])
    xs = torch.from_numpy(data["x"][:10]).permute(0, 3, 1, 2).contiguous().float() / 255
    smoothed = Smoothed(model, noise_for_norm("l2", 0.25), 3)
    thetas, certificates = [], []
    for start in range(0, 10, 3):  # --inputs-per-batch 3: groups of three inputs
        group = list(range(start, min(start + 3, 10)))
        theta = optimize_anisotropic(model, xs[group], 0.25, "l2", 4, samples=16, max_batch=200,
                                     indices=group)
        thetas.append(theta.sigma)
        certificates += certify_with_scales(smoothed, xs[group], theta, 50, 200, 0.001, 200,
                                            [input_generator(0, i) for i in group])
    np.testing.assert_array_equal(scales["sigma"], torch.cat(thetas).numpy())
    memory = Memory("l2")
    for row, (x, cert) in enumerate(zip(xs, certificates)):
        answer = memory.certify(x, cert.label, cert.region, key=row)
        assert table.columns["predict"][row] == answer.label
        assert table.columns["radius"][row] == answer.radius
        assert table.columns["log_volume"][row] == answer.log_volume
    assert set(table.columns["method"]) == {"ancer"}


def _kill_midway(argv: list[str], out: Path, total: int) -> None:
    """Start ``certify argv`` in a subprocess and SIGKILL it once some rows are written."""
    process = subprocess.Popen([sys.executable, "-m", "certify", *argv], cwd=REPO,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline and process.poll() is None:
            if out.exists() and out.read_bytes().count(b"\n") >= 3:  # header + 2 rows
                break
            time.sleep(0.002)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    rows = out.read_bytes().count(b"\n") - 1
    assert 2 <= rows < total, f"the kill came at {rows} rows of {total}"


@pytest.mark.parametrize("method", ["isotropic", "ancer"])
def test_killed_run_resumes_to_the_uninterrupted_rows(files, reference, tmp_path, method):
    out = tmp_path / "killed.tsv"
    if method == "isotropic":  # slow enough per input for the kill to land midway
        slow = ("--n", "5000", "--batch", "1000", "--inputs-per-batch", "1", "--max", "10")
        argv = base_args(files, out, *slow)
        expected_argv = base_args(files, tmp_path / "expected.tsv", *slow)
        total = 10
    else:
        argv = base_args(files, out, *ANCER_OPTIONS)
        total = 10
    _kill_midway(argv, out, total)
    assert certify(*argv) == 0
    if method == "isotropic":
        assert certify(*expected_argv) == 0
        expected = tmp_path / "expected.tsv"
    else:
        expected = reference["ancer"]
        np.testing.assert_array_equal(np.load(scales_path(out)), np.load(scales_path(expected)))
    assert rows_without_time(out) == rows_without_time(expected)
    assert list(read_results(out).columns["idx"]) == sorted(set(read_results(out).columns["idx"]))


def _stop_after_first_memory_save(monkeypatch) -> None:
    """Make the run stop (as a kill would) after the rows of its second group are written
    but before its memory is saved, so that the memory on disk covers the first group only."""
    saves = []
    original = Memory.save

    def save(self, path):
        if saves:
            raise KeyboardInterrupt("stopped before the second memory save")
        saves.append(path)
        original(self, path)

    monkeypatch.setattr(Memory, "save", save)


def test_resume_checks_rows_the_memory_did_not_save(files, reference, tmp_path, monkeypatch, capsys):
    """Rows written before a stop but absent from the saved memory are certified again on
    resume: equal, the run goes on and ends with the uninterrupted rows; changed (as
    nondeterministic GPU kernels could change them), the resume refuses with the fix."""
    argv = base_args(files, tmp_path / "stopped.tsv", *ANCER_OPTIONS)
    tampered_argv = base_args(files, tmp_path / "tampered.tsv", *ANCER_OPTIONS)
    for run in (argv, tampered_argv):
        with monkeypatch.context() as patch:
            _stop_after_first_memory_save(patch)
            assert certify(*run) == 130  # Ctrl-C: the rows written are kept
    stopped = read_results(tmp_path / "stopped.tsv")
    assert len(stopped) == 6 and Memory.load(tmp_path / "stopped.memory.pt").counts["inputs"] == 3
    assert certify(*argv) == 0
    assert rows_without_time(tmp_path / "stopped.tsv") == rows_without_time(reference["ancer"])

    tampered = tmp_path / "tampered.tsv"
    lines = tampered.read_text().splitlines(keepends=True)
    header = lines[0].rstrip("\n").split("\t")
    fields = lines[5].rstrip("\n").split("\t")  # idx 4: second group, unsaved in the memory
    column = header.index("p_lower")
    fields[column] = repr(float(fields[column]) * (1 - 1e-12))
    lines[5] = "\t".join(fields) + "\n"
    tampered.write_text("".join(lines))
    capsys.readouterr()
    assert certify(*tampered_argv) == 1
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1
    assert "idx 4 was written before the run stopped" in error and "p_lower" in error
    tampered.write_text("".join(lines[:5]))  # the fix the message gives
    assert certify(*tampered_argv) == 0
    assert rows_without_time(tampered) == rows_without_time(reference["ancer"])


def test_shards_then_merge_equal_one_process(files, reference, tmp_path):
    out = tmp_path / "sharded.tsv"
    for shard in ("0/2", "1/2"):
        assert certify(*base_args(files, out, "--shard", shard)) == 0
    assert certify("merge", "--out", str(out)) == 0
    assert rows_without_time(out) == rows_without_time(reference["isotropic"])


@pytest.mark.slow
def test_torchrun_on_two_cpu_processes_equals_one_process(files, reference, tmp_path):
    out = tmp_path / "torchrun.tsv"
    argv = base_args(files, out)
    argv[argv.index("--n")] = "--num-samples"  # torchrun reads --n as its own option
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                             "-m", "certify", *argv], cwd=REPO, capture_output=True, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert rows_without_time(out) == rows_without_time(reference["isotropic"])


def test_rerun_with_another_n_is_refused(files, reference, capsys):
    assert certify(*base_args(files, reference["isotropic"], "--n", "300")) == 1
    error = capsys.readouterr().err.strip()
    assert error.startswith("certify: error:") and "n: 200 on disk, 300 now" in error
    assert len(error.splitlines()) == 1


BAD_ARGUMENTS = [
    (["--model", "{tmp}/missing.pt"], "missing.pt"),
    (["--model", "{tmp}/junk.pt"], "junk.pt"),
    (["--data", "{tmp}"], "npz"),
    (["--dataset", "cifar10", "--data", "{tmp}"], "cifar"),
    (["--sigma", "0"], "--sigma"),
    (["--sigma", "-1"], "--sigma"),
    (["--alpha", "1.5"], "--alpha"),
    (["--alpha", "0"], "--alpha"),
    (["--n0", "0"], "--n0"),
    (["--n", "0"], "--n"),
    (["--shard", "2/2"], "--shard"),
    (["--shard", "a/b"], "--shard"),
    (["--device", "cuda"], "cuda"),
    (["--device", "tpu"], "--device"),
    (["--norm", "linf"], "--norm"),
]


@pytest.mark.parametrize("change, named", BAD_ARGUMENTS)
def test_bad_argument_gives_one_line_and_nonzero_exit(files, tmp_path, capsys, change, named):
    if change == ["--device", "cuda"] and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    argv = base_args(files, tmp_path / "out.tsv")
    for flag, value in zip(change[::2], change[1::2]):
        value = value.format(tmp=tmp_path)
        if flag in argv:
            argv[argv.index(flag) + 1] = value
        else:
            argv += [flag, value]
    assert certify(*argv) != 0
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("certify: error: "), captured.err
    assert named in lines[0]
    assert not (tmp_path / "out.tsv").exists()


def test_no_model_and_no_sigma_in_checkpoint(files, tmp_path, capsys):  # TorchScript: no σ
    argv = base_args(files, tmp_path / "out.tsv")
    assert certify(*argv[2:]) == 2
    assert "--model" in capsys.readouterr().err
    del argv[argv.index("--sigma"):argv.index("--sigma") + 2]
    assert certify(*argv) == 2
    assert "--sigma" in capsys.readouterr().err


def test_demo_without_assets_says_so(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(demo, "CHECKPOINT", tmp_path / "absent.pth.tar")
    assert certify("--demo") == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("certify: error: the demo assets are missing")
    assert len(error.splitlines()) == 1


@pytest.mark.skipif(not (demo.CHECKPOINT.is_file() and demo.SAMPLE.is_file()),
                    reason="the demo assets are not built yet")
def test_demo_runs_on_the_shipped_assets(tmp_path, capsys):
    out = tmp_path / "demo.tsv"
    assert certify("--demo", "--max", "3", "--n", "100", "--quiet", "--out", str(out)) == 0
    printed = capsys.readouterr().out
    assert "certified accuracy @ r = 0" in printed and "smoothed classifier's accuracy" in printed
    assert "base classifier's accuracy under noise" in printed
    assert len(read_results(out)) == 3
