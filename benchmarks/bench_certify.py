"""Time per input of ``Smoothed.certify`` against Cohen et al.'s reference loop, in one run.

Default: one model (``--model small|resnet110|resnet50``), the reference loop
(``ancer.reference``: fp32, ``x.repeat``, ``randn_like``, counts copied to the host every
batch), ``Smoothed`` with its defaults, and ``Smoothed`` with the fastest options;
writes ``results/<device>-certify-<model>.{json,md}``.

``--suite``: CIFAR ResNet-110 and ImageNet ResNet-50 (random weights), the
reference loop, ``Smoothed`` at its defaults, with no optimization, each optimization alone,
all of them, and all but each; for every configuration also the forward-only throughput of
the same engine; the ceiling is the best forward throughput of the model measured in this
process. Then ANCER's optimizer on the same model (``bench_ancer.measure_optimizer``), in
fp32 against CERTIFY at the defaults and in bf16 against the fastest bf16 CERTIFY, both
projected to 100 iterations and n = 100,000. Writes ``results/<device>.{json,md}``.

CPU by default, CUDA when present (``--device``). On a CPU the default sample sizes are
small (ResNet-50 at 224×224 runs a few images per second there); the table reports
draws per second and the time per input projected to n = 100,000.

    PYTHONPATH=. python3 benchmarks/bench_certify.py                 # small CNN, n = 100,000
    PYTHONPATH=. python3 benchmarks/bench_certify.py --suite --threads 1   # the issue-6 suite
    PYTHONPATH=. python3 benchmarks/bench_certify.py --suite --device cuda
"""
from __future__ import annotations

import argparse
import copy
import gc
import math
import sys
import warnings
from functools import partial
from pathlib import Path
from typing import Callable, Dict, List, NamedTuple, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ancer.noise import Gaussian  # noqa: E402
from bench_ancer import DEFAULT_DRAWS, measure_optimizer  # noqa: E402
from ancer.reference import reference_certify  # noqa: E402
from ancer.smoothing import Smoothed  # noqa: E402
from common import (best_time, build_model, default_device, device_label, environment,  # noqa: E402
                    markdown_table, write_results)

SIGMA, ALPHA, TARGET_N = 0.25, 0.001, 100_000


class Engine(NamedTuple):
    """One configuration to time: its row of results, its CERTIFY of the benchmark's inputs,
    and (for ``Smoothed``) its forward-only pass."""

    row: Dict[str, object]
    certify: Callable[[], object]
    forward: Optional[Callable[[], None]] = None

#: per device type and model: n0, n, reference batch size, inputs, repeats (flags override);
#: on a CPU n0 and n are multiples of the batch, so that the padded last batch of a compiled
#: engine wastes nothing at these small n (at n = 100,000 the padding is negligible)
DEFAULTS = {
    "cpu": {"small": (100, 100_000, 1000, 1, 1), "resnet110": (100, 400, 100, 1, 2),
            "resnet50": (8, 16, 8, 1, 2)},
    "cuda": {"small": (100, 100_000, 1000, 2, 2), "resnet110": (100, 100_000, 1000, 2, 1),
             "resnet50": (100, 100_000, 1000, 1, 1)},
}

#: per device type and model, ANCER in the suite: inputs, iterations, rows per forward, and
#: whether to time the one-input-at-a-time loop too (100 samples per step, the paper's)
OPTIMIZER_DEFAULTS = {
    "cpu": {"small": (4, 10, 1000, True), "resnet110": (2, 2, 200, True), "resnet50": (1, 1, 100, False)},
    "cuda": {"small": (16, 100, 1600, True), "resnet110": (16, 20, 1600, True), "resnet50": (8, 5, 200, True)},
}

#: the optimizations the suite switches on and off, as Smoothed options
OPTIMIZATIONS = {
    "fold_bn": {"fold_bn": True},
    "channels_last": {"channels_last": True},
    "bf16": {"precision": "bf16"},
    "compile": {"compile": True},
    "cuda_graphs": {"cuda_graphs": True},
}
NOTHING = {"fold_bn": False, "channels_last": False, "precision": "fp32", "compile": False,
           "cuda_graphs": False}


def available_optimizations(device: torch.device, compile: bool) -> List[str]:
    """CUDA graphs only on CUDA; compile unless told not to."""
    names = ["fold_bn", "channels_last", "bf16"]
    if compile:
        names.append("compile")
    if device.type == "cuda":
        names.append("cuda_graphs")
    return names


