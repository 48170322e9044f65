"""ANCER's cost: batched optimization against the authors' one-input-at-a-time loop, and the
optimization's time as a fraction of certifying the same input at n = 100,000.

For ``--inputs`` random inputs of the model's shape, in one run:

1. ``optimize_anisotropic`` on all inputs at once (their samples packed into shared forward
   batches of at most ``--max-batch`` rows);
2. the same work one input at a time, as the authors' code does (a loop over inputs), with
   the same per-input noise, so the scales must come out identical (checked);
3. CERTIFY (``--n0``, ``--n`` draws) of ``--certify-inputs`` inputs with their optimized scales.

Prints a table of times per input and ratios and writes ``results/ancer_<device>.json`` and
``.md``. The defaults are the paper's settings (100 iterations, 100 samples, n = 100,000);
on a CPU scale them down, e.g.

    python benchmarks/bench_ancer.py --inputs 4 --iterations 10 --n 20000

CUDA is used when present (``--device`` to choose).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (best_time, build_model, default_device, device_label,  # noqa: E402
                               environment, markdown_table, write_results)
from ancer import Gaussian, Smoothed, Uniform  # noqa: E402
from ancer.optimize import certify_with_scales, optimize_anisotropic  # noqa: E402
from ancer.seeding import input_generator  # noqa: E402


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="small", help="small (default), resnet110 or resnet50")
    parser.add_argument("--inputs", type=int, default=16, help="inputs optimized (default 16)")
    parser.add_argument("--iterations", type=int, default=100, help="ANCER iterations (default 100)")
    parser.add_argument("--samples", type=int, default=100, help="noise samples per step (default 100)")
    parser.add_argument("--max-batch", type=int, default=1000, help="rows per optimizer forward (default 1000)")
    parser.add_argument("--norm", choices=("l2", "l1"), default="l2")
    parser.add_argument("--sigma", type=float, default=0.25, help="isotropic starting scale (default 0.25)")
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
    model = model.to(device)
    xs = torch.rand(args.inputs, *shape, generator=torch.Generator().manual_seed(args.seed)).to(device)
    settings = dict(iterations=args.iterations, samples=args.samples, max_batch=args.max_batch, seed=args.seed)

    # Warm-up, and a check that both ways compute the same scales (on a few iterations).
    check = {**settings, "iterations": min(args.iterations, 3)}
    batched = optimize_anisotropic(model, xs, args.sigma, args.norm, **check)
    looped = torch.cat([optimize_anisotropic(model, xs[i:i + 1], args.sigma, args.norm, indices=[i], **check).sigma
                        for i in range(args.inputs)])
    if not torch.equal(batched.sigma, looped):
        raise SystemExit("the batched and per-input optimizations disagree: a bug, please report it")
    batch_time = best_time(lambda: optimize_anisotropic(model, xs, args.sigma, args.norm, **settings),
                           device, args.repeats)
    loop_time = best_time(lambda: [optimize_anisotropic(model, xs[i:i + 1], args.sigma, args.norm, indices=[i],
                                                        **settings) for i in range(args.inputs)],
                          device, args.repeats)

    noise = Gaussian(args.sigma) if args.norm == "l2" else Uniform(args.sigma)
    smoothed = Smoothed(model, noise, classes)
    count = min(args.certify_inputs, args.inputs)
    certify = lambda: certify_with_scales(  # noqa: E731
        smoothed, xs[:count], batched.sigma[:count].to(device), args.n0, args.n, 0.001, args.batch_size,
        generators=[input_generator(args.seed, i, device) for i in range(count)])
    certify()  # warm-up (compilation, buffers)
    certify_time = best_time(certify, device, args.repeats)

    per_input = {"optimize_batched": batch_time / args.inputs, "optimize_loop": loop_time / args.inputs,
                 "certify": certify_time / count}
    ratios = {
        "loop_over_batched": loop_time / batch_time,
        "batched_optimization_over_certification": per_input["optimize_batched"] / per_input["certify"],
        "loop_optimization_over_certification": per_input["optimize_loop"] / per_input["certify"],
    }
    payload = {"benchmark": "ancer", **environment(device), "settings": vars(args),
               "seconds_per_input": per_input, "ratios": ratios}
    rows = [
        ["ANCER, batched (s/input)", f"{per_input['optimize_batched']:.4f}"],
        ["ANCER, one input at a time (s/input)", f"{per_input['optimize_loop']:.4f}"],
        [f"CERTIFY n={args.n:,} (s/input)", f"{per_input['certify']:.4f}"],
        ["speed-up of batching (loop / batched)", f"{ratios['loop_over_batched']:.2f}"],
        ["batched optimization / certification", f"{ratios['batched_optimization_over_certification']:.3f}"],
        ["one-at-a-time optimization / certification", f"{ratios['loop_optimization_over_certification']:.3f}"],
    ]
    title = (f"# ANCER optimization cost: {args.model}, {args.norm}, {args.inputs} inputs, "
             f"{args.iterations} iterations × {args.samples} samples, {device_label(device)}\n\n")
    table = markdown_table(["measure", "value"], rows)
    print(title + table)
    json_path, md_path = write_results(f"ancer_{device.type}", payload, title + table)
    print(f"wrote {json_path} and {md_path}")


if __name__ == "__main__":
    main()
