"""ANCER's cost: batched optimization against the authors' one-input-at-a-time loop, and the
optimization's time as a fraction of certifying the same input at n = 100,000.

For ``--inputs`` random inputs of the model's shape, in one run:

1. ``optimize_anisotropic`` on all inputs at once (their samples packed into shared forward
   batches of at most ``--max-batch`` rows), on the model ``Smoothed`` certifies (batch norm
   folded, as ``certify --method ancer`` runs it) in ``--precision``;
2. the same work one input at a time, as the authors' code does (a loop over inputs), with
   the same per-input noise, so the scales must come out identical (checked);
3. CERTIFY (``--n0``, ``--n`` draws) of ``--certify-inputs`` inputs with their optimized scales.

The optimizer's cost is linear in its iterations and CERTIFY's in its draws, so the ratio at
the defaults (100 iterations, n0 = 100, n = 100,000) is also projected from scaled-down runs.
Prints a table and writes ``results/ancer-<device>.json`` and ``.md``. The defaults are the
paper's settings; on a CPU scale them down, e.g.

    PYTHONPATH=. python3 benchmarks/bench_ancer.py --inputs 4 --iterations 10 --n 20000

``bench_certify.py --suite`` runs :func:`measure_optimizer` on each of its models too.
CUDA is used when present (``--device`` to choose).
"""
from __future__ import annotations

import argparse
import sys
from functools import partial
from pathlib import Path
from typing import Dict, List

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import (best_time, build_model, default_device, device_label,  # noqa: E402
                    environment, markdown_table, write_results)
from ancer import Gaussian, Smoothed, Uniform  # noqa: E402
from ancer.optimize import certify_with_scales, optimize_anisotropic  # noqa: E402
from ancer.vocabulary import NORMS  # noqa: E402
from ancer.seeding import input_generator  # noqa: E402

#: the paper's settings, which the ratios are projected to
DEFAULT_ITERATIONS, DEFAULT_DRAWS = 100, 100 + 100_000


