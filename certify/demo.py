"""``certify --demo``: certify the small model and test images shipped in the package.

The assets (``certify/assets/``, made by ``scripts/make_demo_assets.py``): a CIFAR ResNet-20
trained with Gaussian noise at σ = 0.25 in Cohen et al.'s checkpoint format, and the first
100 CIFAR-10 test images (``x`` uint8 N×32×32×3, ``y``). The demo's defaults are small
(the first 20 images, n0 = 100, n = 500) so that it finishes in about a minute on a
two-core CPU; any flag given on the command line still applies (``--max 100`` certifies
every shipped image).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any, Optional

from ancer.errors import ArgumentError
from ancer.noise import noise_for_norm

ASSETS = Path(__file__).resolve().parent / "assets"
CHECKPOINT = ASSETS / "cifar10_resnet20_sigma0.25.pth.tar"
SAMPLE = ASSETS / "cifar10_test_sample.npz"

#: the run parser's defaults under --demo (flags given explicitly still win)
DEFAULTS: dict[str, Any] = {"n0": 100, "n": 500, "batch": 600, "max": 20, "out": None}
#: the radii of the demo's report
RADII = "0:0.5:0.125"


def configure(args: argparse.Namespace) -> Optional[Path]:
    """Point ``args`` at the shipped assets, and ``--out`` at a fresh temporary folder
    unless given (returned, for the caller to remove once the report is printed; None when
    ``--out`` was given); ArgumentError if the assets are missing or other inputs were
    given."""
    given = [flag for flag, value in (("--model", args.model), ("--data", args.data),
                                      ("--dataset", args.dataset)) if value is not None]
    if given:
        raise ArgumentError(f"--demo uses the shipped model and images: drop {' '.join(given)}")
    missing = [p.name for p in (CHECKPOINT, SAMPLE) if not p.is_file()]
    if missing:
        raise ArgumentError(f"the demo assets are missing from {ASSETS} ({', '.join(missing)}): "
                            "reinstall ancer, or make them with scripts/make_demo_assets.py")
    args.model, args.data, args.dataset = str(CHECKPOINT), str(SAMPLE), "npz"
    if args.out is not None:
        return None
    folder = Path(tempfile.mkdtemp(prefix="certify-demo-"))
    args.out = str(folder / "demo.tsv")
    return folder


def where_results_are(out: Path, temporary: bool) -> str:
    """The demo's last line: where its results file is, or, when it went to a temporary
    folder (removed once the report is printed), how to keep it."""
    if temporary:
        return ("the results were written to a temporary folder, now removed; keep them with "
                "--out FILE (e.g. certify --demo --out demo.tsv, then certify report demo.tsv)")
    return f"results in {out}; see them with 'certify report {out}'"


def explanation(norm: str, sigma: float, n: int, alpha: float) -> str:
    """Two lines on what the report's numbers mean and how they grow with n."""
    largest = lambda samples: noise_for_norm(norm, sigma).max_radius(samples, alpha)  # noqa: E731
    return (f"Certified accuracy @ r: the fraction of images classified correctly with a "
            f"guarantee (probability >= {1 - alpha:g}) that no {norm} perturbation of norm < r "
            "changes the smoothed prediction.\n"
            f"With n = {n} samples no radius can exceed {largest(n):.3f} (all {n} votes for one "
            f"class); n = 100000, as in the papers, allows up to {largest(100_000):.3f} at "
            f"{100_000 / n:g} times the cost (--n 100000).\n")
