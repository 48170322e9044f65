"""`certify merge`: shards into one file ordered by idx, duplicates, conflicts, settings."""

import json
from pathlib import Path

import pytest

from ancer.errors import ArgumentError, ResultsError
from certify.cli import main
from ancer.merge import find_shards, merge_results
from ancer.results import COLUMNS, read_results, read_sidecar, shard_path, sidecar_path
from ancer.writer import open_results
from test_results import SETTINGS, make_row


def write_shards(out: Path, shards: list[list[int]], settings=SETTINGS, **row_fields) -> list[Path]:
    """Write shard i of len(shards) holding the rows of the given indices, in that order."""
    paths = []
    for i, indices in enumerate(shards):
        path = shard_path(out, i, len(shards))
        with open_results(path, settings, {"rank": i}) as writer:
            for idx in indices:
                writer.write(make_row(idx, radius=idx / 10, **row_fields))
        paths.append(path)
    return paths


def test_merge_orders_by_idx_and_keeps_settings(tmp_path):
    out = tmp_path / "results.tsv"
    shards = write_shards(out, [[0, 30, 60], [10, 40], [20, 50]])
    assert find_shards(out) == shards
    result = merge_results(shards, out)
    assert (result.rows, result.collapsed, result.dropped) == (7, 0, ())
    table = read_results(out)
    assert table.header == COLUMNS
    assert table.columns["idx"].tolist() == [0, 10, 20, 30, 40, 50, 60]
    assert out.read_text().splitlines()[1:] == [make_row(i, radius=i / 10).to_line()[:-1]
                                                for i in range(0, 70, 10)]
    sidecar = read_sidecar(out)
    assert sidecar.settings == SETTINGS
    assert sidecar.info["shards"] == [{"rank": 0}, {"rank": 1}, {"rank": 2}]
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_identical_duplicates_collapse_even_with_other_times(tmp_path):
    out = tmp_path / "results.tsv"
    first, second = write_shards(out, [[0, 1, 2], [2, 3]])
    text = second.read_text().replace("\t1.5\t", "\t9.75\t")  # rerun: same row, other time
    second.write_text(text)
    result = merge_results([first, second], out)
    assert (result.rows, result.collapsed) == (4, 1)
    assert read_results(out).columns["time"].tolist() == [1.5, 1.5, 1.5, 9.75]  # first kept


def test_conflicting_duplicates_name_idx_files_and_columns(tmp_path):
    out = tmp_path / "results.tsv"
    first, = write_shards(out, [[0, 5]])
    other = tmp_path / "other.tsv"
    with open_results(other, SETTINGS) as writer:
        writer.write(make_row(5, radius=0.75))
    with pytest.raises(ResultsError) as error:
        merge_results([first, other], out)
    message = str(error.value)
    assert "idx 5 differs" in message and str(first) in message and "other.tsv (line 2)" in message
    assert "radius '0.5' vs '0.75'" in message and "one run" in message
    assert not out.exists()