def measure_optimizer(smoothed: Smoothed, xs: torch.Tensor, sigma0: float, *, iterations: int,
                      samples: int, max_batch: int, precision: str, repeats: int, seed: int = 0,
                      loop: bool = True) -> Dict[str, object]:
    """Seconds per input of ANCER from ``sigma0`` batched over ``xs`` (and, if ``loop``, one
    input at a time) on ``smoothed.model`` for ``smoothed``'s norm, warmed up and checked to
    give the same scales both ways; also the projection to :data:`DEFAULT_ITERATIONS`. The
    optimized scales are returned under "scales", for certification."""
    model: nn.Module = smoothed.model
    device, norm = xs.device, smoothed.noise.norm
    settings = dict(samples=samples, max_batch=max_batch, precision=precision, seed=seed)

    def batched(steps: int):
        return optimize_anisotropic(model, xs, sigma0, norm, steps, **settings)

    def looped(steps: int):
        return torch.cat([optimize_anisotropic(model, xs[i:i + 1], sigma0, norm, steps, indices=[i],
                                               **settings).sigma for i in range(len(xs))])

    check = min(iterations, 3)
    # on a GPU, kernels chosen per batch size (and TF32) change the last bits of the scales
    same = torch.equal if device.type == "cpu" else partial(torch.allclose, rtol=1e-3, atol=1e-6)
    if loop and not same(batched(check).sigma, looped(check)):
        raise SystemExit("the batched and per-input optimizations disagree: a bug, please report it")
    result = {"scales": batched(iterations).sigma}  # also the warm-up
    result["optimize_batched"] = best_time(lambda: batched(iterations), device, repeats) / len(xs)
    if loop:
        result["optimize_loop"] = best_time(lambda: looped(iterations), device, repeats) / len(xs)
    result["optimize_batched_at_defaults"] = result["optimize_batched"] * DEFAULT_ITERATIONS / iterations
    return result


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="small", help="small (default), resnet110 or resnet50")
    parser.add_argument("--inputs", type=int, default=16, help="inputs optimized (default 16)")
    parser.add_argument("--iterations", type=int, default=DEFAULT_ITERATIONS, help="ANCER iterations (default 100)")
    parser.add_argument("--samples", type=int, default=100, help="noise samples per step (default 100)")
    parser.add_argument("--max-batch", type=int, default=1000, help="rows per optimizer forward (default 1000)")
    parser.add_argument("--norm", choices=NORMS, default="l2")
    parser.add_argument("--sigma", type=float, default=0.25, help="isotropic starting scale (default 0.25)")
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "fp16"),
                        help="of the optimizer and of CERTIFY (default fp32)")
    parser.add_argument("--n0", type=int, default=100)
    parser.add_argument("--n", type=int, default=100_000, help="certification draws (default 100,000)")
    parser.add_argument("--batch-size", type=int, default=1000, help="certification batch (default 1000)")
    parser.add_argument("--certify-inputs", type=int, default=1, help="inputs certified for timing (default 1)")
    parser.add_argument("--device", default=default_device())
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--repeats", type=int, default=2, help="timings per measure, the best kept (default 2)")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    model, shape, classes = build_model(args.model)
    xs = torch.rand(args.inputs, *shape, generator=torch.Generator().manual_seed(args.seed)).to(device)
    noise = Gaussian(args.sigma) if args.norm == "l2" else Uniform(args.sigma)
    smoothed = Smoothed(model.to(device), noise, classes, precision=args.precision)
    timings = measure_optimizer(smoothed, xs, args.sigma, iterations=args.iterations, samples=args.samples,
                                max_batch=args.max_batch, precision=args.precision, repeats=args.repeats,
                                seed=args.seed)

    count = min(args.certify_inputs, args.inputs)
    scales = timings.pop("scales")[:count].to(device)
    certify = lambda: certify_with_scales(  # noqa: E731
        smoothed, xs[:count], scales, args.n0, args.n, 0.001, args.batch_size,
        generators=[input_generator(args.seed, i, device) for i in range(count)])
    certify()  # warm-up (compilation, buffers)
    per_input = {**timings, "certify": best_time(certify, device, args.repeats) / count}
    per_input["certify_at_defaults"] = per_input["certify"] * DEFAULT_DRAWS / (args.n0 + args.n)
    ratios = {
        "loop_over_batched": per_input["optimize_loop"] / per_input["optimize_batched"],
        "batched_optimization_over_certification": per_input["optimize_batched"] / per_input["certify"],
        "batched_optimization_over_certification_at_defaults":
            per_input["optimize_batched_at_defaults"] / per_input["certify_at_defaults"],
    }
    payload = {"benchmark": "ancer", **environment(device), "settings": vars(args),
               "seconds_per_input": per_input, "ratios": ratios}
    rows: List[List[str]] = [
        ["ANCER, batched (s/input)", f"{per_input['optimize_batched']:.4f}"],
        ["ANCER, one input at a time (s/input)", f"{per_input['optimize_loop']:.4f}"],
        [f"CERTIFY n0={args.n0:,}, n={args.n:,} (s/input)", f"{per_input['certify']:.4f}"],
        ["speed-up of batching (loop / batched)", f"{ratios['loop_over_batched']:.2f}"],
        ["batched optimization / certification, as measured",
         f"{ratios['batched_optimization_over_certification']:.3f}"],
        ["batched optimization / certification at 100 iterations, n = 100,000 (projected)",
         f"{ratios['batched_optimization_over_certification_at_defaults']:.3f}"],
    ]
    title = (f"# ANCER optimization cost: {args.model}, {args.norm}, {args.precision}, {args.inputs} inputs, "
             f"{args.iterations} iterations × {args.samples} samples, {device_label(device)}\n\n")
    table = markdown_table(["measure", "value"], rows)
    print(title + table)
    json_path, md_path = write_results(f"ancer-{device_label(device)}", payload, title + table)
    print(f"wrote {json_path} and {md_path}")


if __name__ == "__main__":
    main()
