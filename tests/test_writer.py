"""The library's run files (ancer.writer, ancer.scales, ancer.lock): the resume checks, the
scales file and the lock, each without the CLI."""

import math

import numpy as np
import pytest
import torch

from ancer.errors import ResultsError
from ancer.labels import ABSTAIN
from ancer.lock import RunLock
from ancer.memory import Memory
from ancer.results import lock_path, scales_path
from ancer.scales import open_scales, read_scales, write_scales
from ancer.writer import (check_recomputed, check_selection, file_order, open_results,
                          recorded_group_size, unanswered_rows)
from test_results import SETTINGS, make_row


def _written(path, *indices, settings=SETTINGS):
    with open_results(path, settings) as writer:
        for idx in indices:
            writer.write(make_row(idx))


def test_a_row_certified_again_must_equal_the_one_on_disk(tmp_path):
    written = make_row(4, half_width=math.nan)
    check_recomputed(tmp_path / "r.tsv", written, make_row(4, half_width=math.nan, time=99.0))
    with pytest.raises(ResultsError, match=r"idx 4 .*\(p_lower 0\.9 on disk, 0\.8 now"):
        check_recomputed(tmp_path / "r.tsv", written, make_row(4, p_lower=0.8))


def test_rows_beyond_the_selection_are_refused(tmp_path):
    out = tmp_path / "r.tsv"
    check_selection(out, [0, 1])  # no file yet: nothing to check
    _written(out, 0, 1, 7)
    check_selection(out, range(10))
    with pytest.raises(ResultsError, match=r"beyond this selection \(idx 7, 1 rows in all\)"):
        check_selection(out, [0, 1, 2])


def test_a_run_goes_on_with_the_group_size_it_recorded(tmp_path):
    out = tmp_path / "r.tsv"
    assert recorded_group_size(out, 8) == 8
    _written(out, 0)
    assert recorded_group_size(out, 8) == 8  # settings without a group size
    _written(tmp_path / "g.tsv", 0, settings={**SETTINGS, "inputs_per_batch": 3})
    assert recorded_group_size(tmp_path / "g.tsv", 8) == 3


def test_rows_the_saved_memory_did_not_answer(tmp_path):
    out = tmp_path / "r.tsv"
    _written(out, 0, 1, 2)
    memory = Memory("l2")
    memory.certify(torch.zeros(3), ABSTAIN, None, key=0)
    with open_results(out, SETTINGS) as writer:
        assert file_order(writer) == [0, 1, 2]
        assert sorted(unanswered_rows(writer, memory)) == [1, 2]
        assert unanswered_rows(writer, memory)[2].to_line() == make_row(2).to_line()
        assert unanswered_rows(writer, None) == {}


def test_scales_file_appends_resumes_and_drops_unwritten_records(tmp_path):
    out = tmp_path / "r.tsv"
    theta = [np.full((1, 2, 2), 0.25 * (i + 1), dtype=np.float32) for i in range(3)]
    with open_scales(out, (1, 2, 2), []) as scales:
        for idx, sigma in zip((5, 9, 2), theta):
            scales.append(idx, sigma)
    assert scales_path(out).name == "r.scales.npy"
    records = read_scales(out)
    assert records["idx"].tolist() == [5, 9, 2]
    assert np.array_equal(records["sigma"][1], theta[1])
    with open_scales(out, (1, 2, 2), [5, 9]) as scales:  # idx 2's row was never written
        assert scales.count == 2
    assert read_scales(out)["idx"].tolist() == [5, 9]
    with pytest.raises(ResultsError, match="lacks the scales of idx 4"):
        open_scales(out, (1, 2, 2), [5, 4])
    with pytest.raises(ResultsError, match=r"does not hold scales of shape \(3, 2, 2\)"):
        open_scales(out, (3, 2, 2), [5, 9])
    write_scales(tmp_path / "m.tsv", records[::-1].copy())
    with open_scales(tmp_path / "m.tsv", (1, 2, 2), [2, 9, 5]) as scales:
        scales.append(11, theta[0])
    assert read_scales(tmp_path / "m.tsv")["idx"].tolist() == [2, 9, 5, 11]


def test_a_missing_scales_file_is_named(tmp_path):
    with pytest.raises(ResultsError, match="r.scales.npy is missing"):
        read_scales(tmp_path / "r.tsv")


def test_the_lock_refuses_a_second_writer_and_is_released(tmp_path):
    out = tmp_path / "r.tsv"
    with RunLock(out):
        assert lock_path(out).read_text().startswith("pid ")
        with pytest.raises(ResultsError, match="being written by another certify run"):
            with RunLock(out):
                pass
    with RunLock(out):
        pass