def options_of(enabled: List[str]) -> Dict[str, object]:
    options = dict(NOTHING)
    for name in enabled:
        options.update(OPTIMIZATIONS[name])
    return options


def reference_engine(model, xs, n0, n, num_classes, batch_size, device) -> Engine:
    """The reference CERTIFY of every input of ``xs``."""
    model = copy.deepcopy(model).to(device)
    row = {"config": "reference (Cohen et al. core.py)", "precision": "fp32", "batch_size": batch_size}
    return Engine(row, lambda: [reference_certify(model, x, n0, n, ALPHA, SIGMA, num_classes, batch_size)
                                for x in xs])


def smoothed_engine(name, model, xs, n0, n, num_classes, batch_size, device, options) -> Engine:
    """``Smoothed.certify`` of every input of ``xs`` with ``options``, warmed up by one batch
    (which compiles and records graphs), and the forward-only pass of the same engine over
    as many full batches as a certification runs."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # e.g. bf16 autocast on a CPU without support
        smoothed = Smoothed(copy.deepcopy(model), Gaussian(SIGMA), num_classes, device=device, **options)
        batch = smoothed.batch_size_for(tuple(xs.shape[1:]), batch_size)
        smoothed.sample_counts(xs[:1], batch, batch)
    batches = math.ceil((n0 + n) / batch)

    def forward() -> None:
        with torch.inference_mode():
            for _ in range(batches):
                smoothed.runner.predictions(batch)

    runner = smoothed.runner
    if runner.compile and not runner.is_compiled:
        name += " (compile failed: eager)"
    if runner.cuda_graphs is False and options.get("cuda_graphs"):
        name += " (graph capture failed)"
    row = {"config": name, "precision": options.get("precision", "fp32"), "batch_size": batch,
           "options": options, "compiled": runner.is_compiled, "graphed": runner.is_graphed,
           "forward_draws": batches * batch}
    return Engine(row, lambda: [smoothed.certify(x, n0, n, ALPHA, batch) for x in xs], forward)


def measure(engines: List[Engine], draws: int, inputs: int, device, repeats: int) -> List[Dict[str, object]]:
    """Time every engine ``repeats`` times, in rounds that visit each engine once (so that
    load from other processes falls on all alike), and keep each one's best time."""
    certify_times = [math.inf] * len(engines)
    forward_times = [math.inf] * len(engines)
    for _ in range(repeats):
        for i, engine in enumerate(engines):
            certify_times[i] = min(certify_times[i], best_time(engine.certify, device, 1))
            if engine.forward is not None:
                forward_times[i] = min(forward_times[i], best_time(engine.forward, device, 1))
    rows = []
    for engine, certify_time, forward_time in zip(engines, certify_times, forward_times):
        row = dict(engine.row, seconds_per_input=certify_time / inputs, draws_per_second=draws * inputs / certify_time)
        if engine.forward is not None:
            row["forward_per_second"] = row.pop("forward_draws") / forward_time
        rows.append(row)
    return rows


def summarize(rows: List[Dict[str, object]]) -> float:
    """Add each row's speed-up over the reference and share of the forward ceiling (the
    best forward throughput measured); return the ceiling."""
    reference = rows[0]["draws_per_second"]
    ceiling = max(row.get("forward_per_second", 0.0) for row in rows)
    for row in rows:
        row["speedup_vs_reference"] = row["draws_per_second"] / reference
        row["share_of_forward_ceiling"] = row["draws_per_second"] / ceiling
        row["projected_seconds_at_n_100k"] = TARGET_N / row["draws_per_second"]
    return ceiling


def table(rows: List[Dict[str, object]]) -> str:
    header = ["config", "precision", "batch", "s/input (measured n)", "draws/s", "× reference",
              "% forward ceiling", "forward draws/s", "s/input at n=100k (projected)"]
    body = [[row["config"], row["precision"], row["batch_size"], f"{row['seconds_per_input']:.3f}",
             f"{row['draws_per_second']:.0f}", f"{row['speedup_vs_reference']:.2f}",
             f"{100 * row['share_of_forward_ceiling']:.0f}%",
             f"{row['forward_per_second']:.0f}" if "forward_per_second" in row else "–",
             f"{row['projected_seconds_at_n_100k']:.2f}"] for row in rows]
    return markdown_table(header, body)


