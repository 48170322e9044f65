"""The library's engine (``ancer.Certifier``): one object for every method, the one the
command line runs.

- The command line's rows equal the engine's certificates, for isotropic, dds and ancer, l2
  and l1: ``certify/`` adds files, not method logic.
- A config is validated once, each bad field named in one line.
- Through the engine, with the memory on, certificates of a linear classifier (closed-form
  smoothed probability and distance to the boundary) are wrong at most as often as alpha
  allows.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import binom

from ancer import ABSTAIN, ArgumentError, Certifier, CertifyConfig, TrainConfig, load_model
from ancer.training_methods import Macer
from ancer.memory import KEPT, Memory
from ancer.results import read_results
from linear_models import Linear, inputs_at_margins
from cli_helpers import certify, dataset_tensors, make_files

SMALL = dict(n0=50, n=200, batch=200)
OPTIMIZER = dict(opt_iterations=3, opt_samples=16)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return make_files(tmp_path_factory.mktemp("engine"))


def _cli_flags(config: CertifyConfig) -> list[str]:
    flags = ["--sigma", repr(config.sigma), "--norm", config.norm, "--method", config.method,
             "--n0", str(config.n0), "--n", str(config.n), "--batch", str(config.batch)]
    if config.method != "isotropic":
        flags += ["--opt-iterations", str(config.opt_iterations),
                  "--opt-samples", str(config.opt_samples)]
    return flags


@pytest.mark.parametrize("norm_name", ["l2", "l1"])
@pytest.mark.parametrize("method", ["isotropic", "dds", "ancer"])
def test_cli_rows_equal_the_engine_certificates(files, tmp_path, method, norm_name):
    options = {} if method == "isotropic" else OPTIMIZER
    config = CertifyConfig(sigma=0.25, norm=norm_name, method=method, **SMALL, **options)
    out = tmp_path / "run.tsv"
    group, count = 3, 7
    assert certify("--model", str(files["model"]), "--data", str(files["data"]), "--quiet",
                   "--max", str(count), "--inputs-per-batch", str(group), "--out", str(out),
                   *_cli_flags(config)) == 0
    table = read_results(out)
    engine = Certifier(load_model(files["model"]), config)
    xs, labels = dataset_tensors(files["data"])
    certificates = []
    for start in range(0, count, group):
        indices = list(range(start, min(start + group, count)))
        certificates += engine.certify_batch(xs[indices], indices)
    assert len(table) == count
    for row, certificate in enumerate(certificates):
        assert table.columns["predict"][row] == certificate.label
        assert table.columns["radius"][row] == certificate.radius
        assert table.columns["log_volume"][row] == certificate.log_volume
        assert table.columns["p_lower"][row] == certificate.p_lower
        assert table.columns["samples"][row] == certificate.samples == config.n0 + config.n
        if method == "isotropic":
            assert certificate.memory is None and table.columns["memory"][row] == "-"
        else:
            assert table.columns["memory"][row] == certificate.memory.summary
    assert (table.columns["predict"] != ABSTAIN).any()


def test_one_input_equals_its_place_in_a_batch(files):
    xs, _ = dataset_tensors(files["data"])
    engine = Certifier(load_model(files["model"]), CertifyConfig(sigma=0.25, **SMALL))
    batch = engine.certify_batch(xs[:4], [10, 11, 12, 13])
    alone = engine.certify(xs[2], idx=12)
    assert (alone.label, alone.p_lower, alone.radius) == (batch[2].label, batch[2].p_lower,
                                                         batch[2].radius)
    np.testing.assert_array_equal(alone.counts, batch[2].counts)


def test_ancer_certificate_carries_scales_and_memory(files):
    xs, _ = dataset_tensors(files["data"])
    engine = Certifier(load_model(files["model"]),
                       CertifyConfig(sigma=0.25, method="ancer", **SMALL, **OPTIMIZER))
    answers = [engine.certify(xs[i], idx=i) for i in range(4)]
    for certificate in answers:
        assert certificate.noise.sigma.shape == xs[0].shape
        assert bool((certificate.noise.sigma >= 0.25 - 1e-7).all())
        assert certificate.start_sigma == pytest.approx(0.25)
    actions = [c.memory.action for c in answers]
    first = next(i for i, c in enumerate(answers) if c.label != ABSTAIN)
    assert actions[first] == KEPT and set(actions[:first]) <= {"abstained"}
    assert engine.memory.processed == [0, 1, 2, 3]


BAD_FIELDS = [
    ({"sigma": 0}, "sigma"), ({"sigma": -1}, "sigma"), ({"sigma": "x"}, "sigma"),
    ({"alpha": 1.5}, "alpha"), ({"alpha": 0}, "alpha"), ({"n0": 0}, "n0"), ({"n": 2.5}, "n"),
    ({"norm": "linf"}, "norm"), ({"method": "ddrs"}, "method"), ({"precision": "fp8"}, "precision"),
    ({"compile": "yes"}, "compile"), ({"batch": 0}, "batch"), ({"seed": 1.5}, "seed"),
    ({"theta0": "dds"}, "theta0"), ({"opt_lr": 0.1}, "method"),
    ({"method": "dds", "kappa": 2.0}, "kappa"), ({"radii": (0.5,)}, "radii"),
    ({"sequential": True}, "radii"), ({"sequential": True, "radii": (0.5, 0.25)}, "radii"),
    ({"sequential": True, "radii": (-0.5,)}, "radii"), ({"sequential": True, "radii": ()}, "radii"),
]


@pytest.mark.parametrize("fields, named", BAD_FIELDS)
def test_each_bad_field_is_named_in_one_line(fields, named):
    with pytest.raises(ArgumentError) as caught:
        CertifyConfig(**{"sigma": 0.25, **fields})
    message = str(caught.value)
    assert message.startswith(f"CertifyConfig.{named}:") and "\n" not in message


def test_config_takes_numpy_scalars_and_integral_floats_as_the_types_it_stores():
    config = CertifyConfig(sigma=np.float32(0.5), n=np.int64(1000), n0=1e2, batch=np.float64(64))
    assert (config.sigma, config.n, config.n0, config.batch) == (0.5, 1000, 100, 64)
    assert type(config.sigma) is float and {type(config.n), type(config.n0), type(config.batch)} == {int}
    with pytest.raises(ArgumentError, match=r"^CertifyConfig.n0: True is not an integer >= 1; "
                                            r"give an integer >= 1, e.g. n0=100$"):
        CertifyConfig(sigma=0.25, n0=True)


def test_certify_and_train_configs_share_one_validator():
    """One definition of "an integer >= 1" (ancer.validate): the same value gets the same
    words whichever config it is given to."""
    with pytest.raises(ArgumentError) as bad_n:
        CertifyConfig(sigma=0.25, n=0)
    with pytest.raises(ArgumentError) as bad_epochs:
        TrainConfig(sigma=0.25, epochs=0)
    problem = "0 is not an integer >= 1; give an integer >= 1"
    assert str(bad_n.value) == f"CertifyConfig.n: {problem}, e.g. n=100000"
    assert str(bad_epochs.value) == f"TrainConfig.epochs: {problem}"
    # and both store what they checked as plain Python numbers (numpy ones would not go
    # into a JSON history or a checkpoint's record)
    config = TrainConfig(sigma=np.float32(0.25), epochs=np.int64(3), method=Macer(draws=np.int64(4)))
    assert (type(config.sigma), type(config.epochs), type(config.method.draws)) == (float, int, int)


def test_config_is_frozen_and_replace_validates_again():
    config = CertifyConfig(sigma=0.25)
    with pytest.raises(AttributeError):
        config.sigma = 0.5
    assert config.replace(n=10).n == 10
    with pytest.raises(ArgumentError, match="CertifyConfig.n:"):
        config.replace(n=0)


def test_engine_refuses_a_plain_module_without_classes_and_a_memory_of_another_norm(files):
    module = torch.jit.load(str(files["model"]))
    with pytest.raises(ArgumentError, match="num_classes"):
        Certifier(module, CertifyConfig(sigma=0.25))
    with pytest.raises(ArgumentError, match="l1"):
        Certifier(module, CertifyConfig(sigma=0.25, method="dds"), 3, memory=Memory("l1"))


class ProbabilityModel(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(x.flatten(1)[:, :3] * 10, dim=1)


def test_a_probability_model_said_to_give_logits_is_detected():
    engine = Certifier(ProbabilityModel(), CertifyConfig(sigma=0.25, method="dds", **SMALL,
                                                         **OPTIMIZER), 3)
    with pytest.warns(UserWarning, match="probabilities"):
        engine.certify(torch.full((3, 2, 2), 0.5), idx=0)


@pytest.mark.filterwarnings("ignore::ancer.smoothing.InputRangeWarning")
def test_linear_classifier_through_the_engine_with_the_memory_is_sound():
    """dds on a linear classifier: each answered ball must hold the smoothed class of its
    σ(x) and stay inside the boundary (distance |w·x + b| / ||w||), except with probability
    alpha per input; the memory's answers must keep regions of different classes apart."""
    torch.manual_seed(0)
    d, alpha, trials = 6, 0.05, 120
    w, b = torch.randn(d), 0.1
    margins = torch.linspace(-1.0, 1.0, trials) * float(w.norm())
    xs = inputs_at_margins(w, b, margins)
    config = CertifyConfig(sigma=0.3, method="dds", n0=50, n=2000, alpha=alpha, batch=4000,
                           opt_iterations=5, opt_samples=32, seed=3)
    engine = Certifier(Linear(w, b), config, 2)
    certificates = engine.certify_batch(xs, list(range(trials)))
    violations = answered = 0
    for margin, certificate in zip(margins.tolist(), certificates):
        if certificate.label == ABSTAIN:
            continue
        answered += 1
        distance = abs(margin) / float(w.norm())
        violations += certificate.label != int(margin >= 0) or certificate.radius > distance
    assert violations <= binom.ppf(0.999, trials, alpha)
    assert answered > trials // 2
    assert engine.memory.counts["inputs"] == trials
    sigma = np.array([float(c.noise.sigma) for c in certificates])
    assert sigma.std() > 0  # the scales really are data-dependent


