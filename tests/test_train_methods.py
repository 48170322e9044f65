"""Tests of the certified-training objectives (ancer.training_methods) against closed forms
and hand computations, and of their use through ancer.train and ``certify train``."""
import math

import pytest
import torch
from scipy.stats import norm
from torch import nn

from ancer import load_model
from ancer.errors import ArgumentError
from ancer.models import registry
from ancer.noise import Gaussian, Uniform
from ancer.train import TrainConfig, train
from ancer.training_methods import (Consistency, GaussianAugmentation, Macer, SmoothAdv,
                                    consistency_terms, macer_terms, make_method,
                                    project_l1_ball, smooth_pgd, smoothed_nll)
from certify.cli import main as certify_main
from test_train import TINY, _colors, _npz_args, _TinyNet  # noqa: F401  (fixture below)


@pytest.fixture(autouse=True)
def tiny_arch(monkeypatch):
    monkeypatch.setitem(registry.ARCHITECTURES, TINY,
                        registry.Architecture(_TinyNet, "cifar10", "tiny test network"))


def _linear_two_class(w: torch.Tensor) -> nn.Module:
    """Logits (w·x, −w·x): class 0 iff w·x > 0."""
    model = nn.Linear(len(w), 2, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.stack([w, -w]))
    return model


# -- MACER -------------------------------------------------------------------------------
def test_macer_hinge_matches_the_closed_form_of_a_linear_model():
    """Under N(0, σ²I), f(x + δ) = class 0 with probability p = Φ(w·x / (σ‖w‖)); with a
    large β the soft classifier is the hard one, so ξ = Φ⁻¹(p) − Φ⁻¹(1 − p) = 2Φ⁻¹(p) and
    the hinge is (σ/2)(γ − 2Φ⁻¹(p)) while 2Φ⁻¹(p) ≤ γ."""
    sigma, w = 0.5, torch.tensor([3.0, 4.0])  # ‖w‖ = 5
    ps = torch.tensor([0.6, 0.8, 0.9])
    x = (torch.from_numpy(norm.ppf(ps.numpy())).float() * sigma * 5)[:, None] * w / 25
    model = _linear_two_class(w)
    method = Macer(draws=40_000, beta=1e4, gamma=8.0, lbd=1.0)
    generator = torch.Generator().manual_seed(0)
    _, terms, _ = method.step_loss(model, x, torch.zeros(3, dtype=torch.long), Gaussian(sigma),
                                   generator, epoch=0)
    expected = sum(sigma / 2 * (8.0 - 2 * norm.ppf(p)) for p in ps.tolist()) / 3
    assert float(terms["hinge"]) == pytest.approx(expected, abs=0.03)


def test_macer_terms_by_hand_and_the_inputs_the_hinge_skips():
    """Two classes, k = 2 draws with given logits: q, ξ, the CE and which inputs count."""
    sigma, beta, gamma = 0.25, 2.0, 1.0
    # per input (rows), per draw: logit of class 0 (class 1 has logit 0)
    a = torch.tensor([[0.2, 0.4],     # correct, small gap: in the hinge
                      [3.0, 5.0],     # correct, gap > γ: skipped
                      [-0.3, -0.1],   # misclassified by q: skipped
                      [0.2, 0.4]])    # label 1: misclassified: skipped
    y = torch.tensor([0, 0, 0, 1])
    logits = torch.stack([a.T, torch.zeros_like(a.T)], dim=-1)  # (k, N, 2)
    terms = macer_terms(logits, y, sigma, beta, gamma)
    q0 = torch.sigmoid(beta * a).mean(1)
    xi = norm.ppf(q0.numpy()) - norm.ppf(1 - q0.numpy())
    assert xi[0] < gamma < xi[1]
    assert float(terms["hinge"]) == pytest.approx(sigma / 2 * (gamma - xi[0]) / 4, rel=1e-5)
    p_y = torch.where(y == 0, torch.sigmoid(a).mean(1), 1 - torch.sigmoid(a).mean(1))
    assert float(terms["ce"]) == pytest.approx(float(-torch.log(p_y + 1e-10).mean()), rel=1e-6)


def test_macer_gradient_is_finite_when_the_soft_classifier_saturates():
    logits = torch.tensor([[[60.0, -60.0], [0.1, 0.0]]] * 4, requires_grad=True)  # q_y = 1 and ~1/2
    terms = macer_terms(logits, torch.tensor([0, 0]), 0.25, 16.0, 8.0)
    (terms["ce"] + terms["hinge"]).backward()
    assert torch.isfinite(logits.grad).all() and float(terms["hinge"].detach()) > 0


