"""Memory-based certification: sound certificates when the smoothing scales depend on x.

When the noise scale θ(x) is chosen per input (DDRS, ANCER), the classifier that is certified
at x, g_θ(x), changes with x: two certified regions of different classes may overlap, and
then no single classifier agrees with both. DDRS (Alfarra et al. 2022; see docs/design.md,
References) restores soundness with a memory, and ANCER (Eiras et al. 2022) uses it for
anisotropic regions. Inputs are certified in a fixed
order; the memory keeps (x_i, region_i, class_i) for every input answered with a region, and
defines the classifier G that is actually certified:

1. **Override.** If x lies in a stored region_j of another class c_j (x is decided by an
   earlier certificate), G(x) = c_j, and the region answered is the largest scaled copy,
   centered at x, of x's own region (of region_j's shape when x's certificate abstained)
   that lies inside region_j. Sound: it lies in region_j, on which G = c_j. For two l2 balls
   this is DDRS's ball of radius R_j − ||x − x_j||. The copy is computed by bisection on
   ``Region.contains_region``, exact for every same-norm axis-aligned pair (ellipsoid or
   ball in ellipsoid: a trust-region problem; cross-polytope in cross-polytope: a closed
   form), so no pair the memory can hold needs an abstention here; a region of another norm
   cannot enter the memory (ArgumentError). The override region is not stored: it lies
   inside region_j, which is.
2. **Shrink.** Else, if x's region R (class c) intersects stored regions of other classes,
   R is scaled down about x, same shape, to the largest copy that intersects none of them
   (each factor proven by an exact separation test, the smallest taken). Sound: a smaller
   region inside R is still certified by x's own smoothing, and G = c on it is consistent
   with every earlier region. If the factor vanishes (x on an earlier region's boundary,
   within the numerical margin) the answer is an abstention.
3. Else R is **kept**. Kept and shrunk regions are stored; abstentions never are.

Invariant: stored regions of different classes are pairwise disjoint, so G is well defined
on their union and every answered region is one on which G is constant. Soundness of each
stored region with respect to its own smoothing holds with probability 1 − α per input, as
for any randomized-smoothing certificate.

Exact separation tests (``regions_intersect``, ``largest_disjoint_scale``), after a cheap
pre-filter on bounding l2 balls (``Region.bounding_radius`` and the distance of centers):

- l2 (balls and axis-aligned ellipsoids alike): E_k = {z : q_k(z) <= 1}, q_k(z) =
  ||(z − c_k)/a_k||². By convex duality E_1 ∩ E_2 ≠ ∅ iff max_{t∈[0,1]} φ(t) <= 1, φ(t) =
  min_z [t q_1(z) + (1 − t) q_2(z)] = Σ_i δ_i² t(1 − t) / ((1 − t) a_1i² + t a_2i²), δ = c_1 −
  c_2, a concave function of one variable maximized with ``scipy.optimize.minimize_scalar``.
  Any t with φ(t) > 1 proves disjointness, so a numerical shortfall can only report an
  intersection (and shrink more), never miss one.
- l1 (balls and generalized cross-polytopes alike): the gauge of P_2 from c_1,
  s* = min_{z∈P_2} ||(z − c_1)/a_1||_1, so that s·P_1 ∩ P_2 = ∅ iff s < s*. It is a linear
  program (checked against ``scipy.optimize.linprog`` in the tests) solved here in closed
  form: z moves from c_2 towards c_1 coordinatewise, each unit of |z_i − c_2i|/a_2i of
  P_2's budget buying a_2i/a_1i of gauge, so the greedy fractional-knapsack order by
  a_2i/a_1i is optimal.

Decisions carry a relative margin of 1e-9 on the side of intersection.
"""
from __future__ import annotations

import math
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple, Union

import numpy as np
import torch
from scipy.optimize import minimize_scalar

