"""Sequential CERTIFY through ``Smoothed``, the engine and the command line.

The guarantee under optional stopping is checked where it can fail: linear classifiers whose
smoothed probability p_A and distance to the boundary are known in closed form, with p_A set
just above each grid threshold, where an invalid bound would certify too large a radius.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import binom, norm

from ancer import ABSTAIN, Certifier, CertifyConfig, Gaussian, Smoothed, Uniform, load_model
from ancer.seeding import input_generator
from ancer.results import read_results, read_sidecar
from linear_models import Linear, inputs_at_margins
from cli_helpers import certify, dataset_tensors, make_files, rows_without_time

vector_inputs = pytest.mark.filterwarnings("ignore::ancer.smoothing.InputRangeWarning")


@vector_inputs
@pytest.mark.parametrize("family", ["gaussian", "uniform"])
def test_sequential_radii_are_sound_just_above_every_threshold(family):
    torch.manual_seed(5)
    d, sigma, alpha, trials = 6, 0.25, 0.1, 240
    radii = (0.1, 0.2, 0.3)
    w, b = torch.randn(d), 0.05
    noise = Gaussian(sigma) if family == "gaussian" else Uniform(sigma)
    # p_A a hair above each threshold, and a spread between them
    levels = [noise.probability_for_radius(r) for r in radii]
    p = np.concatenate([np.array(levels) + 0.004, np.linspace(0.52, 0.995, trials - 3)])[:trials]
    p = np.resize(p, trials)
    if family == "gaussian":
        margins = torch.as_tensor(norm.ppf(p) * sigma * float(w.norm()), dtype=torch.float32)
        reach = lambda radius: radius * float(w.norm())  # noqa: E731
    else:  # a boundary along one axis: P = 1/2 + m / (2λ|w_k|), l1 distance m / |w_k|
        w = torch.zeros(d)
        w[2] = 1.5
        half = float(noise.half_width)
        margins = torch.as_tensor((p - 0.5) * 2 * half * 1.5, dtype=torch.float32)
        reach = lambda radius: radius * 1.5  # noqa: E731
    xs = inputs_at_margins(w, b, margins)
    smoothed = Smoothed(Linear(w, b), noise, 2)
    certificates = smoothed.certify_batch(
        xs, 50, 20_000, alpha, 20_000, generators=[input_generator(7, i) for i in range(trials)],
        sequential=True, radii=radii)
    violations = 0
    for margin, certificate in zip(margins.tolist(), certificates):
        assert certificate.bound == "group-sequential"
        assert certificate.samples == 50 + certificate.n <= 50 + 20_000
        if certificate.label == ABSTAIN:
            continue
        violations += certificate.label != 1 or reach(certificate.radius) > margin
    assert violations <= binom.ppf(0.999, trials, alpha)
    spent = np.array([c.samples for c in certificates])
    assert spent.mean() < 0.6 * (50 + 20_000)  # stopping early is the point


@vector_inputs
def test_sequential_stops_early_and_agrees_with_fixed_n_on_clear_inputs():
    torch.manual_seed(6)
    d, sigma = 6, 0.25
    w, b = torch.randn(d), 0.0
    p = torch.tensor([0.2, 0.9, 0.999999])  # class 0 (p_A 0.8), certified at 0.25, past 0.75
    margins = torch.as_tensor(norm.ppf(p.numpy()) * sigma * float(w.norm()), dtype=torch.float32)
    xs = inputs_at_margins(w, b, margins)
    smoothed = Smoothed(Linear(w, b), Gaussian(sigma), 2)
    generators = lambda: [input_generator(1, i) for i in range(3)]  # noqa: E731
    sequential = smoothed.certify_batch(xs, 100, 100_000, 0.001, 10_000, generators(),
                                        sequential=True, radii=(0.25, 0.5, 0.75))
    fixed = smoothed.certify_batch(xs, 100, 100_000, 0.001, 10_000, generators())
    assert [c.label for c in sequential] == [c.label for c in fixed] == [0, 1, 1]
    for s, f in zip(sequential, fixed):
        assert sum(r <= s.radius for r in (0.25, 0.5, 0.75)) == sum(r <= f.radius for r in (0.25, 0.5, 0.75))
    assert sequential[0].samples < 5_000 and sequential[2].samples < 20_000
    assert all(c.samples == 100_100 for c in fixed)


@vector_inputs
def test_an_input_certifies_the_same_alone_or_packed_with_others():
    torch.manual_seed(8)
    w = torch.randn(5)
    xs = torch.rand(5, 5)
    smoothed = Smoothed(Linear(w, 0.1), Gaussian(0.5), 2)
    together = smoothed.certify_batch(xs, 30, 5000, 0.01, 700,
                                      [input_generator(2, i) for i in range(5)],
                                      sequential=True, radii=(0.2, 0.4))
    for i in range(5):
        alone = smoothed.certify_batch(xs[i:i + 1], 30, 5000, 0.01, 700,
                                       [input_generator(2, i)], sequential=True, radii=(0.2, 0.4))[0]
        assert (alone.label, alone.p_lower, alone.n) == (together[i].label, together[i].p_lower,
                                                        together[i].n)
        np.testing.assert_array_equal(alone.counts, together[i].counts)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return make_files(tmp_path_factory.mktemp("sequential"))


def _argv(files, out, *more):
    return ["--model", str(files["model"]), "--data", str(files["data"]), "--sigma", "0.25",
            "--n0", "50", "--n", "4000", "--batch", "1000", "--quiet", "--sequential",
            "--radii", "0.1,0.2,0.3", "--out", str(out), *more]


@pytest.mark.parametrize("method", ["isotropic", "ancer"])
def test_cli_sequential_rows_equal_the_engine_and_resume(files, tmp_path, method):
    extra = ("--method", "ancer", "--opt-iterations", "3", "--opt-samples", "16") \
        if method == "ancer" else ()
    out = tmp_path / "seq.tsv"
    assert certify(*_argv(files, out, "--max", "9", "--inputs-per-batch", "3", *extra)) == 0
    table = read_results(out)
    settings = read_sidecar(out).settings
    assert settings["sequential"] is True and settings["radii"] == [0.1, 0.2, 0.3]
    assert set(table.columns["bound"]) == {"group-sequential"}
    assert (table.columns["samples"] < 50 + 4000).any()
    config = CertifyConfig(sigma=0.25, n0=50, n=4000, batch=1000, sequential=True,
                           radii=(0.1, 0.2, 0.3), method=method,
                           **({"opt_iterations": 3, "opt_samples": 16} if extra else {}))
    engine = Certifier(load_model(files["model"]), config)
    xs, _ = dataset_tensors(files["data"])
    certificates = [c for start in (0, 3, 6)
                    for c in engine.certify_batch(xs[start:start + 3], range(start, start + 3))]
    assert list(table.columns["predict"]) == [c.label for c in certificates]
    assert list(table.columns["radius"]) == [c.radius for c in certificates]
    assert list(table.columns["samples"]) == [c.samples for c in certificates]
    # a grown selection continues the same run: its rows are the first run's, then the rest
    assert certify(*_argv(files, out, "--max", "12", "--inputs-per-batch", "3", *extra)) == 0
    grown = rows_without_time(out)
    assert len(grown) == 12 and grown[:9] == rows_without_time(out)[:9]


@pytest.mark.parametrize("radii, words", [
    ("0.3,0.1", "increasing"), ("-0.1,0.2", "> 0"), ("a,b", "numbers"), ("5,6", "no radius"),
])
def test_bad_radii_get_one_line(files, tmp_path, capsys, radii, words):
    argv = _argv(files, tmp_path / "bad.tsv")
    del argv[argv.index("--radii"):argv.index("--radii") + 2]
    assert certify(*argv, f"--radii={radii}") == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and error.startswith("certify: error:")
    assert "--radii" in error
    assert words in error
    assert not (tmp_path / "bad.tsv").exists()


def test_radii_without_sequential_is_refused(files, tmp_path, capsys):
    argv = _argv(files, tmp_path / "bad.tsv")
    argv.remove("--sequential")
    assert certify(*argv) == 2
    assert "--radii steers --sequential" in capsys.readouterr().err


def test_sequential_shards_merge_to_the_single_process_rows(files, tmp_path):
    single, sharded = tmp_path / "single.tsv", tmp_path / "sharded.tsv"
    more = ("--max", "12", "--inputs-per-batch", "2")
    assert certify(*_argv(files, single, *more)) == 0
    for shard in ("0/3", "1/3", "2/3"):
        assert certify(*_argv(files, sharded, *more, "--shard", shard)) == 0
    assert certify("merge", "--out", str(sharded)) == 0
    assert rows_without_time(sharded) == rows_without_time(single)
