"""Denoised smoothing: what a denoiser buys a classifier trained without noise, and what
one-shot diffusion costs.

**Curves** (σ = 0.25, n0 = 100, n = 10,000, alpha = 0.001, l2, fp32; the 100 shipped
CIFAR-10 test images), certified accuracy at r = 0 / 0.25 / 0.5 / 0.75 of

- (a) the shipped ResNet-20 trained without noise, alone;
- (b) the same with the shipped DnCNN denoiser in front (``certify --denoiser``);
- (c) the shipped noise-trained ResNet-20 (its fixed-n run of ``bench_sequential.py``,
  ``results/fixed-run-resnet20-fp32-n10000.json``, is reused when its settings match).

(a) and (b) are certified sequentially (``--sequential``, radii 0.25, 0.5, 0.75 = σ, 2σ,
3σ, the budget n = 10,000): the certified accuracy at the grid radii is that of fixed n
up to the tests' power (on (c), ``bench_sequential.py`` measured the same curve for 3.6×
fewer passes), which is what makes these runs affordable on a CPU. The sequential pass
ratio of (b) is exact without a fixed-n run, since fixed n spends n0 + n passes on every
input; ``--fixed-max K`` also certifies (b) with fixed n on the first K images, to compare
the two curves there.

Each run is a ``certify`` command writing ``results/denoised-<run>-n10000.tsv``; the
script grows ``--max`` by ``--step`` images per round over all runs, so an interrupted
run resumes where it stopped (rerun the same command) and a partial one is balanced.

**Cost** of one-shot diffusion (Carlini et al. 2023) on CIFAR-10: a UNet of the
DDPM CIFAR-10 32×32 size (``diffusers.UNet2DModel`` with google/ddpm-cifar10-32's
configuration, random weights: time does not depend on them) in front of a ResNet-20,
seconds per forward sample of

- the reference: Cohen et al.'s loop (``ancer.reference``: fp32, eager, ``x.repeat``);
- the engine's defaults (fp32; on a CPU ``compile="auto"`` is off for this short timing);
- the engine in bf16 (and, with ``--compiled``, bf16 under ``torch.compile``);

and their ratios. With the sequential pass ratio of the curves, the time per certified
curve against the reference loop's fixed-n cost is the product of the two factors, at
n = 10,000 and, with ``--long-max K``, at n = 100,000 (the budget of Carlini et al. and of
the reference implementation's quoted 121 s per CIFAR-10 image) on the first K images.
Timings use ``--samples`` draws per image (small on a CPU) and are per forward sample.

    PYTHONPATH=. python3 benchmarks/bench_denoised.py --threads 1            # both parts
    PYTHONPATH=. python3 benchmarks/bench_denoised.py --part cost --samples 32

Results: ``results/denoised-<device>.{json,md}``.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, best_time, device_label, environment, markdown_table, write_results  # noqa: E402

from ancer import Certifier, CertifyConfig, load_model  # noqa: E402
from ancer.denoisers import Denoised, OneShotDiffusion  # noqa: E402
from ancer.reference import reference_sample_counts  # noqa: E402
from certify.cli import main as certify_main  # noqa: E402
from certify.demo import ASSETS, CHECKPOINT, SAMPLE  # noqa: E402
from certify.report import certified_accuracy, forward_passes  # noqa: E402
from ancer.results import read_results  # noqa: E402

CLEAN = ASSETS / "cifar10_resnet20_clean.pth.tar"
DENOISER = ASSETS / "cifar10_dncnn_small_sigma0.25.pth.tar"
RADII = (0.0, 0.25, 0.5, 0.75)
SIGMA, N0, N, ALPHA = 0.25, 100, 10_000, 0.001
FIXED_RUN = RESULTS / "fixed-run-resnet20-fp32-n10000.json"

#: google/ddpm-cifar10-32's UNet2DModel configuration (Ho et al. 2020's CIFAR-10 network:
#: 128 base channels, multipliers 1, 2, 2, 2, two residual blocks per level, attention at
#: 16×16)
DDPM_CIFAR10_UNET = dict(
    sample_size=32, in_channels=3, out_channels=3, layers_per_block=2,
    block_out_channels=(128, 256, 256, 256),
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    downsample_padding=0, flip_sin_to_cos=False, freq_shift=1, norm_eps=1e-6,
    norm_num_groups=32, act_fn="silu", mid_block_scale_factor=1)

SEQUENTIAL = ["--sequential", "--radii", "0.25,0.5,0.75"]
#: run name -> (model, extra certify flags)
RUNS = {
    "clean": (CLEAN, SEQUENTIAL),
    "clean-dncnn": (CLEAN, ["--denoiser", str(DENOISER), *SEQUENTIAL]),
    "clean-dncnn-fixed": (CLEAN, ["--denoiser", str(DENOISER)]),
    "noise-trained": (CHECKPOINT, []),
    "clean-dncnn-long": (CLEAN, ["--denoiser", str(DENOISER), *SEQUENTIAL]),
}
#: the budget n of each run: (b) also sequentially at n = 100,000, for its pass ratio there
LONG_N = 100_000
BUDGET = {run: (LONG_N if run == "clean-dncnn-long" else N) for run in RUNS}


def results_path(run: str) -> Path:
    return RESULTS / f"denoised-{run.replace('-long', '')}-n{BUDGET[run]}.tsv"


def reusable_fixed_run() -> Optional[dict]:
    """The noise-trained ResNet-20's fixed-n run of bench_sequential.py, if its settings are
    this benchmark's."""
    if not FIXED_RUN.is_file():
        return None
    saved = json.loads(FIXED_RUN.read_text())
    settings = saved["settings"]
    same = (settings["model"] == CHECKPOINT.name and settings["data"] == SAMPLE.name
            and settings["sigma"] == SIGMA and settings["n0"] == N0 and settings["n"] == N
            and settings["alpha"] == ALPHA and settings["precision"] == "fp32")
    return saved if same else None


