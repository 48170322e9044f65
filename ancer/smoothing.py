"""The smoothed classifier g(x) = argmax_c P(f(x + ε) = c): PREDICT and CERTIFY.

Follows the pseudocode of Cohen et al. 2019, §3.2 (see docs/design.md, References), and their
``code/core.py``:

CERTIFY(f, σ, x, n0, n, α)
    counts0 ← SAMPLEUNDERNOISE(f, x, n0, σ);  ĉ_A ← top index in counts0
    counts  ← SAMPLEUNDERNOISE(f, x, n, σ)    (fresh draws, independent of counts0)
    p_A ← LOWERCONFBOUND(counts[ĉ_A], n, 1 − α)   (one-sided Clopper-Pearson)
    if p_A > 1/2: return ĉ_A and the region the noise certifies at p_A; else ABSTAIN

PREDICT(f, σ, x, n, α)
    counts ← SAMPLEUNDERNOISE(f, x, n, σ);  n_A, n_B ← the top two counts
    if BINOMPVALUE(n_A, n_A + n_B, 0.5) <= α: return ĉ_A; else ABSTAIN

The region is an l2 ball for isotropic Gaussian noise (Cohen et al. 2019), an l1 ball for
uniform noise (Yang et al. 2020), and an ellipsoid or generalized cross-polytope for
per-dimension scales (ANCER, Eiras et al. 2022).

SAMPLEUNDERNOISE here draws noise on the model's device straight into one reused buffer,
packs the samples of several inputs into one forward batch, counts votes on the device, and
copies counts to the host once per phase. Each input's noise comes from its own generator in
chunks whose sizes depend only on (num, batch_size), so an input's certificate does not depend
on which other inputs share its batches. The forward pass itself (batch norm folded,
compiled, CUDA graphs, padded batches) is ``ancer.accelerate`` and ``ancer.folding``.

What is certified is what runs: inputs, scales and noisy copies x + ε are float32 about
the exact (float32) x, whatever the model's weights are stored in; a lower precision lives
only inside the model, under autocast, and is named by ``Certificate.precision``; "fp32"
runs without TF32 (``ancer.accelerate.strict_fp32``).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from ancer.accelerate import (INPUT_DTYPE, BatchRunner, Compile, check_compile, check_precision,
                              strict_fp32)
from ancer.certificates import Region
from ancer.devices import model_device, model_dtype
from ancer.errors import ArgumentError
from ancer.folding import count_batchnorm, fold_batchnorm
from ancer.labels import ABSTAIN
from ancer.noise import Noise
from ancer.sequential import PREDICTION_LEVEL, SequentialPlan
from ancer.stats import (certifies, check_alpha, check_count, clopper_pearson_lower,
                         predict_decides)
from ancer.vocabulary import CLOPPER_PEARSON, GROUP_SEQUENTIAL

if TYPE_CHECKING:
    from ancer.memory import MemoryOutcome

ProgressCallback = Callable[[int], None]


class InputRangeWarning(UserWarning):
    """An input lies outside [0, 1], the pixel range every ancer model expects."""


@dataclass(frozen=True)
class Certificate:
    """The outcome of CERTIFY for one input (immutable; derive variants with
    ``dataclasses.replace``).

    ``label`` is the certified class or ``ABSTAIN``; ``region`` the certified region (None on
    abstention); ``p_lower`` the one-sided (1 − alpha) lower bound on the selected class's
    probability from the ``n`` estimation draws, computed by ``bound`` (Clopper-Pearson for
    fixed-n CERTIFY); ``counts`` the estimation votes per class and ``selection_counts`` the
    n0 selection votes (kept so that a radius can be recomputed for another alpha without
    sampling again). ``precision`` names how the base classifier was evaluated ("fp32",
    "bf16" or "fp16"): the certificate is about the model as evaluated in that precision.
    ``samples`` is the number of forward passes spent on this input (n0 + n for fixed-n
    CERTIFY); ``memory`` what memory-based certification answered for it (DDRS,
    Alfarra et al. 2022), None unless a memory was used;
    ``start_sigma`` the isotropic σ that per-dimension scales were optimized from (ANCER's
    θ_iso), None otherwise.
    """

    label: int
    p_lower: float
    region: Optional[Region]
    norm: str
    counts: np.ndarray
    selection_counts: np.ndarray
    n0: int
    n: int
    alpha: float
    precision: str
    noise: Noise = field(repr=False)
    samples: int
    bound: str = CLOPPER_PEARSON
    memory: Optional["MemoryOutcome"] = None
    start_sigma: Optional[float] = None

    @property
    def abstained(self) -> bool:
        return self.label == ABSTAIN

    @property
    def selected(self) -> int:
        """The class selected from the n0 selection draws (ĉ_A), whose estimation votes
        ``p_lower`` bounds; it is ``label`` unless CERTIFY (or the memory) abstained."""
        return int(np.argmax(self.selection_counts))

    @property
    def anisotropic(self) -> bool:
        """Whether the noise has one scale per dimension (ANCER), so that the region is an
        ellipsoid or a cross-polytope rather than a ball."""
        return not self.noise.isotropic

    @property
    def radius(self) -> float:
        """The certified radius: the ball's radius, or for an anisotropic region the radius of
        the largest l_p ball inside (the proxy radius); 0.0 on abstention (Cohen et al.)."""
        return 0.0 if self.region is None else self.region.proxy_radius

    @property
    def proxy_radius(self) -> float:
        return 0.0 if self.region is None else self.region.proxy_radius

    @property
    def volume_radius(self) -> float:
        return 0.0 if self.region is None else self.region.volume_radius

    @property
    def log_volume(self) -> float:
        return float("-inf") if self.region is None else self.region.log_volume


def _chunk_sizes(num: int, batch_size: int) -> List[int]:
    """The sizes in which one input's ``num`` draws are made: full batches, then the rest."""
    sizes = [batch_size] * (num // batch_size)
    if num % batch_size:
        sizes.append(num % batch_size)
    return sizes


def _pack(nums: Sequence[int], batch_size: int) -> List[List[tuple]]:
    """Forward batches as lists of (input, chunk size) for ``nums[i]`` draws of input i: whole
    chunks, in input order, as many per batch as fit in ``batch_size``."""
    batches, current, filled = [], [], 0
    for index, num in enumerate(nums):
        for size in _chunk_sizes(num, batch_size):
            if filled + size > batch_size:
                batches.append(current)
                current, filled = [], 0
            current.append((index, size))
            filled += size
    if current:
        batches.append(current)
    return batches


def sequential_plan(noise: Noise, budget: int, alpha: float, radii: Sequence[float]) -> SequentialPlan:
    """The plan of sequential CERTIFY for an input smoothed with ``noise``: its thresholds are
    the p_A each radius needs (``Noise.probability_for_radius``: Φ(r / min θ) or
    1/2 + r / (2 min λ), the same function of p_A for balls, ellipsoids and cross-polytopes,
    and the region certified at a threshold has proxy radius >= r in floating point too).
    Radii no p_A < 1 reaches are dropped, and so are radii so small that a prediction
    (p_A > 1/2) already certifies them; when none is left, the plan stops as soon as the
    input is certified at all."""
    if not radii:
        raise ArgumentError("sequential certification needs radii (e.g. radii=(0.25, 0.5, 0.75)): "
                            "the grid whose certified level decides when an input stops")
    thresholds = sorted({noise.probability_for_radius(r) for r in radii})
    return SequentialPlan(alpha, budget, tuple(t for t in thresholds if PREDICTION_LEVEL < t < 1.0))


class Smoothed:
    """A base classifier ``model`` smoothed with ``noise``: g(x) = argmax_c P(f(x + ε) = c).

    ``model`` maps a batch of inputs in [0, 1] to ``num_classes`` scores (logits or
    probabilities: only the argmax is used). It is run in eval mode under
    ``torch.inference_mode``. Options (all keep the smoothed classifier that of ``model``):

    - ``precision``: "fp32" (default), "bf16" or "fp16" (autocast). In bf16 or fp16 the
      certificate holds for the model *as evaluated in that precision*, which is a slightly
      different classifier; ``Certificate.precision`` says which one was certified. Inputs
      and noise stay float32 in every precision. A model whose weights are stored in bf16
      or fp16 must be given that precision (else ArgumentError: pass it, or
      ``model.float()``). "fp32" runs with TF32 off, the caller's settings restored after.
    - ``fold_bn`` (default True): evaluate a copy of ``model`` with each batch norm folded
      into the convolution before it (``ancer.folding``). The folded network computes the
      same function; in fp32 its scores differ from the original's by float rounding
      (about 1e-6 relative), so only an input whose top two scores tie to that precision
      can vote differently. ``model`` itself is never modified; a model without batch norm
      is used as it is.
    - ``channels_last``: convert the model's weights to that memory format (faster
      convolutions on GPUs with tensor cores and on CPUs with oneDNN); noisy inputs stay
      contiguous, where noise is drawn fastest.
    - ``compile``: True runs the model through ``torch.compile``, "auto" (default) does so
      on CUDA only, False never; a failure to compile falls back to eager with a warning.
    - ``cuda_graphs`` (default False; CUDA only): replay each full-batch forward from a
      recorded CUDA graph, removing kernel-launch overhead.
    - ``pad_batches``: pad a partial last batch to the full batch shape so compiled code and
      graphs see one shape; only the real rows are counted. None (default) pads exactly when
      compiling or using CUDA graphs.

    ``batch_size`` of the methods below may be None: on CUDA the largest batch (up to
    2048) that fits half the free memory, else 1000.
    """

    def __init__(
        self,
        model: nn.Module,
        noise: Noise,
        num_classes: int,
        *,
        precision: str = "fp32",
        channels_last: bool = False,
        device: Optional[torch.device] = None,
        fold_bn: bool = True,
        compile: Compile = "auto",
        cuda_graphs: bool = False,
        pad_batches: Optional[bool] = None,
    ) -> None:
        if not isinstance(noise, Noise):
            raise ArgumentError(f"noise must be an ancer.noise.Noise (Gaussian or Uniform), got {noise!r}")
        check_precision(precision)
        check_compile(compile)
        self.num_classes = check_count("num_classes", num_classes, minimum=2)
        self.noise = noise
        self.precision = precision
        self.channels_last = bool(channels_last)
        self.device = torch.device(device) if device is not None else model_device(model)
        batchnorms = count_batchnorm(model)
        if fold_bn and batchnorms:
            model = fold_batchnorm(model)
        self.folded_bn = batchnorms - count_batchnorm(model)
        self.model = model.to(self.device).eval()
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.runner = BatchRunner(
            self.model, self.num_classes, self.device, precision=precision,
            compile=compile, cuda_graphs=cuda_graphs,
            pad_batches=pad_batches,
        )
        self._batch_sizes: dict = {}

    def settings(self) -> Dict[str, Any]:
        """How the base classifier is evaluated, as plain data for results files: the
        precision (fp32 meaning IEEE fp32, TF32 off), the weights' dtype, the number of batch
        norms folded, whether compiling is on and compiled code now runs, CUDA graphs, padded
        batches, channels_last and the device."""
        return {
            "precision": self.precision,
            "weights": str(model_dtype(self.model)).replace("torch.", ""),
            "fold_bn": self.folded_bn > 0,
            "folded_batchnorms": self.folded_bn,
            "compile": self.runner.compile,
            "compiled": self.runner.is_compiled,
            "cuda_graphs": self.runner.cuda_graphs,
            "pad_batches": self.runner.pad_batches,
            "channels_last": self.channels_last,
            "device": str(self.device),
        }

    # -- the paper's two procedures ------------------------------------------------------
    def predict(
        self,
        x: torch.Tensor,
        n: int,
        alpha: float,
        batch_size: Optional[int] = None,
        generator: Optional[torch.Generator] = None,
    ) -> int:
        """PREDICT (Cohen et al. 2019, §3.2.1): the top class of ``n`` noisy votes if the
        two-sided binomial test of n_A against n_A + n_B at p = 1/2 rejects at level
        ``alpha``, else ``ABSTAIN``. Wrong with probability at most alpha."""
        alpha = check_alpha(alpha)
        counts = self.sample_counts(self._one_input(x), n, batch_size, generators=[generator])[0]
        top_two = np.argsort(counts)[::-1][:2]
        count_a, count_b = int(counts[top_two[0]]), int(counts[top_two[1]])
        return int(top_two[0]) if predict_decides(count_a, count_b, alpha) else ABSTAIN

    def certify(
        self,
        x: torch.Tensor,
        n0: int,
        n: int,
        alpha: float,
        batch_size: Optional[int] = None,
        generator: Optional[torch.Generator] = None,
        noise: Optional[Noise] = None,
        progress: Optional[ProgressCallback] = None,
        sequential: bool = False,
        radii: Sequence[float] = (),
    ) -> Certificate:
        """CERTIFY (Cohen et al. 2019, §3.2.2) for one input ``x``; ``noise`` overrides the
        smoothing noise for this input (e.g. per-input scales from an optimizer);
        ``sequential`` and ``radii`` as in :meth:`certify_batch`."""
        return self.certify_batch(
            self._one_input(x), n0, n, alpha, batch_size,
            generators=[generator], noises=[noise or self.noise], progress=progress,
            sequential=sequential, radii=radii,
        )[0]

    def certify_batch(
        self,
        xs: torch.Tensor,
        n0: int,
        n: int,
        alpha: float,
        batch_size: Optional[int] = None,
        generators: Optional[Sequence[Optional[torch.Generator]]] = None,
        noises: Optional[Sequence[Noise]] = None,
        progress: Optional[ProgressCallback] = None,
        sequential: bool = False,
        radii: Sequence[float] = (),
    ) -> List[Certificate]:
        """CERTIFY for every input of ``xs`` (shape (B, *input_shape)), their samples packed
        into shared forward batches. ``generators[i]`` and ``noises[i]`` give input i its own
        randomness and noise; ``progress`` is called with the number of draws after each
        forward batch. The selection phase (n0 draws each) and the estimation phase use
        separate draws, so ĉ_A is independent of the counts bounding p_A.

        Fixed n (default): n estimation draws each, p_A the one-sided Clopper-Pearson bound.
        ``sequential=True``: the estimation draws come in growing rounds, at most ``n`` in
        all, and input i stops once its certified level on the grid ``radii`` is decided
        (:class:`ancer.sequential.SequentialPlan`); p_A is then the highest grid threshold
        that group-sequential tests at level alpha have passed, valid whatever the stopping
        rule, the radius that threshold's grid radius, and the certificate's ``n`` the
        estimation draws made. Finished inputs leave the forward
        batches; the others keep filling them."""
        n0 = check_count("n0", n0)
        n = check_count("n", n)
        alpha = check_alpha(alpha)
        xs = self._check_inputs(xs)
        centers = xs.to("cpu")  # the float32 points evaluated; each region copies its own
        batch_size = self.batch_size_for(tuple(xs.shape[1:]), batch_size)
        noises = self._noises_for(xs, noises)
        generators = self._generators_for(xs, generators)
        selection = self._sample_counts(xs, [n0] * len(xs), batch_size, generators, noises, progress)
        candidates = [int(np.argmax(counts)) for counts in selection]
        if sequential:
            estimation, trials, bounds = self._estimate_sequentially(
                xs, candidates, n, alpha, radii, batch_size, generators, noises, progress)
        else:
            estimation = self._sample_counts(xs, [n] * len(xs), batch_size, generators, noises,
                                             progress)
            trials = [n] * len(xs)
            bounds = [clopper_pearson_lower(int(estimation[i, c]), n, alpha)
                      for i, c in enumerate(candidates)]
        certificates = []
        for i, (noise, candidate, p_lower) in enumerate(zip(noises, candidates, bounds)):
            certified = certifies(p_lower)
            certificates.append(Certificate(
                label=candidate if certified else ABSTAIN,
                p_lower=p_lower,
                region=noise.region(centers[i], p_lower) if certified else None,
                norm=noise.norm,
                counts=estimation[i],
                selection_counts=selection[i],
                n0=n0, n=trials[i], alpha=alpha,
                precision=self.precision,
                noise=noise,
                samples=n0 + trials[i],
                bound=GROUP_SEQUENTIAL if sequential else CLOPPER_PEARSON,
            ))
        return certificates

    def _estimate_sequentially(
        self,
        xs: torch.Tensor,
        candidates: Sequence[int],
        budget: int,
        alpha: float,
        radii: Sequence[float],
        batch_size: int,
        generators: List[Optional[torch.Generator]],
        noises: List[Noise],
        progress: Optional[ProgressCallback],
    ) -> Tuple[np.ndarray, List[int], List[float]]:
        """The estimation phase of sequential CERTIFY: (votes, draws made, p_lower) per input.

        Each round, every input still running draws its plan's next round (one host
        synchronization per round); after it, the plan decides from the cumulative votes for
        the selected class and the level already passed whether the input stops, and at which
        level."""
        plans = [sequential_plan(noise, budget, alpha, radii) for noise in noises]
        schedules = [plan.rounds() for plan in plans]
        votes = np.zeros((len(xs), self.num_classes), dtype=np.int64)
        trials, rounds_done, bounds = [0] * len(xs), [0] * len(xs), [0.0] * len(xs)
        levels = [0] * len(xs)
        running = list(range(len(xs)))
        while running:
            nums = [schedules[i][rounds_done[i]] for i in running]
            new = self._sample_counts(xs[running], nums, batch_size,
                                      [generators[i] for i in running],
                                      [noises[i] for i in running], progress)
            still = []
            for row, i in enumerate(running):
                votes[i] += new[row]
                trials[i] += nums[row]
                rounds_done[i] += 1
                decision = plans[i].decide(int(votes[i, candidates[i]]), trials[i], levels[i])
                levels[i], bounds[i] = decision.level, decision.p_lower
                if not decision.stop:
                    still.append(i)
            running = still
        return votes, trials, bounds

    # -- SAMPLEUNDERNOISE ----------------------------------------------------------------
    def sample_counts(
        self,
        xs: torch.Tensor,
        num: int,
        batch_size: Optional[int] = None,
        generators: Optional[Sequence[Optional[torch.Generator]]] = None,
        noises: Optional[Sequence[Noise]] = None,
        progress: Optional[ProgressCallback] = None,
    ) -> np.ndarray:
        """Votes of the base classifier on ``num`` noisy copies of each input of ``xs``:
        an int64 array (B, num_classes). One host synchronization for the whole call."""
        num = check_count("num", num)
        xs = self._check_inputs(xs)
        batch_size = self.batch_size_for(tuple(xs.shape[1:]), batch_size)
        noises = self._noises_for(xs, noises)
        generators = self._generators_for(xs, generators)
        return self._sample_counts(xs, [num] * len(xs), batch_size, generators, noises, progress)

    def _sample_counts(
        self,
        xs: torch.Tensor,
        nums: Sequence[int],
        batch_size: int,
        generators: List[Optional[torch.Generator]],
        noises: List[Noise],
        progress: Optional[ProgressCallback],
    ) -> np.ndarray:
        """``sample_counts`` on validated arguments, ``nums[i]`` draws for input i: noise drawn
        into the runner's float32 buffer, votes of the real rows counted on the device, one copy to the host at the
        end; in fp32 with TF32 off for the forward passes."""
        buffer = self.runner.prepare(batch_size, tuple(xs.shape[1:]))
        counts = torch.zeros(len(xs), self.num_classes, dtype=torch.long, device=self.device)
        ones = torch.ones(batch_size, dtype=torch.long, device=self.device)
        for noise in noises:  # each scale's one host-to-device copy, before the loop
            noise.scale_on(self.device)
        with torch.inference_mode(), strict_fp32(self.precision == "fp32"):
            for batch in _pack(nums, batch_size):
                offset = 0
                for i, size in batch:
                    noises[i].perturb_(buffer[offset:offset + size], xs[i], generators[i])
                    offset += size
                predictions = self.runner.predictions(offset)
                offset = 0
                for i, size in batch:
                    counts[i].scatter_add_(0, predictions[offset:offset + size], ones[:size])
                    offset += size
                if progress is not None:
                    progress(offset)
        return counts.cpu().numpy()

    # -- plumbing ------------------------------------------------------------------------
    def batch_size_for(self, input_shape: Tuple[int, ...], batch_size: Optional[int] = None) -> int:
        """The batch size used for inputs of ``input_shape``: ``batch_size`` validated, or
        when None the automatic choice (on CUDA from free memory, measured once per shape;
        else 1000)."""
        if batch_size is not None:
            return check_count("batch_size", batch_size)
        if input_shape not in self._batch_sizes:
            self._batch_sizes[input_shape] = self.runner.default_batch_size(input_shape)
        return self._batch_sizes[input_shape]

    @staticmethod
    def _one_input(x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise ArgumentError(f"the input must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() == 4:
            raise ArgumentError(
                f"certify and predict take one input (e.g. C×H×W); got shape {tuple(x.shape)}, "
                "which looks like a batch: use certify_batch, or pass x[0]"
            )
        return x.unsqueeze(0)

    def _check_inputs(self, xs: torch.Tensor) -> torch.Tensor:
        if not isinstance(xs, torch.Tensor):
            raise ArgumentError(f"inputs must be a torch.Tensor, got {type(xs).__name__}")
        if xs.dim() < 2 or len(xs) == 0:
            raise ArgumentError(
                f"inputs must be a non-empty batch of shape (B, *input_shape), got {tuple(xs.shape)}"
            )
        if not torch.isfinite(xs).all():
            raise ArgumentError("inputs contain NaN or infinite values")
        low, high = float(xs.min()), float(xs.max())
        if low < 0.0 or high > 1.0:
            warnings.warn(
                f"inputs range over [{low:.4g}, {high:.4g}], outside [0, 1]: ancer models expect "
                "pixels in [0, 1] with normalization inside the model; the certificate is valid "
                "for the space you pass, but check that this is the model's input space",
                InputRangeWarning, stacklevel=3,
            )
        return xs.to(device=self.device, dtype=INPUT_DTYPE)

    def _noises_for(self, xs: torch.Tensor, noises: Optional[Sequence[Noise]]) -> List[Noise]:
        if noises is None:
            noises = [self.noise] * len(xs)
        if len(noises) != len(xs):
            raise ArgumentError(f"got {len(noises)} noises for {len(xs)} inputs; give one per input")
        resolved = [self.noise if noise is None else noise for noise in noises]
        for noise in set(resolved):
            if not isinstance(noise, Noise):
                raise ArgumentError(f"noises must be ancer.noise.Noise objects, got {noise!r}")
            noise.check_input_shape(xs.shape[1:])
        return resolved

    def _generators_for(
        self, xs: torch.Tensor, generators: Optional[Sequence[Optional[torch.Generator]]]
    ) -> List[Optional[torch.Generator]]:
        if generators is None:
            return [None] * len(xs)
        if len(generators) != len(xs):
            raise ArgumentError(f"got {len(generators)} generators for {len(xs)} inputs; give one per input")
        for generator in generators:
            if generator is not None and generator.device.type != self.device.type:
                raise ArgumentError(
                    f"a generator on {generator.device} cannot draw noise on {self.device}; "
                    "create it with torch.Generator(device=...) on the model's device"
                )
        return list(generators)