# -- consistency -------------------------------------------------------------------------
def test_consistency_kl_is_zero_when_the_copies_agree():
    logits = torch.randn(1, 5, 4).repeat(3, 1, 1)
    terms = consistency_terms(logits, torch.arange(5) % 4)
    assert float(terms["kl"]) == pytest.approx(0.0, abs=1e-6)
    p = torch.softmax(logits[0], -1)
    assert float(terms["entropy"]) == pytest.approx(float(-(p * p.log()).sum(-1).mean()), rel=1e-5)


def test_consistency_loss_by_hand():
    """Copies p1 = (0.5, 0.5), p2 = (0.9, 0.1), label 0: p̄ = (0.7, 0.3)."""
    p1, p2, mean = (0.5, 0.5), (0.9, 0.1), (0.7, 0.3)
    logits = torch.log(torch.tensor([[p1], [p2]]))
    terms = consistency_terms(logits, torch.tensor([0]))
    kl = sum(sum(m * math.log(m / p[c]) for c, m in enumerate(mean)) for p in (p1, p2)) / 2
    entropy = -sum(m * math.log(m) for m in mean)
    ce = -(math.log(0.5) + math.log(0.9)) / 2
    assert [float(terms[k]) for k in ("ce", "kl", "entropy")] == pytest.approx([ce, kl, entropy])

    class Fixed(nn.Module):  # the two copies' logits whatever the input
        def forward(self, x):
            return logits.reshape(2, 2)

    loss, _, predicted = Consistency(copies=2, lbd=20.0, eta=0.5).step_loss(
        Fixed(), torch.zeros(1, 3), torch.tensor([0]), Gaussian(0.25), None, epoch=0)
    assert float(loss) == pytest.approx(ce + 20 * kl + 0.5 * entropy)
    assert predicted.tolist() == [[0], [0]]


def test_consistency_lambda_default_depends_on_sigma():
    assert Consistency.for_sigma(0.25).lbd == 20.0 and Consistency.for_sigma(0.5).lbd == 10.0
    assert Consistency.for_sigma(0.25, lbd=3.0).lbd == 3.0


# -- SmoothAdv ---------------------------------------------------------------------------
@pytest.mark.parametrize("norm, p, epsilon", [("l2", 2, 0.5), ("l1", 1, 4.0)])
def test_smoothadv_attack_beats_a_random_direction_and_stays_in_the_ball(norm, p, epsilon):
    torch.manual_seed(0)
    model = _TinyNet(3).eval()
    x, y = torch.rand(16, 3, 8, 8), torch.randint(0, 3, (16,))
    draws = 0.25 * torch.randn(4, *x.shape, generator=torch.Generator().manual_seed(1))
    adversarial = smooth_pgd(model, x, y, draws, epsilon, steps=10, norm=norm)
    moved = (adversarial - x).flatten(1).norm(p=p, dim=1)
    assert (moved <= epsilon * (1 + 1e-5)).all() and moved.max() > epsilon / 2
    assert adversarial.min() >= 0 and adversarial.max() <= 1
    direction = torch.randn(x.shape, generator=torch.Generator().manual_seed(2))
    direction *= (moved / direction.flatten(1).norm(p=p, dim=1)).view(-1, 1, 1, 1)
    with torch.no_grad():
        attacked = smoothed_nll(model, adversarial, y, draws)
        randomly = smoothed_nll(model, (x + direction).clamp(0, 1), y, draws)
        clean = smoothed_nll(model, x, y, draws)
    assert (attacked > randomly).all() and (attacked > clean).all()
    assert not model.training


def test_l1_projection_by_hand_and_against_its_optimality_conditions():
    v = torch.tensor([[3.0, 1.0, 0.0], [1.0, -1.0, 0.0], [0.2, -0.3, 0.1]])
    w = project_l1_ball(v, 1.0)
    torch.testing.assert_close(w, torch.tensor([[1.0, 0.0, 0.0], [0.5, -0.5, 0.0],
                                                [0.2, -0.3, 0.1]]))
    v = torch.randn(20, 50, generator=torch.Generator().manual_seed(0))
    w = project_l1_ball(v, 3.0)
    assert torch.allclose(w.abs().sum(1), torch.full((20,), 3.0), atol=1e-4)
    # KKT: v − w = θ·sign(w) on w's support and |v| <= θ off it, for one θ >= 0 per input
    theta = ((v - w).abs() * (w != 0)).amax(1, keepdim=True)
    assert torch.allclose(((v - w) * w.sign())[w != 0], theta.expand_as(w)[w != 0], atol=1e-5)
    assert (v.abs()[w == 0] <= theta.expand_as(w)[w == 0] + 1e-5).all()


