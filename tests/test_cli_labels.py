"""No silently wrong labels: class folders are labelled by the model's class names (or
refused), and an npz whose labels exceed the model's classes names the file and the flags."""
from __future__ import annotations

import numpy as np
import pytest

from certify import demo
from ancer.results import read_results
from cli_helpers import certify

Image = pytest.importorskip("PIL.Image")
pytestmark = pytest.mark.skipif(not (demo.CHECKPOINT.is_file() and demo.SAMPLE.is_file()),
                                reason="shipped model absent")

FAST = ("--model", str(demo.CHECKPOINT), "--sigma", "0.25", "--n0", "20", "--n", "100",
        "--batch", "120", "--quiet")
CAT, DOG = 3, 5


def _class_folders(root, names_of_labels):
    """The shipped images of CIFAR-10 classes cat and dog (exact pixels, PNG) in folders
    named ``names_of_labels[label]``."""
    with np.load(demo.SAMPLE) as sample:
        x, y = sample["x"], sample["y"]
    for label, name in names_of_labels.items():
        (root / name).mkdir(parents=True)
        for k in np.flatnonzero(y == label)[:3]:
            Image.fromarray(x[k]).save(root / name / f"{k:03d}.png")
    return root


def _error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("certify: error: "), err
    return err[0]


def test_class_folders_named_after_cifar10_classes_keep_their_labels(tmp_path):
    data = _class_folders(tmp_path / "pets", {CAT: "cat", DOG: "dog"})
    out = tmp_path / "r.tsv"
    assert certify(*FAST, "--dataset", "folder", "--data", str(data), "--out", str(out)) == 0
    rows = [read_results(out).row(i) for i in range(6)]
    assert [row.label for row in rows] == [CAT] * 3 + [DOG] * 3   # not 0 and 1
    assert sum(row.correct for row in rows) >= 3   # the model is right on most of them


def test_class_folders_with_other_names_are_refused_unless_vouched_for(tmp_path, capsys):
    data = _class_folders(tmp_path / "pets", {CAT: "a_cats", DOG: "b_dogs"})
    out = tmp_path / "r.tsv"
    assert certify(*FAST, "--dataset", "folder", "--data", str(data), "--out", str(out)) != 0
    line = _error(capsys)
    assert "'a_cats'" in line and "--labels-sorted" in line and "airplane" in line
    assert not out.exists()
    assert certify(*FAST, "--dataset", "folder", "--data", str(data), "--labels-sorted",
                   "--out", str(out)) == 0
    assert [read_results(out).row(i).label for i in range(6)] == [0] * 3 + [1] * 3


def test_an_npz_with_labels_beyond_the_models_classes_names_file_and_flags(tmp_path, capsys):
    with np.load(demo.SAMPLE) as sample:
        x, y = sample["x"][:4], sample["y"][:4].astype(np.int64)
    y[2] = 18
    path = tmp_path / "labels18.npz"
    np.savez(path, x=x, y=y)
    assert certify(*FAST, "--data", str(path), "--out", str(tmp_path / "r.tsv")) != 0
    line = _error(capsys)
    assert "labels18.npz" in line and "label 18" in line and "10 classes" in line
    assert "--model" in line and "--data" in line and "num_classes must" not in line