def test_compile_auto_on_a_cpu_follows_the_planned_forward_passes(files):
    from ancer.engine import CPU_COMPILE_BREAK_EVEN

    module = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3))
    config = CertifyConfig(sigma=0.25)
    assert Certifier(module, config, 3).compiled is False  # nothing planned: eager
    assert Certifier(module, config, 3, planned_samples=CPU_COMPILE_BREAK_EVEN - 1).compiled is False
    assert Certifier(module, config, 3, planned_samples=CPU_COMPILE_BREAK_EVEN).compiled is True
    assert Certifier(module, config.replace(compile="off"), 3, planned_samples=10**9).compiled is False
    scripted = load_model(files["model"])  # TorchScript cannot be compiled: stays eager
    assert Certifier(scripted, config, planned_samples=10**9).compiled is False


@pytest.mark.parametrize("make, method, says", [
    (lambda x: x[None], "certify", "takes 3×H×W, got shape (1, 3, 8, 8): pass x[0], or use certify_batch"),
    (lambda x: x.permute(1, 2, 0), "certify", "channels last (H×W×C); pass x.permute(2, 0, 1)"),
    (lambda x: (x * 255).to(torch.uint8), "certify", "dtype torch.uint8, but the model takes float "
                                                    "pixels in [0, 1]"),
    (lambda x: x, "certify_batch", "takes B×3×H×W, got shape (3, 8, 8): pass x[None], or use certify(x)"),
    (lambda x: x[None].permute(0, 2, 3, 1), "certify_batch", "channels last (B×H×W×C)"),
])
def test_an_input_the_model_cannot_take_gets_one_clear_error(files, make, method, says):
    xs, _ = dataset_tensors(files["data"])
    engine = Certifier(load_model(files["model"]), CertifyConfig(sigma=0.25, **SMALL))
    with pytest.raises(ArgumentError) as caught:
        getattr(engine, method)(make(xs[0]))
    assert says in str(caught.value) and "\n" not in str(caught.value)