def test_partial_last_line_of_a_shard_is_dropped_and_reported(tmp_path, capsys):
    out = tmp_path / "results.tsv"
    first, second = write_shards(out, [[0, 2], [1]])
    with open(second, "a") as handle:
        handle.write(make_row(3).to_line()[:12])
    assert main(["merge", "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert captured.out == f"merged 3 rows from 2 files into {out}\n"
    assert captured.err.startswith(f"certify: warning: {second}: dropped a partial last line")
    assert read_results(out).columns["idx"].tolist() == [0, 1, 2]


def test_merge_into_an_existing_file_listed_as_input(tmp_path):
    out = tmp_path / "results.tsv"
    with open_results(out, SETTINGS) as writer:
        writer.write(make_row(0))
        writer.write(make_row(4, radius=0.4))
    (shard,) = write_shards(tmp_path / "more.tsv", [[2, 4]])
    result = merge_results([out, shard], out)
    assert (result.rows, result.collapsed) == (3, 1)
    assert read_results(out).columns["idx"].tolist() == [0, 2, 4]


def test_cohen_files_merge_without_sidecars(tmp_path):
    header = "idx\tlabel\tpredict\tradius\tcorrect\ttime\n"
    a, b = tmp_path / "noise_0.25_a", tmp_path / "noise_0.25_b"
    a.write_text(header + "20\t7\t-1\t0.0\t0\t0:00:15.6\n")
    b.write_text(header + "0\t3\t3\t0.378\t1\t15.4\n")
    merge_results([a, b], tmp_path / "noise_0.25")
    assert (tmp_path / "noise_0.25").read_text() == header + "0\t3\t3\t0.378\t1\t15.4\n" \
        "20\t7\t-1\t0.0\t0\t0:00:15.6\n"
    assert not sidecar_path(tmp_path / "noise_0.25").exists()


@pytest.mark.parametrize("problem", ["settings", "missing sidecar", "columns"])
def test_files_of_different_runs_are_refused(tmp_path, problem):
    out = tmp_path / "results.tsv"
    first, second = write_shards(out, [[0], [1]])
    if problem == "settings":
        sidecar = json.loads(sidecar_path(second).read_text())
        sidecar["settings"]["sigma"] = 0.5
        sidecar_path(second).write_text(json.dumps(sidecar))
        match = r"different settings \(sigma: 0.25 vs 0.5\)"
    elif problem == "missing sidecar":
        sidecar_path(second).unlink()
        match = "no settings sidecar"
    else:
        second.write_text("idx\tlabel\tpredict\tradius\tcorrect\ttime\n1\t3\t3\t0.1\t1\t1.5\n")
        match = "different columns"
    with pytest.raises(ResultsError, match=match):
        merge_results([first, second], out)
    assert not out.exists()


def test_find_shards_errors(tmp_path):
    out = tmp_path / "results.tsv"
    with pytest.raises(ResultsError, match="no shard files results.shard<i>of<k>.tsv"):
        find_shards(out)
    write_shards(out, [[0], [1], [2]])
    shard_path(out, 1, 3).unlink()
    with pytest.raises(ResultsError, match=r"shard 1 of 3 is missing .*--shard 1/3"):
        find_shards(out)
    write_shards(out, [[0], [1]])
    with pytest.raises(ResultsError, match=r"different shard counts \(2, 3\)"):
        find_shards(out)


def test_existing_out_is_not_overwritten(tmp_path):
    out = tmp_path / "results.tsv"
    shards = write_shards(out, [[0], [1]])
    out.write_text("precious")
    with pytest.raises(ResultsError, match="already exists: delete it, choose another --out"):
        merge_results(shards, out)
    assert out.read_text() == "precious"
    with pytest.raises(ArgumentError, match="nothing to merge"):
        merge_results([], tmp_path / "new.tsv")


BAD_ARGUMENTS = [
    (["merge"], "required: --out"),
    (["merge", "{dir}/a.shard0of2.tsv"], "required: --out"),
    (["merge", "--out", "{dir}/none.tsv"], "no shard files none.shard<i>of<k>.tsv"),
    (["merge", "--out", "{dir}/m.tsv", "{dir}/missing.tsv"], "no such results file"),
    (["merge", "--out", "{dir}/a.tsv", "{dir}/a.shard0of2.tsv"], "already exists"),
    (["merge", "--out", "{dir}/m.tsv", "{dir}/a.shard0of2.tsv", "{dir}/c.tsv"], "idx 0 differs"),
    (["merge", "--out", "{dir}/m.tsv", "--force"], "unrecognized arguments: --force"),
]


@pytest.mark.parametrize("argv, problem", BAD_ARGUMENTS)
def test_each_bad_argument_gives_one_line(tmp_path, capsys, argv, problem):
    write_shards(tmp_path / "a.tsv", [[0], [1]])
    (tmp_path / "a.tsv").write_text("exists")
    with open_results(tmp_path / "c.tsv", SETTINGS) as writer:
        writer.write(make_row(0, radius=0.9))
    code = main([arg.replace("{dir}", str(tmp_path)) for arg in argv])
    captured = capsys.readouterr()
    assert code != 0 and captured.out == ""
    assert captured.err.count("\n") == 1 and captured.err.startswith("certify: error: ")
    assert problem in captured.err, captured.err