def test_smoothadv_warms_up_its_radius():
    method = SmoothAdv(epsilon=0.5, warmup=4)
    assert [method.radius(t) for t in range(6)] == pytest.approx([0.125, 0.25, 0.375, 0.5, 0.5, 0.5])


# -- training with each method -----------------------------------------------------------
METHODS = [Consistency(lbd=5.0), Macer(draws=4), SmoothAdv(steps=2, warmup=2),
           SmoothAdv(steps=2, copies=2, multi_noise=False)]


def _config(method, **kw):
    return TrainConfig(**{**dict(sigma=0.25, epochs=2, batch_size=16, lr=0.05, method=method), **kw})


@pytest.mark.parametrize("method", METHODS, ids=lambda m: m.describe())
def test_training_is_deterministic_and_resume_equals_an_uninterrupted_run(tmp_path, method):
    data = _colors(48)
    whole = train(TINY, data, tmp_path / "a.pt", _config(method))
    again = train(TINY, data, tmp_path / "b.pt", _config(method))
    train(TINY, data, tmp_path / "c.pt", _config(method), until=1)
    resumed = train(TINY, data, tmp_path / "c.pt", _config(method), resume=True)
    for other in (again, resumed):
        for (name, a), b in zip(whole.model.state_dict().items(), other.model.state_dict().values()):
            assert torch.equal(a, b), name
    assert [h.terms for h in resumed.history] == [h.terms for h in whole.history]
    assert set(whole.history[0].terms) == {"consistency": {"ce", "kl", "entropy"},
                                           "macer": {"ce", "hinge"}}.get(method.name, {"ce"})
    saved = torch.load(tmp_path / "a.pt", weights_only=True)
    assert saved["method"] == method.record() and saved["config"]["method"] == method.record()
    assert load_model(tmp_path / "a.pt").sigma == 0.25


def test_resume_refuses_another_method(tmp_path):
    train(TINY, _colors(48), tmp_path / "a.pt", _config(Macer(draws=2)), until=1)
    with pytest.raises(ArgumentError, match="trained with method=macer with draws=2"):
        train(TINY, _colors(48), tmp_path / "a.pt", _config(Macer(draws=3)), resume=True)


def test_init_starts_from_the_checkpoint_and_checks_it(tmp_path):
    data = _colors(48)
    first = train(TINY, data, tmp_path / "a.pt", _config(GaussianAugmentation(), lr=0.2))
    tuned = train(TINY, data, tmp_path / "b.pt", _config(Consistency(), lr=1e-12),
                  init=tmp_path / "a.pt")  # a learning rate of ~0 keeps the init's weights
    for (name, a), b in zip(first.model.state_dict().items(), tuned.model.state_dict().values()):
        if "running" not in name and "tracked" not in name:  # BN statistics still move
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    assert torch.load(tmp_path / "b.pt", weights_only=True)["init"] == str(tmp_path / "a.pt")
    with pytest.warns(UserWarning, match="was trained at sigma 0.25, training now at sigma 0.5"):
        train(TINY, data, tmp_path / "c.pt", _config(GaussianAugmentation(), sigma=0.5, epochs=1),
              init=tmp_path / "a.pt")
    with pytest.raises(ArgumentError, match="has 3 classes, the training set 2"):
        train(TINY, _colors(48, classes=2), tmp_path / "d.pt", _config(GaussianAugmentation()),
              init=tmp_path / "a.pt")


@pytest.mark.parametrize("bad, says", [
    (lambda: Macer(lbd=-1), "lbd must be"), (lambda: Macer(beta=-1), "beta must be"),
    (lambda: Macer(gamma=-0.5), "gamma must be"), (lambda: SmoothAdv(epsilon=-1), "epsilon must be"),
    (lambda: Macer(draws=0), "draws must be"), (lambda: Consistency(copies=1), "copies must be"),
    (lambda: SmoothAdv(steps=0), "steps must be"), (lambda: Consistency(eta=-1), "eta must be"),
    (lambda: make_method("mixup", 0.25), "method must be one of"),
    (lambda: make_method("consistency", 0.25, beta=2.0), "beta applies to method=macer only"),
    (lambda: TrainConfig(sigma=0.25, noise="uniform", method=Macer()), "Gaussian smoothing"),
])
def test_bad_hyperparameters_are_refused(bad, says):
    with pytest.raises(ArgumentError, match=says):
        bad()


