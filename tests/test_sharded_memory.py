"""Sharded data-dependent runs (``--method dds|ancer`` with ``--shard`` or torchrun): raw
shard rows, and the memory replayed at the merge (ancer/merge.py) on the
energy model of cli_helpers.py.
The model makes memory conflicts on purpose (class 1 iff the image is far from mid-grey, a
class that flips as σ grows), and its inputs are close neighbours: the memory shrinks and
overrides some of their certificates.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ancer.memory import Memory
from certify.report import memory_counts
from ancer.results import COLUMNS, Row, memory_path, read_results, read_sidecar, scales_path
from cli_helpers import certify, make_energy_files, rows_without_time

REPO = Path(__file__).resolve().parents[1]
N_INPUTS = 12
OPTIONS = {"dds": ("--method", "dds", "--opt-iterations", "10", "--opt-samples", "16",
                   "--opt-lr", "0.001"),
           "ancer": ("--method", "ancer", "--opt-iterations", "5", "--opt-samples", "16")}


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    return make_energy_files(tmp_path_factory.mktemp("memory"), N_INPUTS)


def run_args(files, out: Path, method: str, *more: str) -> list[str]:
    return ["--model", str(files["model"]), "--data", str(files["data"]), "--sigma", "0.25",
            "--n0", "50", "--n", "200", "--batch", "200", "--inputs-per-batch", "3",
            "--device", "cpu", "--quiet", "--out", str(out), *OPTIONS[method], *more]


@pytest.fixture(scope="module")
def runs(files, tmp_path_factory) -> dict[str, dict[str, Path]]:
    """Per method: a single-process run, and two shards merged by ``certify merge``."""
    root = tmp_path_factory.mktemp("runs")
    made = {}
    for method in OPTIONS:
        single, sharded = root / f"{method}.tsv", root / f"{method}-sharded.tsv"
        assert certify(*run_args(files, single, method)) == 0
        for shard in ("0/2", "1/2"):
            assert certify(*run_args(files, sharded, method, "--shard", shard)) == 0
        assert certify("merge", "--out", str(sharded)) == 0
        made[method] = {"single": single, "sharded": sharded}
    return made


def assert_memories_equal(first: Path, second: Path) -> None:
    a, b = Memory.load(first), Memory.load(second)
    assert (a.keys, a.labels, a.processed, a.counts) == (b.keys, b.labels, b.processed, b.counts)
    for ra, rb in zip(a.regions, b.regions):
        assert torch.equal(ra.center, rb.center) and torch.equal(ra.semi_axes, rb.semi_axes)


@pytest.mark.parametrize("method", list(OPTIONS))
def test_shards_merged_equal_one_process(runs, method):
    single, sharded = runs[method]["single"], runs[method]["sharded"]
    assert rows_without_time(sharded) == rows_without_time(single)
    assert_memories_equal(memory_path(sharded), memory_path(single))
    assert read_sidecar(sharded).info["memory"] == read_sidecar(single).info["memory"]
    if method == "ancer":  # the merged scales file is the single run's, byte for byte
        assert scales_path(sharded).read_bytes() == scales_path(single).read_bytes()
    else:
        assert not scales_path(sharded).exists()


@pytest.mark.parametrize("method", list(OPTIONS))
def test_shards_write_raw_rows_and_the_merge_answers_them(runs, method):
    sharded = runs[method]["sharded"]
    shards = [sharded.with_name(f"{method}-sharded.shard{i}of2.tsv") for i in range(2)]
    raw = {}
    for shard in shards:
        table = read_results(shard)
        assert set(table.columns["memory"]) == {"raw"}
        raw.update({table.row(i).idx: table.row(i) for i in range(len(table))})
        assert not memory_path(shard).exists()
    # groups of three consecutive inputs, alternating between the shards
    assert sorted(read_results(shards[0]).columns["idx"]) == [0, 1, 2, 6, 7, 8]
    merged = read_results(sharded)
    for number in range(len(merged)):
        row = merged.row(number)
        own = raw[row.idx]
        assert (row.p_lower, row.sigma, row.count_a) == (own.p_lower, own.sigma, own.count_a)
        kind, _, value = row.memory.partition(":")
        if kind == "kept":
            assert (row.predict, row.radius) == (own.predict, own.radius)
        elif kind == "shrunk":
            assert row.predict == own.predict
            assert row.radius == pytest.approx(float(value) * own.radius, rel=1e-12)
        elif kind == "override":  # decided by an earlier input's region of another class
            assert int(value) < row.idx and row.predict != own.predict
            assert row.predict == merged.row(int(value)).predict
        else:
            assert kind == "abstain" and row.predict == -1


def test_the_conflicts_are_shrunk_and_overridden(runs):
    """The dataset's neighbours of different classes collide: dds shrinks and overrides."""
    for method, expected in (("dds", {"shrunk", "override"}), ("ancer", {"shrunk"})):
        table = read_results(runs[method]["single"])
        kinds = {text.split(":")[0] for text in table.columns["memory"]}
        assert expected <= kinds, (method, kinds)
        report = read_sidecar(runs[method]["single"]).info["memory"]
        counts = memory_counts(table)
        assert (counts["kept"], counts["shrunk"], counts["override"], counts["abstain"]) == (
            report["kept"], report["shrunk"], report["overridden"], report["abstained"])