def certify_runs(runs: List[str], last: int, step: int, fixed_max: int, long_max: int) -> None:
    """Certify the first ``last`` images with every run, ``step`` more per round (the
    fixed-n run of (b) up to ``fixed_max``, its n = 100,000 run up to ``long_max``)."""
    for stop in range(step, last + step, step):
        for run in runs:
            model, extra = RUNS[run]
            cap = {"clean-dncnn-fixed": fixed_max, "clean-dncnn-long": long_max}.get(run, last)
            limit = min(stop, last, cap)
            if limit == 0 or results_path(run).is_file() and len(read_results(results_path(run))) >= limit:
                continue
            flags = ["--model", str(model), "--sigma", str(SIGMA), "--n0", str(N0), "--n", str(BUDGET[run]),
                     "--alpha", str(ALPHA), "--max", str(limit), "--quiet",
                     "--out", str(results_path(run)), *extra]
            start = time.perf_counter()
            if certify_main(flags) != 0:
                raise SystemExit(f"certify {' '.join(flags)} failed")
            print(f"{run}: first {limit} images done ({time.perf_counter() - start:.0f} s "
                  "this round)", flush=True)


def curves() -> Dict[str, object]:
    """Certified accuracy of each run over the images it has certified."""
    out: Dict[str, object] = {}
    for run in RUNS:
        path = results_path(run)
        if not path.is_file():
            continue
        table = read_results(path)
        out[run] = {"images": len(table), "file": str(path.relative_to(RESULTS.parent.parent)),
                    "certified_accuracy": dict(zip(map(str, RADII),
                                                   certified_accuracy(table, RADII).tolist())),
                    "forward_passes": forward_passes(table)}
    fixed = reusable_fixed_run()
    if "noise-trained" not in out and fixed is not None:
        run = fixed["run"]
        images = len(run["labels"])
        correct = np.array(run["labels"]) == np.array(run["predictions"])
        radii = np.array(run["radii"])
        out["noise-trained"] = {
            "images": images, "file": str(FIXED_RUN.relative_to(RESULTS.parent.parent)),
            "certified_accuracy": {str(r): float(np.mean(correct & (radii >= r))) for r in RADII},
            "forward_passes": int(sum(run["samples"])), "measured": run["date"]}
    return out


def compare_curves(found: Dict[str, dict]) -> Dict[str, object]:
    """(b)/(a) at r = 0.25, (c) − (b) at each radius, and the sequential pass ratio, over
    the images both runs of a comparison have certified."""
    summary: Dict[str, object] = {}
    if "clean" in found and "clean-dncnn" in found:
        images = min(found["clean"]["images"], found["clean-dncnn"]["images"])
        a = _accuracy_on("clean", images)
        b = _accuracy_on("clean-dncnn", images)
        summary["images_compared"] = images
        summary["denoised_over_clean_at_0.25"] = (b[1] / a[1]) if a[1] > 0 else float("inf")
        summary["clean_at_0.25"], summary["denoised_at_0.25"] = a[1], b[1]
        for run in ("clean", "clean-dncnn"):
            summary[f"{run}_classes"] = _class_breakdown(run, images)
    if found.get("clean-dncnn", {}).get("forward_passes"):
        images = found["clean-dncnn"]["images"]
        summary["sequential_pass_ratio"] = (N0 + N) * images / found["clean-dncnn"]["forward_passes"]
    if found.get("clean-dncnn-long", {}).get("forward_passes"):
        images = found["clean-dncnn-long"]["images"]
        summary["sequential_pass_ratio_n100000"] = (
            (N0 + LONG_N) * images / found["clean-dncnn-long"]["forward_passes"])
        summary["sequential_pass_ratio_n100000_images"] = images
    if "clean-dncnn" in found and "clean-dncnn-fixed" in found:
        images = min(found["clean-dncnn"]["images"], found["clean-dncnn-fixed"]["images"])
        summary["fixed_vs_sequential_images"] = images
        summary["fixed_vs_sequential_accuracy"] = {
            "fixed": _accuracy_on("clean-dncnn-fixed", images),
            "sequential": _accuracy_on("clean-dncnn", images)}
    if "noise-trained" in found and "clean-dncnn" in found:
        summary["noise_trained_minus_denoised"] = [
            found["noise-trained"]["certified_accuracy"][str(r)]
            - found["clean-dncnn"]["certified_accuracy"][str(r)] for r in RADII]
    return summary