def run_model(model_name, device, args, configs) -> Dict[str, object]:
    """Measure the reference and every ``(name, options)`` of ``configs`` on one model."""
    n0, n, reference_batch, inputs, repeats = DEFAULTS[device.type][model_name]
    n0, n = args.n0 or n0, args.n or n
    inputs, repeats = args.inputs or inputs, args.repeats or repeats
    reference_batch = args.batch_size or reference_batch
    smoothed_batch = args.batch_size or (None if device.type == "cuda" else reference_batch)
    model, shape, num_classes = build_model(model_name)
    torch.manual_seed(0)
    xs = torch.rand(inputs, *shape).to(device)
    print(f"\n{model_name} {shape}: n0={n0}, n={n}, {inputs} input(s), best of {repeats}; "
          f"building {len(configs) + 1} engines", flush=True)
    builders = [partial(reference_engine, model, xs, n0, n, num_classes, reference_batch, device)]
    builders += [partial(smoothed_engine, name, model, xs, n0, n, num_classes, smoothed_batch, device, options)
                 for name, options in configs]
    if device.type == "cuda":
        # one engine alive at a time: each holds a full batch buffer and, graphed, its graph's
        # memory pool, and a dozen would not fit; an unshared GPU needs no rounds
        rows = []
        for build in builders:
            rows += measure([build()], n0 + n, inputs, device, repeats)
            gc.collect()
            torch.cuda.empty_cache()
    else:
        rows = measure([build() for build in builders], n0 + n, inputs, device, repeats)
    for row in rows:
        print(f"  {row['config']}: {row['seconds_per_input']:.3f} s/input", flush=True)
    ceiling = summarize(rows)
    note = (f"n0={n0}, n={n} draws per input ({inputs} input(s), best of {repeats}); "
            f"forward ceiling {ceiling:.0f} draws/s")
    if n < TARGET_N:
        note += "; n is reduced from 100,000 on this device, so the n=100k column is projected"
    return {"model": model_name, "input_shape": list(shape), "n0": n0, "n": n, "inputs": inputs,
            "repeats": repeats, "forward_ceiling_per_second": ceiling, "note": note, "rows": rows}


def optimizer_rows(result: Dict[str, object], device: torch.device, args) -> List[Dict[str, object]]:
    """ANCER on ``result``'s model, batched and (where set) one input at a time, in fp32 (set
    against CERTIFY at ``Smoothed``'s defaults) and in bf16 (against the fastest bf16 CERTIFY),
    as seconds per input projected to 100 iterations and n = 100,000."""
    name = result["model"]
    inputs, iterations, max_batch, loop = OPTIMIZER_DEFAULTS[device.type][name]
    model, shape, num_classes = build_model(name)
    xs = torch.rand(inputs, *shape, generator=torch.Generator().manual_seed(1)).to(device)
    certify_rows = result["rows"]
    baselines = {"fp32": next(row for row in certify_rows if row["config"] == "Smoothed, defaults"),
                 "bf16": max((row for row in certify_rows if row["precision"] == "bf16"),
                             key=lambda row: row["draws_per_second"])}
    print(f"\n{name}: ANCER, {inputs} input(s), {iterations} iteration(s) × 100 samples", flush=True)
    rows = []
    for precision, baseline in baselines.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            smoothed = Smoothed(copy.deepcopy(model), Gaussian(SIGMA), num_classes, device=device)
            timings = measure_optimizer(smoothed, xs, SIGMA, iterations=iterations, samples=100,
                                        max_batch=max_batch, precision=precision, repeats=1, loop=loop)
        certify_seconds = DEFAULT_DRAWS / baseline["draws_per_second"]
        row = {"precision": precision, "inputs": inputs, "iterations": iterations, "max_batch": max_batch,
               "optimize_batched": timings["optimize_batched"],
               "optimize_batched_at_defaults": timings["optimize_batched_at_defaults"],
               "certify_config": baseline["config"], "certify_at_defaults": certify_seconds,
               "optimization_over_certification": timings["optimize_batched_at_defaults"] / certify_seconds}
        if loop:
            row["loop_over_batched"] = timings["optimize_loop"] / timings["optimize_batched"]
        print(f"  {precision}: {row['optimize_batched_at_defaults']:.2f} s/input at 100 iterations, "
              f"{row['optimization_over_certification']:.3f} of CERTIFY", flush=True)
        rows.append(row)
    return rows