def test_run_merge_and_report_print_the_memory_counts(runs, capsys):
    sharded = runs["dds"]["sharded"]
    assert certify("report", str(sharded), str(sharded.with_name("dds-sharded.shard0of2.tsv"))) == 0
    captured = capsys.readouterr()
    counts = memory_counts(read_results(sharded))
    assert f"| memory: shrunk | {counts['shrunk']} | 0 |" in captured.out
    assert f"| memory: overridden | {counts['override']} | 0 |" in captured.out
    assert "| memory: raw (shard rows, not yet merged) | 0 | 6 |" in captured.out
    assert "raw shard rows" in captured.err and len(captured.err.splitlines()) == 1


def test_rerunning_the_merged_run_resumes_it(files, runs, capsys):
    """The merge leaves what a single-process run leaves: resuming it certifies nothing."""
    sharded = runs["ancer"]["sharded"]
    before = sharded.read_bytes()
    assert certify(*run_args(files, sharded, "ancer")) == 0
    assert sharded.read_bytes() == before
    report = read_sidecar(sharded).info["memory"]
    assert f"memory: 12 inputs: {report['kept']} kept, {report['shrunk']} shrunk" \
        in capsys.readouterr().out


def test_merge_needs_the_data_and_takes_its_new_place(files, runs, tmp_path, capsys):
    shards = sorted(runs["dds"]["sharded"].parent.glob("dds-sharded.shard*of2.*"))
    for shard in shards:
        shutil.copy(shard, tmp_path)
    moved = tmp_path / "moved.npz"
    shutil.copy(files["data"], moved)
    for sidecar in tmp_path.glob("*.json"):  # as if the data had been at a path now gone
        document = json.loads(sidecar.read_text())
        document["settings"]["data"] = str(tmp_path / "gone.npz")
        sidecar.write_text(json.dumps(document))
    out = tmp_path / "dds-sharded.tsv"
    assert certify("merge", "--out", str(out)) == 1
    error = capsys.readouterr().err
    assert len(error.splitlines()) == 1 and "gone.npz is gone" in error and "--data" in error
    assert not out.exists()
    assert certify("merge", "--out", str(out), "--data", str(moved)) == 0
    assert rows_without_time(out) == rows_without_time(runs["dds"]["single"])


@pytest.mark.parametrize("files_to_merge, problem", [
    (["dds-sharded.shard0of2.tsv"], "has no row yet"),
    (["dds.tsv", "dds-sharded.shard1of2.tsv"], "already answered by the memory"),
])
def test_merge_refuses_what_it_cannot_replay(runs, tmp_path, capsys, files_to_merge, problem):
    folder = runs["dds"]["single"].parent
    assert certify("merge", *(str(folder / name) for name in files_to_merge),
                   "--out", str(tmp_path / "out.tsv")) == 1
    error = capsys.readouterr().err
    assert len(error.splitlines()) == 1 and problem in error, error
    assert not (tmp_path / "out.tsv").exists()


def test_memory_column_round_trips(tmp_path):
    rows = [Row(idx=i, label=1, predict=predict, radius=radius, time=0.5, norm="l1",
                method="dds", sigma=0.25, half_width=math.sqrt(3) * 0.25, p_lower=0.9, proxy_radius=radius,
                volume_radius=radius, log_volume=-3.0 if radius else -math.inf, n0=100, n=1000,
                alpha=0.001, count_a=950, counts_top2=((1, 950), (0, 50)), precision="fp32",
                memory=memory)
            for i, (predict, radius, memory) in enumerate([
                (1, 0.5, "kept"), (1, 0.25, "shrunk:0.5"), (0, 0.125, "override:0"),
                (-1, 0.0, "abstain"), (1, 0.5, "raw")])]
    path = tmp_path / "r.tsv"
    path.write_text("\t".join(COLUMNS) + "\n" + "".join(row.to_line() for row in rows))
    table = read_results(path)
    assert list(table.columns["memory"]) == ["kept", "shrunk:0.5", "override:0", "abstain", "raw"]
    assert [table.row(i) for i in range(len(rows))] == rows
    assert [table.row(i).to_line() for i in range(len(rows))] == [r.to_line() for r in rows]


def test_files_without_the_memory_column_still_read(tmp_path):
    line = "\t".join(["3", "1", "1", "0.5", "1", "2.5", "l2", "isotropic", "0.25", "nan", "0.9",
                      "0.5", "0.5", "-3.0", "100", "1000", "0.001", "950", "1:950,0:50", "fp32"])
    older = tmp_path / "older.tsv"  # written before the column existed
    older.write_text("\t".join(COLUMNS[:COLUMNS.index("memory")]) + "\n" + line + "\n")
    table = read_results(older)
    assert "memory" not in table.columns and table.row(0).memory == "-"
    assert table.row(0).count_label == -1
    assert memory_counts(table) is None
    assert table.row(0).to_line() == line + "\t-\t-1\t-1\tclopper-pearson\n"
    by_hand = tmp_path / "by_hand.tsv"  # today's header, rows without the trailing columns
    by_hand.write_text("\t".join(COLUMNS) + "\n" + line + "\n")
    assert list(read_results(by_hand).columns["memory"]) == ["-"]
    assert list(read_results(by_hand).columns["count_label"]) == [-1]


@pytest.mark.slow
def test_torchrun_dds_on_two_cpu_processes_equals_one_process(files, runs, tmp_path):
    out = tmp_path / "torchrun.tsv"
    argv = run_args(files, out, "dds")
    argv[argv.index("--n")] = "--num-samples"  # torchrun reads --n as its own option
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                             "-m", "certify", *argv], cwd=REPO, capture_output=True, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert rows_without_time(out) == rows_without_time(runs["dds"]["single"])
    assert_memories_equal(memory_path(out), memory_path(runs["dds"]["single"]))
    assert "memory: 12 inputs" in result.stdout