def _class_breakdown(run: str, images: int, radius: float = 0.25) -> Dict[str, Dict[int, int]]:
    """How a run's smoothed predictions spread over the classes, on its first ``images``
    rows: the count of each predicted class (-1: abstained) and, per true class, the inputs
    certified at ``radius``. A classifier that collapses to a few classes under noise
    certifies exactly the inputs of those classes, which inflates its curve on a sample
    where they are common."""
    table = read_results(results_path(run))
    label = table.columns["label"][:images].astype(int)
    predict = table.columns["predict"][:images].astype(int)
    certified = (table.columns["correct"][:images] == 1) & (table.columns["radius"][:images] >= radius)
    def count(values: np.ndarray) -> Dict[int, int]:
        classes, counts = np.unique(values, return_counts=True)
        order = np.argsort(-counts, kind="stable")
        return {int(classes[i]): int(counts[i]) for i in order}
    return {"predicted": count(predict), f"certified_at_{radius:g}_by_label": count(label[certified])}


def _accuracy_on(run: str, images: int) -> List[float]:
    table = read_results(results_path(run))
    correct = table.columns["correct"][:images] == 1
    radius = table.columns["radius"][:images]
    return [float(np.mean(correct & (radius >= r))) for r in RADII]


def diffusion_cost(samples: int, batch: int, repeats: int, device: torch.device,
                   compiled: bool) -> Dict[str, object]:
    """Seconds per forward sample of one-shot diffusion + ResNet-20: the reference loop,
    the engine's defaults and bf16 (and bf16 compiled, with ``compiled``; the compile
    itself is in the warm-up, not timed), on one shipped image."""
    import diffusers

    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(**DDPM_CIFAR10_UNET).eval()
    alphas = diffusers.DDPMScheduler(num_train_timesteps=1000).alphas_cumprod
    denoiser = OneShotDiffusion(unet, alphas, SIGMA).eval()
    classifier = load_model(CHECKPOINT).model
    composed = Denoised(denoiser, classifier).eval().to(device)
    with np.load(SAMPLE) as sample:
        x = (torch.from_numpy(sample["x"][0]).permute(2, 0, 1).float() / 255).to(device)
    per_sample: Dict[str, float] = {}
    seconds = best_time(lambda: reference_sample_counts(composed, x, samples, SIGMA, 10, batch),
                        device, repeats)
    per_sample["reference"] = seconds / samples
    variants = [("engine_fp32", "fp32", "off"), ("engine_bf16", "bf16", "off")]
    if compiled:
        variants.append(("engine_bf16_compiled", "bf16", "on"))
    for name, precision, compile_ in variants:
        config = CertifyConfig(sigma=SIGMA, n0=batch, n=samples - batch, batch=batch,
                               precision=precision, compile=compile_)
        engine = Certifier(classifier, config, 10, denoiser=denoiser, device=device)
        engine.certify(x)  # warm-up
        seconds = best_time(lambda: engine.certify(x), device, repeats)
        per_sample[name] = seconds / samples
    parameters = sum(p.numel() for p in unet.parameters())
    return {"unet_parameters": parameters, "timestep": denoiser.timestep, "samples": samples,
            "batch": batch, "seconds_per_sample": per_sample,
            "speedup_over_reference": {k: per_sample["reference"] / v
                                       for k, v in per_sample.items() if k != "reference"},
            "reference_seconds_per_image_at_n": per_sample["reference"] * (N0 + N)}