from ancer.certificates import L1Ball, L2Ball, Region, make_region
from ancer.atomic import save_atomically
from ancer.errors import ArgumentError, ResultsError
from ancer.labels import ABSTAIN
from ancer.noise import Noise
from ancer.stats import certifies
from ancer.vocabulary import ABSTAINED, KEPT, MEMORY_ACTIONS, NORMS, OVERRIDDEN, SHRUNK

#: relative margin of every separation decision, taken on the side of intersection
MARGIN = 1e-9

#: bisection steps for the scale factors (2^-50 of the starting interval)
BISECTION_STEPS = 50

Key = Optional[Union[int, str]]


# -- exact tests on pairs of regions ---------------------------------------------------------
def _check_pair(first: Region, second: Region) -> None:
    for region in (first, second):
        if not isinstance(region, Region):
            raise ArgumentError(f"expected an ancer.certificates.Region, got {type(region).__name__}")
    if first.norm != second.norm:
        raise ArgumentError(
            f"regions of different norms ({first.norm}, {second.norm}) have no exact test here; "
            "keep one norm per memory"
        )
    if first.center.shape != second.center.shape:
        raise ArgumentError(
            f"regions live in different spaces: {tuple(first.center.shape)} and {tuple(second.center.shape)}"
        )


def _arrays(first: Region, second: Region) -> tuple:
    delta = (first.center.to(torch.float64) - second.center.to(torch.float64)).flatten().numpy()
    return delta, first.semi_axes.flatten().numpy(), second.semi_axes.flatten().numpy()


def _ellipsoid_separation(delta: np.ndarray, a: np.ndarray, b: np.ndarray) -> float:
    """max over t ∈ [0, 1] of φ(t) = Σ δ² t(1 − t) / ((1 − t) a² + t b²), the dual value of
    min_z max(q_1(z), q_2(z)) for axis-aligned ellipsoids with semi-axes a, b and δ = c_1 − c_2
    (φ is concave: a minimum of functions affine in t). > 1 iff the ellipsoids are disjoint."""
    d2, a2, b2 = delta**2, a**2, b**2

    def negative_phi(t: float) -> float:
        return -float(np.sum(d2 * (t * (1.0 - t)) / ((1.0 - t) * a2 + t * b2)))

    result = minimize_scalar(negative_phi, bounds=(0.0, 1.0), method="bounded",
                             options={"xatol": 1e-12})
    return -float(result.fun)


def _cross_polytope_gauge(delta: np.ndarray, a: np.ndarray, b: np.ndarray) -> float:
    """s* = min over z ∈ P_2 = {||(z − c_2)/b||_1 <= 1} of ||(z − c_1)/a||_1 (|δ| = |c_1 − c_2|):
    the smallest s for which s·P_1 meets P_2. Fractional knapsack: moving z_i by u_i ∈ [0, |δ_i|]
    from c_2 towards c_1 gains u_i/a_i of gauge for u_i/b_i of P_2's unit budget; take the
    coordinates by decreasing b_i/a_i."""
    distance = np.abs(delta)
    cost = distance / b  # budget to move coordinate i all the way to c_1
    if cost.sum() <= 1.0:
        return 0.0  # c_1 lies in P_2
    order = np.argsort(-(b / a), kind="stable")
    cost, gain = cost[order], (distance / a)[order]
    spent = np.cumsum(cost)
    full = int(np.searchsorted(spent, 1.0, side="right"))  # coordinates moved all the way
    left = 1.0 - (spent[full - 1] if full else 0.0)
    bought = gain[:full].sum() + left * (gain[full] / cost[full])
    return float(max(gain.sum() - bought, 0.0))


def regions_intersect(first: Region, second: Region) -> bool:
    """Whether two regions of the same norm share a point (exactly, up to the margin, which
    errs towards True). Bounding l2 balls are compared first."""
    _check_pair(first, second)
    distance = float(torch.linalg.vector_norm((first.center - second.center).to(torch.float64)))
    if distance > (first.bounding_radius + second.bounding_radius) * (1.0 + MARGIN):
        return False
    delta, a, b = _arrays(first, second)
    if first.norm == "l2":
        return _ellipsoid_separation(delta, a, b) <= 1.0 + MARGIN
    return _cross_polytope_gauge(delta, a, b) <= 1.0 + MARGIN