def test_sequential_through_smoothed_certify_equals_its_place_in_a_batch(files):
    from ancer.seeding import input_generator
    from ancer.vocabulary import GROUP_SEQUENTIAL

    xs, _ = dataset_tensors(files["data"])
    engine = Certifier(load_model(files["model"]), CertifyConfig(sigma=0.25))
    smoothed, radii = engine.smoothed, (0.25, 0.5)
    batch = smoothed.certify_batch(xs[:3], 50, 5000, 0.001, 1000, sequential=True, radii=radii,
                                   generators=[input_generator(0, i) for i in range(3)])
    alone = smoothed.certify(xs[1], 50, 5000, 0.001, 1000, generator=input_generator(0, 1),
                             sequential=True, radii=radii)
    assert alone.bound == GROUP_SEQUENTIAL and alone.n < 5000
    assert (alone.label, alone.p_lower, alone.n) == (batch[1].label, batch[1].p_lower, batch[1].n)
    assert alone.selected == int(np.argmax(alone.selection_counts))


def test_the_engine_settings_are_what_a_results_file_records(files):
    engine = Certifier(load_model(files["model"]),
                       CertifyConfig(sigma=0.25, norm="l1", method="ancer", **SMALL, **OPTIMIZER))
    settings = engine.settings()
    assert settings["half_width"] == pytest.approx(0.25 * 3 ** 0.5)
    assert settings["optimizer"] == {"iterations": 3, "lr": 0.04, "samples": 16, "kappa": 2.0,
                                     "theta0": "sigma"}
    assert {"norm", "method", "sigma", "n0", "n", "alpha", "batch", "sequential", "radii",
            "precision", "seed", "fold_bn"} <= set(settings)


def test_the_vocabulary_is_the_one_the_parts_use():
    import dataclasses

    from ancer.noise import NOISES
    from ancer.vocabulary import METHODS, NORMS, default_radii
    from certify.cli import DEFAULTS, run_parser

    assert tuple(NOISES) == NORMS
    choices = {a.dest: a.choices for a in run_parser()._actions if a.choices}
    assert tuple(choices["norm"]) == NORMS and tuple(choices["method"]) == METHODS
    defaults = {f.name: f.default for f in dataclasses.fields(CertifyConfig)}
    parsed = run_parser().parse_args([])
    for name in ("norm", "method", "n0", "n", "alpha", "batch", "precision", "seed"):
        assert getattr(parsed, name) == defaults[name] == DEFAULTS[name]
    assert default_radii(0.25) == (0.25, 0.5, 0.75)