def markdown(payload: Dict[str, object]) -> str:
    lines = [f"# Denoised smoothing ({payload['environment']['device']})", ""]
    found = payload.get("curves", {})
    if found:
        lines += [f"Certified accuracy, σ = {SIGMA}, n0 = {N0}, n = {N:,}, alpha = {ALPHA}, "
                  "shipped CIFAR-10 test images.", ""]
        rows = [[run, info["images"], *(f"{info['certified_accuracy'][str(r)]:.2f}" for r in RADII),
                 info["forward_passes"]] for run, info in found.items()]
        lines.append(markdown_table(["run", "images", *(f"r={r}" for r in RADII), "passes"], rows))
        for key, value in payload.get("comparison", {}).items():
            lines.append(f"- {key}: {value:.3g}" if isinstance(value, float) else f"- {key}: {value}")
        lines.append("")
    cost = payload.get("cost")
    if cost:
        lines += ["One-shot diffusion (DDPM CIFAR-10 UNet size, random weights) + ResNet-20, "
                  f"seconds per forward sample ({cost['samples']} samples, batch {cost['batch']}):", ""]
        rows = [[k, f"{v:.4g}", f"{cost['seconds_per_sample']['reference'] / v:.2f}x"]
                for k, v in cost["seconds_per_sample"].items()]
        lines.append(markdown_table(["loop", "s/sample", "vs reference"], rows))
        total = payload.get("time_per_curve_factor")
        if total:
            lines.append(f"- time per certified curve vs the reference loop at fixed n: "
                         f"{total['total']:.3g}x less ({total['engine']:.3g}x per sample "
                         f"({total['best_engine']}) × {total['sequential']:.3g}x fewer passes)")
            if "total_n100000" in total:
                lines.append(f"- the same at n = 100,000 (Carlini et al.'s budget; sequential "
                             f"run on the first {total['images_n100000']} images): "
                             f"{total['total_n100000']:.3g}x less ({total['engine']:.3g}x × "
                             f"{total['sequential_n100000']:.3g}x fewer passes)")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--part", choices=("curves", "cost", "all"), default="all")
    parser.add_argument("--max", type=int, default=100, help="images to certify (default 100)")
    parser.add_argument("--step", type=int, default=10,
                        help="images added to every run per round (default 10)")
    parser.add_argument("--long-max", type=int, default=0,
                        help="images of (b) certified sequentially at n = 100,000, for the "
                             "pass ratio at that budget (default 0: none)")
    parser.add_argument("--fixed-max", type=int, default=0,
                        help="images of a fixed-n run of (b), to compare its curve with the "
                             "sequential one (default 0: none)")
    parser.add_argument("--runs", default=",".join(RUNS),
                        help="which curve runs to certify (default all; the noise-trained one "
                             "is skipped when its fixed-n run is reused)")
    parser.add_argument("--samples", type=int, default=32, help="cost: draws per timing")
    parser.add_argument("--batch", type=int, default=16, help="cost: forward batch")
    parser.add_argument("--repeats", type=int, default=2, help="cost: timings, best kept")
    parser.add_argument("--compiled", action="store_true",
                        help="cost: also time the engine in bf16 with torch.compile")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="where the cost part runs (the curves' certify runs pick cuda "
                             "where available)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    stem = f"denoised-{device_label(device)}"
    previous = RESULTS / f"{stem}.json"
    payload = json.loads(previous.read_text()) if previous.is_file() else {}
    payload["environment"] = environment(device)
    if args.part in ("curves", "all"):
        runs = [r for r in args.runs.split(",") if r]
        if "noise-trained" in runs and reusable_fixed_run() is not None:
            runs.remove("noise-trained")
        certify_runs(runs, args.max, args.step, args.fixed_max, args.long_max)
    payload["curves"] = curves()
    payload["comparison"] = compare_curves(payload["curves"])
    if args.part in ("cost", "all"):
        payload["cost"] = diffusion_cost(args.samples, args.batch, args.repeats, device,
                                         args.compiled)
    cost, ratio = payload.get("cost"), payload["comparison"].get("sequential_pass_ratio")
    if cost and ratio:
        best = max(cost["speedup_over_reference"], key=cost["speedup_over_reference"].get)
        engine = cost["speedup_over_reference"][best]
        payload["time_per_curve_factor"] = {"engine": engine, "best_engine": best,
                                            "sequential": ratio, "total": engine * ratio}
        long_ratio = payload["comparison"].get("sequential_pass_ratio_n100000")
        if long_ratio:  # the budget of Carlini et al. and of the reference's quoted cost
            payload["time_per_curve_factor"].update(
                sequential_n100000=long_ratio, total_n100000=engine * long_ratio,
                images_n100000=payload["comparison"]["sequential_pass_ratio_n100000_images"])
    json_path, md_path = write_results(stem, payload, markdown(payload))
    print(md_path.read_text())
    print(f"wrote {json_path} and {md_path}")


if __name__ == "__main__":
    main()