def largest_disjoint_scale(region: Region, other: Region) -> float:
    """The largest s in [0, 1] such that ``region`` scaled by s about its center is proven
    disjoint from ``other`` (1.0 if they are disjoint already; 0.0 if the center is within
    the margin of ``other``). l2: bisection on the exact test; l1: the gauge, in closed form."""
    _check_pair(region, other)
    if not regions_intersect(region, other):
        return 1.0
    delta, a, b = _arrays(region, other)
    if region.norm == "l1":
        return _cross_polytope_gauge(delta, a, b) / (1.0 + 2.0 * MARGIN)
    low, high = 0.0, 1.0  # disjoint at low (the center alone, outside ``other``), not at high
    if float(np.sum(delta**2 / b**2)) <= 1.0 + MARGIN:
        return 0.0
    for _ in range(BISECTION_STEPS):
        middle = 0.5 * (low + high)
        if _ellipsoid_separation(delta, a * middle, b) > 1.0 + MARGIN:
            low = middle
        else:
            high = middle
    return low


def largest_inside_scale(outer: Region, center: torch.Tensor, semi_axes: torch.Tensor) -> float:
    """The largest t >= 0 (by bisection, keeping the side that is inside) such that the region
    of ``outer``'s norm centered at ``center`` with semi-axes t·``semi_axes`` lies in ``outer``;
    0.0 when ``center`` is not inside. Each step evaluates exactly what
    ``Region.contains_region`` compares (the farthest point of the candidate in ``outer``'s
    normalized coordinates), with the margin on the inside instead of its 1e-12 tolerance."""
    axes = torch.as_tensor(semi_axes, dtype=torch.float64).expand(outer.center.shape).flatten()
    if not bool(outer.contains(center)) or not bool((axes > 0).all()):
        return 0.0
    outer_axes = outer.semi_axes.flatten()
    shift = ((torch.as_tensor(center).to(torch.float64) - outer.center.to(torch.float64)).flatten()
             / outer_axes).numpy()
    ratio = (axes / outer_axes).numpy()
    low, high = 0.0, float(1.0 / ratio.max())  # no copy wider than ``outer`` fits
    for _ in range(BISECTION_STEPS):
        middle = 0.5 * (low + high)
        if outer.max_normalized_norm(shift, ratio * middle) <= 1.0 - MARGIN:
            low = middle
        else:
            high = middle
    return low


# -- the memory ------------------------------------------------------------------------------
@dataclass
class MemoryOutcome:
    """The memory's answer for one input: ``label`` (or ABSTAIN), the answered ``region``,
    the ``action`` taken (kept, shrunk, overridden, abstained), ``factor`` (the answered
    region's scale relative to the input's own certified region: 1 kept, s < 1 shrunk; for
    an override relative to the shape it copies) and ``source`` (the memory index of the
    region that decided an override, and ``source_key`` that region's key, e.g. the
    dataset index of the input that decided)."""

    label: int
    region: Optional[Region]
    action: str
    factor: float
    source: Optional[int] = None
    source_key: Key = None

    @property
    def abstained(self) -> bool:
        return self.label == ABSTAIN

    @property
    def radius(self) -> float:
        """The proxy radius (min semi-axis); 0.0 on abstention."""
        return 0.0 if self.region is None else self.region.proxy_radius

    @property
    def proxy_radius(self) -> float:
        return self.radius

    @property
    def volume_radius(self) -> float:
        return 0.0 if self.region is None else self.region.volume_radius

    @property
    def log_volume(self) -> float:
        return -math.inf if self.region is None else self.region.log_volume

    @property
    def summary(self) -> str:
        """The answer in one word, as results files record it: ``kept``, ``shrunk:<factor>``,
        ``override:<key of the deciding input>`` or ``abstain``."""
        if self.action == SHRUNK:
            return f"shrunk:{self.factor!r}"
        if self.action == OVERRIDDEN:
            return f"override:{self.source_key}"
        return "abstain" if self.action == ABSTAINED else KEPT


