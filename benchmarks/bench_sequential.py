"""Sequential against fixed-n CERTIFY: the same certified curve for far fewer forward passes.

Both runs go through the library's engine (``ancer.Certifier``) on the same model, images,
seed and settings; only ``sequential`` differs. The comparison is machine-independent where
it matters: forward passes (``Certificate.samples``, selection included) and certified
accuracy at each radius. Wall-clock times of the two runs come from the same process.

Also measured, in the same run: the engine's CPU throughput with and without
``torch.compile`` against Cohen et al.'s ``core.py`` loop (``ancer.reference``), and the
compile's break-even (the forward passes from which compiling pays for itself), which sets
``ancer.engine.CPU_COMPILE_BREAK_EVEN``.

    PYTHONPATH=. python3 benchmarks/bench_sequential.py                 # shipped ResNet-20, 100 images
    PYTHONPATH=. python3 benchmarks/bench_sequential.py --n 10000 \\
        --model cifar10_r110_sigma0.25.pth.tar --data cifar10-test-first100.npz --tag resnet110

Results go to ``benchmarks/results/sequential-<tag>-<device>.{json,md}``.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Dict, List, Sequence

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import device_label, environment, markdown_table, synchronize, write_results  # noqa: E402

from ancer import Certifier, CertifyConfig, load_dataset, load_model  # noqa: E402
from ancer.reference import reference_certify  # noqa: E402
from certify.demo import CHECKPOINT, SAMPLE  # noqa: E402


def certify_all(certifier: Certifier, dataset, group: int) -> Dict[str, object]:
    """Certify every input of ``dataset`` in groups; labels, predictions, radii, samples, time."""
    labels, predictions, radii, samples, counts = [], [], [], [], []
    synchronize(certifier.device)
    start = time.perf_counter()
    for first in range(0, len(dataset), group):
        positions = range(first, min(first + group, len(dataset)))
        xs = torch.stack([dataset[p][0] for p in positions])
        indices = [int(dataset.indices[p]) for p in positions]
        for p, certificate in zip(positions, certifier.certify_batch(xs, indices)):
            labels.append(int(dataset[p][1]))
            predictions.append(int(certificate.label))
            radii.append(float(certificate.radius))
            samples.append(int(certificate.samples))
            selected = int(np.argmax(certificate.selection_counts))
            counts.append([int(certificate.counts[selected]), int(certificate.n)])
    synchronize(certifier.device)
    return {"labels": labels, "predictions": predictions, "radii": radii, "samples": samples,
            "counts": counts, "seconds": time.perf_counter() - start}


def certified_accuracy(run: Dict[str, object], radius: float) -> float:
    """Share of inputs predicted correctly with a certified radius >= ``radius`` (Cohen et al.)."""
    hits = [p == l and r >= radius for p, l, r in zip(run["predictions"], run["labels"], run["radii"])]
    return float(np.mean(hits))


def throughput(loaded, dataset, config: CertifyConfig, compile: str, n: int, inputs: int) -> Dict[str, float]:
    """Samples per second of fixed-n CERTIFY at ``n`` on ``inputs`` inputs, after a warm-up
    call (whose time, compile included, is reported as ``first_call_seconds``). Compiled code
    cached by earlier runs of this process is dropped first, so the compile is paid here."""
    torch.compiler.reset()
    certifier = Certifier(loaded, config.replace(n=n, compile=compile))
    xs = torch.stack([dataset[p][0] for p in range(inputs)])
    start = time.perf_counter()
    certifier.certify_batch(xs[:1], [0])
    first = time.perf_counter() - start
    start = time.perf_counter()
    certifier.certify_batch(xs, list(range(inputs)))
    seconds = time.perf_counter() - start
    return {"samples_per_second": inputs * (config.n0 + n) / seconds,
            "first_call_seconds": first, "compiled": bool(certifier.smoothed.runner.is_compiled)}


def reference_throughput(loaded, dataset, sigma: float, n0: int, n: int, batch: int,
                         inputs: int) -> float:
    """Samples per second of Cohen et al.'s loop (``ancer.reference``), same model and sizes."""
    model = loaded.model.eval()
    start = time.perf_counter()
    for p in range(inputs):
        reference_certify(model, dataset[p][0], n0, n, 0.001, sigma, loaded.num_classes, batch)
    return inputs * (n0 + n) / (time.perf_counter() - start)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=str(CHECKPOINT), help="checkpoint (default: the shipped ResNet-20)")
    parser.add_argument("--data", default=str(SAMPLE), help=".npz of x, y (default: the shipped CIFAR-10 sample)")
    parser.add_argument("--max", type=int, default=100, help="inputs (default 100)")
    parser.add_argument("--sigma", type=float, default=0.25)
    parser.add_argument("--alpha", type=float, default=0.001)
    parser.add_argument("--n0", type=int, default=100)
    parser.add_argument("--n", type=int, default=100_000, help="fixed n, and the sequential budget")
    parser.add_argument("--radii", action="append",
                        help="a sequential run's grid, e.g. 0.25,0.5,0.75; repeat the flag for "
                             "several sequential runs against the one fixed-n run "
                             "(default 0.25,0.5,0.75)")
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--group", type=int, default=10, help="inputs certified together")
    parser.add_argument("--compile", choices=("auto", "on", "off"), default="auto")
    parser.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32",
                        help="both runs certify the model as evaluated in this precision")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--speed-n", type=int, default=2000, help="n of the throughput runs")
    parser.add_argument("--speed-inputs", type=int, default=4, help="inputs of the throughput runs")
    parser.add_argument("--no-speed", action="store_true", help="skip the throughput runs")
    parser.add_argument("--tag", default="resnet20")
    parser.add_argument("--fixed-run", type=Path, default=None,
                        help="a JSON file for the fixed-n run: reused if it holds a run with the "
                             "same settings on this device, else written after the run (the "
                             "fixed-n run does not depend on the sequential rule, so one "
                             "measurement serves every sequential variant)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    grids = [tuple(float(r) for r in spec.split(",")) for spec in (args.radii or ["0.25,0.5,0.75"])]
    loaded = load_model(args.model, map_location=device)
    dataset = load_dataset("npz", args.data, max=args.max, num_classes=loaded.num_classes)
    base = CertifyConfig(sigma=args.sigma, n0=args.n0, n=args.n, alpha=args.alpha,
                         batch=args.batch, compile=args.compile, precision=args.precision)
    planned = len(dataset) * (args.n0 + args.n)
    configs = [(_grid_name(grid), base.replace(sequential=True, radii=grid)) for grid in grids]
    runs = {}
    settings = {"model": Path(args.model).name, "data": Path(args.data).name,
                "inputs": len(dataset), "sigma": args.sigma, "alpha": args.alpha, "n0": args.n0,
                "n": args.n, "batch": args.batch, "group": args.group,
                "precision": args.precision, "compile": args.compile,
                "device": device_label(device), "torch": torch.__version__}
    fixed_reused = _load_fixed_run(args.fixed_run, settings)
    if fixed_reused is not None:
        runs["fixed"] = fixed_reused
        print(f"fixed: reused from {args.fixed_run} (measured {fixed_reused['date']})", flush=True)
    for name, config in [("fixed", base)] + configs:
        if name in runs:
            continue
        certifier = Certifier(loaded, config, device=device, planned_samples=planned)
        runs[name] = certify_all(certifier, dataset, args.group)
        runs[name]["compiled"] = bool(certifier.smoothed.runner.is_compiled)
        print(f"{name}: {sum(runs[name]['samples']):,} forward passes, "
              f"{runs[name]['seconds']:.1f} s", flush=True)
        if name == "fixed":
            runs[name]["date"] = time.strftime("%Y-%m-%d %H:%M:%S")
            if args.fixed_run is not None:  # saved at once: a later failure keeps it
                args.fixed_run.parent.mkdir(parents=True, exist_ok=True)
                args.fixed_run.write_text(json.dumps({"settings": settings, "run": runs[name]}))
    fixed = runs["fixed"]
    comparisons = {}
    for (name, _), grid in zip(configs, grids):
        run = runs[name]
        points = (0.0,) + grid
        accuracy = {"fixed": [certified_accuracy(fixed, r) for r in points],
                    "sequential": [certified_accuracy(run, r) for r in points]}
        comparisons[name] = {
            "radii": list(grid),
            "certified_accuracy": {key: dict(zip(map(str, points), values))
                                   for key, values in accuracy.items()},
            "largest_difference_points": 100 * max(abs(a - b) for a, b in zip(*accuracy.values())),
            "forward_passes": {"fixed": int(sum(fixed["samples"])),
                               "sequential": int(sum(run["samples"]))},
            "forward_pass_ratio": sum(fixed["samples"]) / sum(run["samples"]),
            "seconds": {"fixed": fixed["seconds"], "sequential": run["seconds"]},
            "wall_clock_ratio": fixed["seconds"] / run["seconds"],
            "samples_per_input_sequential": {
                "min": int(min(run["samples"])), "median": float(np.median(run["samples"])),
                "max": int(max(run["samples"]))},
        }
    result: Dict[str, object] = {
        "environment": environment(device), "model": Path(args.model).name,
        "data": Path(args.data).name, "inputs": len(dataset), "sigma": args.sigma,
        "alpha": args.alpha, "n0": args.n0, "n": args.n, "batch": args.batch,
        "group": args.group, "precision": args.precision, "comparisons": comparisons,
        "fixed_run": ({"reused_from": str(args.fixed_run), "measured": fixed["date"]}
                      if fixed_reused is not None else "measured in this run"),
        "compiled": {name: run["compiled"] for name, run in runs.items()},
        "per_input": {name: {key: run[key] for key in ("labels", "predictions", "radii", "samples", "counts")}
                      for name, run in runs.items()},
    }
    if not args.no_speed:
        reference = reference_throughput(loaded, dataset, args.sigma, args.n0, args.speed_n,
                                         args.batch, args.speed_inputs)
        eager = throughput(loaded, dataset, base, "off", args.speed_n, args.speed_inputs)
        compiled = throughput(loaded, dataset, base, "on", args.speed_n, args.speed_inputs)
        saving = 1 / eager["samples_per_second"] - 1 / compiled["samples_per_second"]
        first_call = args.n0 + args.speed_n  # the warm-up call certifies one input

        def overhead(run: Dict[str, float]) -> float:  # first call less its sampling time
            return run["first_call_seconds"] - first_call / run["samples_per_second"]
        compile_cost = overhead(compiled) - overhead(eager)
        result["speed"] = {
            "reference_samples_per_second": reference, "eager": eager, "compiled": compiled,
            "eager_vs_reference": eager["samples_per_second"] / reference,
            "compiled_vs_reference": compiled["samples_per_second"] / reference,
            "compile_seconds": compile_cost,
            "break_even_samples": (compile_cost / saving) if saving > 0 else math.inf,
        }
    markdown = (f"# Sequential vs fixed-n CERTIFY: {result['model']}, {len(dataset)} images of "
                f"{result['data']}\n\nσ = {args.sigma}, alpha = {args.alpha}, n0 = {args.n0}, "
                f"n (budget) = {args.n}, precision {args.precision}; device "
                f"{device_label(device)}.\n")
    for name, comparison in comparisons.items():
        accuracy = comparison["certified_accuracy"]
        rows: List[List[object]] = [
            [f"certified accuracy @ {float(r):g}", f"{accuracy['fixed'][r]:.2f}",
             f"{accuracy['sequential'][r]:.2f}"] for r in accuracy["fixed"]]
        rows.append(["forward passes", f"{comparison['forward_passes']['fixed']:,}",
                     f"{comparison['forward_passes']['sequential']:,}"])
        rows.append(["seconds", f"{comparison['seconds']['fixed']:.1f}",
                     f"{comparison['seconds']['sequential']:.1f}"])
        markdown += (f"\n## Sequential with radii {name}\n\n"
                     + markdown_table(["", "fixed n", "sequential"], rows)
                     + f"\nForward passes: {comparison['forward_pass_ratio']:.1f}x fewer; wall "
                     f"clock {comparison['wall_clock_ratio']:.1f}x; largest certified-accuracy "
                     f"difference {comparison['largest_difference_points']:.0f} points.\n")
    if "speed" in result:
        speed = result["speed"]
        markdown += (f"\nThroughput (n = {args.speed_n}, {args.speed_inputs} inputs): Cohen et al.'s "
                     f"loop {speed['reference_samples_per_second']:.0f} samples/s; engine eager "
                     f"{speed['eager_vs_reference']:.2f}x, compiled {speed['compiled_vs_reference']:.2f}x "
                     f"(compiled: {speed['compiled']['compiled']}); compile costs "
                     f"{speed['compile_seconds']:.0f} s, repaid after "
                     f"{speed['break_even_samples']:,.0f} forward passes.\n")
    paths = write_results(f"sequential-{args.tag}-{device_label(device)}", result, markdown)
    print(markdown)
    print("written:", *paths)


def _load_fixed_run(path: Path | None, settings: Dict[str, object]) -> Dict[str, object] | None:
    """The fixed-n run saved in ``path`` if its settings equal ``settings``, else None."""
    if path is None or not path.exists():
        return None
    saved = json.loads(path.read_text())
    if saved.get("settings") != settings:
        print(f"fixed: {path} was measured with other settings; measuring again", flush=True)
        return None
    return saved["run"]


def _grid_name(grid: Sequence[float]) -> str:
    return ",".join(f"{r:g}" for r in grid)


if __name__ == "__main__":
    main()