def optimizer_table(rows: List[Dict[str, object]]) -> str:
    first = rows[0]
    text = (f"\nANCER (batched, {first['inputs']} input(s), {first['iterations']} iteration(s) × 100 samples "
            f"measured, at most {first['max_batch']} rows per forward), projected to the paper's 100 "
            "iterations, against CERTIFY at n0 = 100, n = 100,000 projected from the rows above:\n\n")
    header = ["optimizer precision", "ANCER s/input", "CERTIFY config", "CERTIFY s/input",
              "ANCER / CERTIFY", "loop / batched"]
    body = [[row["precision"], f"{row['optimize_batched_at_defaults']:.2f}", row["certify_config"],
             f"{row['certify_at_defaults']:.2f}", f"{row['optimization_over_certification']:.3f}",
             f"{row['loop_over_batched']:.2f}" if "loop_over_batched" in row else "–"] for row in rows]
    return text + markdown_table(header, body)


def suite_configs(device: torch.device, compile: bool) -> List[tuple]:
    names = available_optimizations(device, compile)
    configs = [("Smoothed, defaults", {}), ("Smoothed, no optimization", options_of([]))]
    configs += [(f"+ {name} only", options_of([name])) for name in names]
    configs.append(("all: " + " + ".join(names), options_of(names)))
    configs += [(f"all − {name}", options_of([other for other in names if other != name])) for name in names]
    return configs


def quick_configs(device: torch.device) -> List[tuple]:
    fastest = available_optimizations(device, device.type == "cuda")
    return [("Smoothed, defaults", {}),
            ("Smoothed, fastest fp32", options_of([n for n in fastest if n != "bf16"])),
            ("Smoothed, fastest (bf16)", options_of(fastest))]


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="small", choices=("small", "resnet110", "resnet50"))
    parser.add_argument("--suite", action="store_true", help="the issue-6 suite: ResNet-110 and ResNet-50, each optimization on and off")
    parser.add_argument("--models", default="resnet110,resnet50", help="models of the suite, comma-separated")
    parser.add_argument("--device", default=default_device(), help="cpu or cuda (default: cuda when present)")
    parser.add_argument("--n0", type=int, help="selection draws per input")
    parser.add_argument("--n", type=int, help="estimation draws per input (100,000 on a GPU)")
    parser.add_argument("--inputs", type=int, help="inputs certified per measurement")
    parser.add_argument("--repeats", type=int, help="measurements per configuration (the best is kept)")
    parser.add_argument("--batch-size", type=int,
                        help="batch size of every configuration (default: the reference's; Smoothed's automatic on CUDA)")
    parser.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's)")
    parser.add_argument("--no-compile", action="store_true",
                        help="leave torch.compile out of the suite (compiling ResNet-50 takes a minute on a CPU)")
    parser.add_argument("--skip-optimizer", action="store_true", help="leave ANCER's optimizer out of the suite")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    label = device_label(device)
    print(f"device: {label}")
    if args.suite:
        configs = suite_configs(device, not args.no_compile)
        results = [run_model(name, device, args, configs) for name in args.models.split(",")]
        if not args.skip_optimizer:
            for result in results:
                result["optimizer"] = optimizer_rows(result, device, args)
        stem, title = label, "certification speed suite"
    else:
        results = [run_model(args.model, device, args, quick_configs(device))]
        stem, title = f"{label}-certify-{args.model}", f"certification speed, {args.model}"
    command = "PYTHONPATH=. python3 benchmarks/bench_certify.py " + " ".join(sys.argv[1:] if argv is None else argv)
    markdown = f"# {title}\n\nDevice: `{label}`, torch {torch.__version__}. Command: `{command.strip()}`\n"
    markdown += ("\nσ = 0.25, α = 0.001, random weights. bf16 rows certify the model as evaluated in "
                 "bf16. Speed-ups are against the reference measured in the same run.\n")
    for result in results:
        markdown += f"\n## {result['model']} {tuple(result['input_shape'])}\n\n{result['note']}.\n\n"
        markdown += table(result["rows"])
        if "optimizer" in result:
            markdown += optimizer_table(result["optimizer"])
    json_path, md_path = write_results(stem, {"environment": environment(device), "command": command.strip(),
                                              "sigma": SIGMA, "alpha": ALPHA, "results": results}, markdown)
    print("\n" + markdown)
    print(f"wrote {json_path} and {md_path}")


if __name__ == "__main__":
    main()
