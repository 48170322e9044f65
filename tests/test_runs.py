"""A run over a dataset (``ancer.runs``): fixed groups, a shard's share, resume, and the
memory's pass over raw shard certificates, on a linear classifier.

- The shards' groups partition the inputs; each shard takes the groups i mod k.
- The shards' raw certificates, answered by ``answer_raw``, equal one run's certificates
  bit for bit (dds, with the memory), and so do a stopped run's once resumed, a cut group
  certified whole again.
- ``answer_raw`` refuses raw certificates that do not cover the run's inputs exactly, or
  whose labels are not the data's; a saved memory goes on only a run whose first inputs it
  answered.
"""
from __future__ import annotations

import pytest
import torch

from ancer import ArgumentError, Certifier, CertifyConfig, ResultsError
from ancer.memory import Memory
from ancer.runs import (RawCertificate, answer_raw, certify_dataset, memory_continues,
                        shard_groups)
from linear_models import Linear, inputs_at_margins

SIGMA = 0.3
CONFIG = CertifyConfig(sigma=SIGMA, method="dds", n0=50, n=300, batch=600, opt_iterations=3,
                       opt_samples=16, seed=5)


class Points:
    """Inputs at known margins of a linear classifier, with dataset indices 10, 11, ..."""

    def __init__(self, count: int) -> None:
        torch.manual_seed(1)
        self.w, self.b = torch.randn(4), 0.05
        margins = torch.linspace(-0.8, 0.8, count) * float(self.w.norm())
        self.xs = inputs_at_margins(self.w, self.b, margins)
        self.labels = [int(m >= 0) for m in margins.tolist()]
        self.indices = list(range(10, 10 + count))
        self.name = "points"

    def __len__(self) -> int:
        return len(self.xs)

    def __getitem__(self, position: int):
        return self.xs[position], self.labels[position]


def _engine(points: Points, config: CertifyConfig = CONFIG, memory=None) -> Certifier:
    return Certifier(Linear(points.w, points.b), config, 2, memory=memory)


def _flat(groups) -> list:
    return [item for group in groups for item in group]


def _answers(items) -> list:
    return [(i.idx, i.certificate.label, i.certificate.radius, i.certificate.p_lower,
             i.certificate.memory.summary) for i in items]


def test_shards_take_fixed_groups_that_partition_the_inputs():
    shares = [shard_groups(10, 3, (i, 3)) for i in range(3)]
    assert [[list(g) for g in share] for share in shares] == [
        [[0, 1, 2], [9]], [[3, 4, 5]], [[6, 7, 8]]]
    assert sorted(p for share in shares for g in share for p in g) == list(range(10))
    assert [list(g) for g in shard_groups(10, 3)] == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9]]
    assert shard_groups(2, 3, (1, 2)) == []
    for size, shard in [(0, None), (2.0, None), (3, (2, 2)), (3, (-1, 2))]:
        with pytest.raises(ArgumentError, match="group size|a shard is"):
            shard_groups(10, size, shard)


def test_raw_shard_certificates_answered_in_order_equal_one_run():
    points = Points(7)
    single = _engine(points)
    one_run = _flat(certify_dataset(single, points, size=2))
    assert [i.idx for i in one_run] == points.indices and not any(i.again for i in one_run)
    raw = []
    for shard in [(0, 2), (1, 2)]:
        for item in _flat(certify_dataset(_engine(points), points, size=2, shard=shard)):
            c = item.certificate
            assert c.memory is None  # a shard's own certificate, not sound alone
            raw.append(RawCertificate(item.idx, item.label, c.label, c.p_lower, c.radius,
                                      c.noise.sigma))
    memory, outcomes = answer_raw(points, "l2", SIGMA, list(reversed(raw)))
    assert [(o.label, o.radius, o.summary) for o in outcomes] == [
        (i.certificate.label, i.certificate.radius, i.certificate.memory.summary) for i in one_run]
    assert memory.processed == single.memory.processed
    assert memory.report() == single.memory.report()


def test_a_stopped_run_resumes_to_the_uninterrupted_certificates(tmp_path):
    points = Points(6)
    one_run = _flat(certify_dataset(_engine(points), points, size=2))
    engine = _engine(points)
    first = next(certify_dataset(engine, points, size=2))
    engine.memory.save(tmp_path / "memory.pt")
    # stopped after the first group's memory was saved and idx 12's row written
    done = {points.indices[p] for p in (0, 1, 2)}
    memory = Memory.load(tmp_path / "memory.pt")
    assert memory_continues(memory, "l2", points.indices[:3])
    resumed = _flat(certify_dataset(_engine(points, memory=memory), points, size=2, done=done))
    assert [(i.idx, i.again) for i in resumed] == [(12, True), (13, False), (14, False),
                                                   (15, False)]
    assert _answers(first + resumed) == _answers(one_run)  # idx 12 again, as before


def test_without_a_memory_only_the_groups_not_done_are_certified_again():
    points = Points(5)
    config = CertifyConfig(sigma=SIGMA, n0=50, n=300, batch=600, seed=5)
    one_run = _flat(certify_dataset(_engine(points, config), points, size=2))
    resumed = _flat(certify_dataset(_engine(points, config), points, size=2, done={10, 11, 12}))
    assert [(i.idx, i.again) for i in resumed] == [(12, True), (13, False), (14, False)]
    assert [(i.certificate.label, i.certificate.radius) for i in resumed] == [
        (i.certificate.label, i.certificate.radius) for i in one_run[2:]]


def test_answer_raw_needs_every_input_once_with_its_label():
    points = Points(3)
    raw = [RawCertificate(idx, label, -1, 0.0, 0.0, SIGMA)
           for idx, label in zip(points.indices, points.labels)]
    with pytest.raises(ResultsError, match="idx 11 .* has no row yet"):
        answer_raw(points, "l2", SIGMA, raw[::2])
    with pytest.raises(ResultsError, match="idx 99 is not among the run's inputs"):
        answer_raw(points, "l2", SIGMA, raw + [RawCertificate(99, 0, -1, 0.0, 0.0, SIGMA)])
    wrong = RawCertificate(10, 1 - points.labels[0], -1, 0.0, 0.0, SIGMA)
    with pytest.raises(ResultsError, match="idx 10 has label"):
        answer_raw(points, "l2", SIGMA, [wrong] + raw[1:])
    memory, outcomes = answer_raw(points, "l2", SIGMA, raw)  # all abstained: nothing stored
    assert [o.abstained for o in outcomes] == [True] * 3 and memory.processed == points.indices


def test_a_saved_memory_goes_on_only_the_run_it_began():
    memory = Memory("l2")
    memory.processed = [5, 7]
    assert memory_continues(memory, "l2", [5, 7, 9])
    assert not memory_continues(memory, "l2", [7, 5, 9])
    assert not memory_continues(memory, "l2", [5])
    assert not memory_continues(memory, "l1", [5, 7])