def _centered_at(region: Region, center: torch.Tensor) -> Region:
    """A region of ``region``'s shape and size about ``center``."""
    if isinstance(region, (L2Ball, L1Ball)):
        return type(region)(center, region.radius)
    return type(region)(center, region.semi_axes)


def _rescaled(region: Region, factor: float) -> Region:
    """``region`` scaled about its center, a ball staying a ball."""
    if isinstance(region, (L2Ball, L1Ball)):
        return type(region)(region.center, region.radius * factor)
    return region.scaled(factor)


class Memory:
    """The memory of certified regions for one run (one norm), in certification order.

    Call :meth:`certify` once per input, in a fixed order, with the input and its own
    certificate (label and region, or ABSTAIN and None); it applies the override and shrink
    rules of the module docstring and returns a :class:`MemoryOutcome`. ``counts`` tallies
    inputs, kept, shrunk, overridden and abstained answers, and the exact tests run after
    the bounding-ball pre-filter. :meth:`save` and :meth:`load` persist the memory so that a
    resumed job continues it identically.
    """

    VERSION = 1

    def __init__(self, norm: str) -> None:
        if norm not in NORMS:
            raise ArgumentError(f"norm must be one of {', '.join(map(repr, NORMS))}, got {norm!r}")
        self.norm = norm
        self.regions: List[Region] = []
        self.labels: List[int] = []
        self.keys: List[Key] = []
        self.processed: List[Key] = []
        self.counts: Dict[str, int] = {"inputs": 0, KEPT: 0, SHRUNK: 0, OVERRIDDEN: 0,
                                       ABSTAINED: 0, "exact_tests": 0}
        self._centers: Optional[torch.Tensor] = None  # (capacity, d), rows [0, len) in use
        self._bounding = torch.empty(0, dtype=torch.float64)

    def __len__(self) -> int:
        return len(self.regions)

    # -- the rules -----------------------------------------------------------------------
    def certify(self, x: torch.Tensor, label: int, region: Optional[Region], key: Key = None) -> MemoryOutcome:
        """The memory's answer for input ``x`` whose own certificate is (``label``, ``region``)
        (``label`` = ABSTAIN and ``region`` = None on abstention); stores the answered region
        unless it abstains or overrides. ``key`` (e.g. the dataset index) is recorded."""
        x = self._check(x, label, region)
        label = int(label)
        override = self._override(x, label, region)
        if override is not None:
            outcome = override
        elif label == ABSTAIN:
            outcome = MemoryOutcome(ABSTAIN, None, ABSTAINED, math.nan)
        else:
            outcome = self._shrink(label, region)
        if outcome.action in (KEPT, SHRUNK):
            self._store(outcome.region, outcome.label, key)
        self.counts["inputs"] += 1
        self.counts[outcome.action] += 1
        self.processed.append(key)
        return outcome

    def _override(self, x: torch.Tensor, label: int, region: Optional[Region]) -> Optional[MemoryOutcome]:
        """Rule 1: the answer when x lies in a stored region of another class, else None."""
        best: Optional[MemoryOutcome] = None
        for j in self._near(x, 0.0):
            if self.labels[j] == label:
                continue
            self.counts["exact_tests"] += 1
            stored = self.regions[j]
            if not bool(stored.contains(x)):
                continue
            template = _centered_at(stored, x) if region is None else region
            factor = largest_inside_scale(stored, x, template.semi_axes)
            answer = _rescaled(template, factor)
            if best is None or answer.log_volume > best.region.log_volume:
                best = MemoryOutcome(self.labels[j], answer, OVERRIDDEN, factor, source=j,
                                     source_key=self.keys[j])
        return best

    def _shrink(self, label: int, region: Region) -> MemoryOutcome:
        """Rules 2 and 3: R scaled down to be disjoint from every stored region of another
        class; an abstention if nothing of it remains."""
        factor = 1.0
        for j in self._near(region.center, region.bounding_radius):
            if self.labels[j] == label:
                continue
            self.counts["exact_tests"] += 1
            factor = min(factor, largest_disjoint_scale(region, self.regions[j]))
        if factor == 1.0:
            return MemoryOutcome(label, region, KEPT, 1.0)
        if factor <= 0.0:
            return MemoryOutcome(ABSTAIN, None, ABSTAINED, 0.0)
        return MemoryOutcome(label, _rescaled(region, factor), SHRUNK, factor)

    def _near(self, center: torch.Tensor, bounding: float) -> List[int]:
        """Indices of stored regions whose bounding l2 ball meets the ball of radius
        ``bounding`` about ``center`` (the pre-filter; generous by the margin)."""
        if not self.regions:
            return []
        point = center.flatten().to(torch.float64)
        rows = max(1, (1 << 22) // point.numel())  # at most 4M float64 entries at once
        distances = torch.cat([
            torch.linalg.vector_norm(self._centers[low:min(low + rows, len(self))].to(torch.float64) - point, dim=1)
            for low in range(0, len(self), rows)
        ])
        near = distances <= (self._bounding + bounding) * (1.0 + MARGIN) + MARGIN
        return near.nonzero().flatten().tolist()

    # -- storage -------------------------------------------------------------------------
    def _check(self, x: torch.Tensor, label: int, region: Optional[Region]) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise ArgumentError(f"x must be a torch.Tensor, got {type(x).__name__}")
        x = x.detach().to("cpu")
        if isinstance(label, bool) or int(label) != label or label < ABSTAIN:
            raise ArgumentError(f"label must be a class index >= 0 or ABSTAIN (-1), got {label!r}")
        if (label == ABSTAIN) != (region is None):
            raise ArgumentError("give a region with a class label, and region=None with ABSTAIN")
        if region is not None:
            if not isinstance(region, Region) or region.norm != self.norm:
                raise ArgumentError(
                    f"this memory holds {self.norm} regions, got {getattr(region, 'norm', region)!r}: "
                    "keep one memory per norm"
                )
            if region.center.shape != x.shape or not torch.equal(region.center, x.to(region.center.dtype)):
                raise ArgumentError("the region must be centered at x (the certified input)")
            if not bool((region.semi_axes > 0).all()):
                raise ArgumentError("a certified region must have semi-axes > 0")
        if self.regions and x.shape != self.regions[0].center.shape:
            raise ArgumentError(
                f"input of shape {tuple(x.shape)} in a memory of inputs of shape "
                f"{tuple(self.regions[0].center.shape)}"
            )
        return x

    def _store(self, region: Region, label: int, key: Key) -> None:
        flat = region.center.flatten()
        if self._centers is None:
            self._centers = torch.empty((16, flat.numel()), dtype=flat.dtype)
        if len(self) == len(self._centers):
            grown = torch.empty((2 * len(self), flat.numel()), dtype=self._centers.dtype)
            grown[:len(self)] = self._centers
            self._centers = grown
        self._centers[len(self)] = flat
        self._bounding = torch.cat([self._bounding, torch.tensor([region.bounding_radius], dtype=torch.float64)])
        self.regions.append(region)
        self.labels.append(label)
        self.keys.append(key)

    def report(self) -> Dict[str, int]:
        """The counters and the number of stored regions."""
        return {**self.counts, "stored": len(self)}

    @staticmethod
    def describe(report: Dict[str, int]) -> str:
        """A :meth:`report` in one line."""
        counts = ", ".join(f"{report[name]} {name}" for name in MEMORY_ACTIONS)
        return (f"memory: {report['inputs']} inputs: {counts} ({report['exact_tests']} exact "
                f"tests, {report['stored']} regions stored)")

    def save(self, path: Union[str, Path]) -> None:
        """Write the memory to ``path`` atomically (a temporary file in the same folder, then
        ``os.replace``), so a crash never leaves a half-written memory; a missing folder is
        created."""
        path = Path(path)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise ResultsError(f"cannot create the folder {path.parent} of the memory file "
                               f"{path} ({error.strerror}): give a path in a writable folder"
                               ) from None
        state = {
            "version": self.VERSION,
            "norm": self.norm,
            "centers": torch.stack([region.center for region in self.regions]) if self.regions else None,
            "semi_axes": [
                torch.tensor(region.radius, dtype=torch.float64) if isinstance(region, (L2Ball, L1Ball))
                else region.semi_axes.clone()
                for region in self.regions
            ],
            "labels": list(self.labels),
            "keys": list(self.keys),
            "processed": list(self.processed),
            "counts": dict(self.counts),
        }
        save_atomically(path, state)

    @classmethod
    def load(cls, path: Union[str, Path]) -> "Memory":
        """The memory saved at ``path`` by :meth:`save`."""
        try:
            state = torch.load(Path(path), map_location="cpu", weights_only=True)
        except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as error:
            raise ResultsError(f"cannot read the memory file {path}: {error}; delete it to start afresh") from error
        if not isinstance(state, dict) or state.get("version") != cls.VERSION:
            raise ResultsError(f"{path} is not an ancer memory file of version {cls.VERSION}")
        memory = cls(state["norm"])
        for i, axes in enumerate(state["semi_axes"]):
            center = state["centers"][i]
            region = make_region(memory.norm, center, float(axes) if axes.dim() == 0 else axes)
            memory._store(region, int(state["labels"][i]), state["keys"][i])
        memory.processed = list(state["processed"])
        memory.counts = dict(state["counts"])
        return memory


# -- a run certified without its memory: the memory's pass made afterwards -------------------
@dataclass(frozen=True)
class OwnCertificate:
    """An input's own certificate as a run that skipped the memory records it (the shards of
    a sharded run): ``key`` (the input's place in the certification order, e.g. its dataset
    index), the input ``x``, its ``label`` (or ABSTAIN), the lower bound ``p_lower`` and the
    ``noise`` it was certified with (its own scales). ``radius``, the proxy radius recorded
    with it, checks that noise, input and bound are the certificate's."""

    key: int
    x: torch.Tensor
    label: int
    p_lower: float
    noise: Noise
    radius: float

    def region(self) -> Optional[Region]:
        """The certified region, rebuilt as CERTIFY built it: ``noise.region(x, p_lower)``
        (None on abstention); ResultsError when it is not the recorded one."""
        if self.label == ABSTAIN:
            return None
        if not certifies(self.p_lower):
            raise ResultsError(f"idx {self.key}: class {self.label} with p_lower "
                               f"{self.p_lower!r} <= 1/2 is not a certificate: the row is "
                               "corrupt; certify it again")
        region = self.noise.region(self.x, self.p_lower)
        if region.proxy_radius != self.radius:
            raise ResultsError(f"idx {self.key}: its scales give radius {region.proxy_radius!r}, "
                               f"its row {self.radius!r}: the scales or settings belong to "
                               "another run; merge only the files of one run")
        return region


def replay(norm: str, certificates: List[OwnCertificate]
           ) -> Tuple["Memory", List[MemoryOutcome]]:
    """The memory's pass over own certificates made without it, in key order: (the memory
    after the pass, each certificate's :class:`MemoryOutcome` in key order).

    ``Noise.region`` is the function CERTIFY itself calls, so from the same input, bound and
    scales it rebuilds the same region bit for bit; the memory, given the same certificates
    in the same order, answers as it does in a run that certifies the inputs one after
    another in that order (:meth:`ancer.engine.Certifier.certify_batch`). This is how the
    shards of a data-dependent run are answered when they are merged."""
    memory = Memory(norm)
    ordered = sorted(certificates, key=lambda certificate: certificate.key)
    outcomes = [memory.certify(c.x, c.label, c.region(), key=c.key) for c in ordered]
    return memory, outcomes
