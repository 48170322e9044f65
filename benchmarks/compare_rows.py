"""Rows bit for bit: the same runs with two checkouts of ancer, their results compared.

Runs the ``certify`` command of checkout OLD and of checkout NEW (each as its own process,
``PYTHONPATH`` pointing at it) on the same fixed-seed runs, and compares every results file
they write, all columns but ``time``, and the ancer scales files byte for byte:

- the tiny model and data of ``tests/cli_helpers.py`` (3×8×8 images, 24 inputs): isotropic
  l2 and l1, sequential, dds and ancer, each whole and as two shards plus ``certify merge``;
- its energy model (12 close inputs whose data-dependent regions overlap, so that the memory
  shrinks and overrides): dds and ancer, l2 and l1, whole and sharded;
- the shipped CIFAR-10 ResNet-20 and test images (``certify/assets``), a few inputs at
  small n: isotropic, dds, ancer.

Usage (OLD e.g. from ``git worktree add /tmp/old 1255e6e``)::

    PYTHONPATH=. python3 benchmarks/compare_rows.py --old /tmp/old --new . \
        > benchmarks/results/compare_rows.txt

Prints one line per results file (rows, identical or the first difference) and a verdict;
exits 1 if any file differs.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np

TINY = ["--n0", "20", "--n", "400", "--batch", "200", "--seed", "3", "--quiet"]
OPTIMIZER = ["--opt-iterations", "5", "--opt-samples", "16"]
#: (name, flags after --model/--data/--out); each also runs as two shards and a merge
TINY_RUNS = [
    ("isotropic-l2", ["--sigma", "0.25"]),
    ("isotropic-l1", ["--sigma", "0.25", "--norm", "l1"]),
    ("sequential", ["--sigma", "0.25", "--sequential", "--n", "2000"]),
    ("dds", ["--sigma", "0.25", "--method", "dds", *OPTIMIZER]),
    ("dds-l1", ["--sigma", "0.25", "--norm", "l1", "--method", "dds", *OPTIMIZER]),
    ("ancer", ["--sigma", "0.25", "--method", "ancer", *OPTIMIZER]),
    ("ancer-l1", ["--sigma", "0.25", "--norm", "l1", "--method", "ancer", *OPTIMIZER]),
]
ENERGY = ["--sigma", "0.25", "--n0", "50", "--n", "200", "--batch", "200",
          "--inputs-per-batch", "3", "--quiet"]
ENERGY_RUNS = [
    ("energy-dds", ["--method", "dds", "--opt-iterations", "10", "--opt-samples", "16",
                    "--opt-lr", "0.001"]),
    ("energy-dds-l1", ["--norm", "l1", "--method", "dds", "--opt-iterations", "10",
                       "--opt-samples", "16", "--opt-lr", "0.001"]),
    ("energy-ancer", ["--method", "ancer", *OPTIMIZER]),
    ("energy-ancer-l1", ["--norm", "l1", "--method", "ancer", *OPTIMIZER]),
]
SHIPPED = ["--n0", "20", "--n", "200", "--batch", "220", "--max", "3", "--quiet"]
SHIPPED_RUNS = [
    ("resnet20-isotropic", []),
    ("resnet20-dds", ["--method", "dds", *OPTIMIZER]),
    ("resnet20-ancer", ["--method", "ancer", *OPTIMIZER]),
]


def certify(checkout: Path, argv: list[str]) -> None:
    """Run ``certify ARGV`` with ``checkout`` first on the import path, one thread."""
    env = {**os.environ, "PYTHONPATH": str(checkout), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-c",
               "import torch, sys; torch.set_num_threads(1); from certify.cli import main; "
               "sys.exit(main(sys.argv[1:]))", *argv]
    done = subprocess.run(command, env=env, cwd=checkout, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"certify {' '.join(argv)} failed in {checkout}:\n{done.stderr}")


def rows_without_time(path: Path) -> list[list[str]]:
    lines = path.read_text().splitlines()
    header = lines[0].split("\t")
    keep = [i for i, name in enumerate(header) if name != "time"]
    return [[row.split("\t")[i] for i in keep] for row in lines]


def compare(name: str, old: Path, new: Path) -> bool:
    """Print one line on results file ``name`` of both runs (with the memory's answers in
    it); whether they agree."""
    a, b = rows_without_time(old), rows_without_time(new)
    same = a == b
    memory = a[0].index("memory")
    actions = Counter(row[memory].split(":")[0] for row in a[1:] if row[memory] != "-")
    detail = f"{len(a) - 1} rows identical" + (
        f" (memory: {', '.join(f'{k} {v}' for k, v in sorted(actions.items()))})" if actions else "")
    if not same:
        first = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        detail = f"DIFFER at line {first + 1}: {a[first] if first < len(a) else None} vs " \
                 f"{b[first] if first < len(b) else None}"
    scales_old, scales_new = (p.with_name(p.name[:-4] + ".scales.npy") for p in (old, new))
    if scales_old.exists() or scales_new.exists():
        equal = scales_old.exists() and scales_new.exists() and np.array_equal(
            np.load(scales_old), np.load(scales_new))
        same = same and equal
        detail += "; scales identical" if equal else "; scales DIFFER"
    print(f"{name:40s} {detail}")
    return same


def run_whole_and_sharded(checkout: Path, folder: Path, files: dict, runs: list) -> None:
    common = ["--model", str(files["model"]), "--data", str(files["data"]), "--dataset", "npz"]
    for name, flags in runs:
        certify(checkout, [*common, *flags, "--out", str(folder / f"{name}.tsv")])
        for shard in ("0/2", "1/2"):
            certify(checkout, [*common, *flags, "--shard", shard,
                               "--out", str(folder / f"{name}-sharded.tsv")])
        certify(checkout, ["merge", "--out", str(folder / f"{name}-sharded.tsv")])


def run_all(checkout: Path, folder: Path, files: dict, energy: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    run_whole_and_sharded(checkout, folder, files, [(n, [*TINY, *f]) for n, f in TINY_RUNS])
    run_whole_and_sharded(checkout, folder, energy, [(n, [*ENERGY, *f]) for n, f in ENERGY_RUNS])
    assets = checkout / "certify" / "assets"
    shipped = ["--model", str(assets / "cifar10_resnet20_sigma0.25.pth.tar"),
               "--data", str(assets / "cifar10_test_sample.npz"), "--device", "cpu"]
    for name, flags in SHIPPED_RUNS:
        certify(checkout, [*shipped, *SHIPPED, *flags, "--out", str(folder / f"{name}.tsv")])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--old", type=Path, required=True, help="checkout of the old code")
    parser.add_argument("--new", type=Path, default=Path("."), help="checkout of the new code")
    args = parser.parse_args()
    sys.path.insert(0, str(args.new.resolve()))
    from tests.cli_helpers import make_energy_files, make_files  # the tests' models and data

    with tempfile.TemporaryDirectory() as temporary:
        root = Path(temporary)
        files, energy = make_files(root), make_energy_files(root)
        for side, checkout in (("old", args.old), ("new", args.new)):
            run_all(checkout.resolve(), root / side, files, energy)
        names = sorted(p.name for p in (root / "old").glob("*.tsv"))
        print(f"old: {args.old}  new: {args.new}")
        results = [compare(name, root / "old" / name, root / "new" / name) for name in names]
    print(f"{sum(results)}/{len(results)} results files identical (all columns but time)")
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main())