@pytest.mark.parametrize("method", [Consistency(), SmoothAdv(steps=2, warmup=1)],
                         ids=lambda m: m.name)
def test_uniform_noise_works_with_the_methods_that_have_a_form_for_it(tmp_path, method):
    result = train(TINY, _colors(48), tmp_path / "u.pt",
                   _config(method, noise="uniform", epochs=1))
    assert math.isfinite(result.history[0].loss)


def test_smoothadv_attacks_in_the_norm_of_the_noise(monkeypatch):
    """Uniform noise: the l1 attack, whose perturbations keep l1 norm <= ε; Gaussian noise:
    the l2 attack, whose perturbations of l2 norm up to ε have l1 norm far above ε."""
    import ancer.training_methods as methods
    model, x, y = _TinyNet(3), torch.rand(4, 3, 8, 8), torch.tensor([0, 1, 2, 0])
    method, epsilon = SmoothAdv(epsilon=2.0, steps=5, copies=2, warmup=1), 2.0
    attacked = []
    monkeypatch.setattr(methods, "smooth_pgd",
                        lambda *a, **kw: attacked.append(smooth_pgd(*a, **kw)) or attacked[-1])
    for noise in (Uniform(0.25), Gaussian(0.25)):
        method.step_loss(model, x, y, noise, torch.Generator().manual_seed(0), epoch=0)
    l1_uniform, l1_gaussian = ((a - x).flatten(1).norm(p=1, dim=1) for a in attacked)
    assert (l1_uniform <= epsilon * (1 + 1e-5)).all() and l1_uniform.max() > epsilon / 2
    assert (l1_gaussian > 2 * epsilon).all()


# -- certify train -----------------------------------------------------------------------
@pytest.mark.parametrize("extra, says", [
    (["--method", "mixup"], "--method: invalid choice"),
    (["--method", "macer", "--lbd", "-1"], "--lbd must be"),
    (["--method", "macer", "--beta", "-2"], "--beta must be"),
    (["--method", "macer", "--gamma", "-2"], "--gamma must be"),
    (["--method", "smoothadv", "--epsilon", "-1"], "--epsilon must be"),
    (["--method", "macer", "--draws", "0"], "--draws must be"),
    (["--method", "consistency", "--copies", "1"], "--copies must be"),
    (["--method", "smoothadv", "--attack-steps", "0"], "--attack-steps must be"),
    (["--method", "consistency", "--beta", "2"], "--beta applies to --method macer only"),
    (["--method", "macer", "--noise", "uniform"],
     "--method macer is defined for Gaussian smoothing (l2) only; use --noise gaussian"),
])
def test_certify_train_method_errors_name_the_flags(tmp_path, capsys, extra, says):
    assert certify_main(_npz_args(tmp_path) + extra) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("certify: error: ") and says in err, err
    assert "_" not in err.replace(str(tmp_path), "").replace("tiny_test_net", ""), err


def test_certify_train_methods_and_init(tmp_path, capsys):
    args = _npz_args(tmp_path)
    assert certify_main(args + ["--method", "macer", "--draws", "2", "--lbd", "3"]) == 0
    saved = torch.load(tmp_path / "m.pth.tar", weights_only=True)
    assert saved["method"] == Macer(draws=2, lbd=3.0).record()
    out = str(tmp_path / "m.pth.tar")
    tuned = [a if a != out else str(tmp_path / "t.pth.tar") for a in args]
    sigma = tuned.index("--sigma")
    tuned[sigma + 1] = "0.25"
    assert certify_main(tuned + ["--method", "smoothadv", "--attack-steps", "1", "--init", out]) == 0
    err = capsys.readouterr().err
    assert err.count("warning") == 1 and "trained at sigma 0.5, training now at sigma 0.25" in err
    assert load_model(tmp_path / "t.pth.tar").sigma == 0.25
    other = [a if a != out else str(tmp_path / "o.pth.tar") for a in args]
    other[other.index("--arch") + 1] = "cifar_resnet20"
    assert certify_main(other + ["--init", out]) == 2
    assert "--init" in capsys.readouterr().err
