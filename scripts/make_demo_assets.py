"""Make the model and the test images that ship in ``certify/assets/``.

``--data DIR`` is a folder holding ``cifar10/cifar10-train-jpeg.zip`` (the 50,000 CIFAR-10
training images as ``train/<class>/<NNNN>.jpg``, classes in CIFAR-10's label order) and
``cifar10/cifar10-test-exact-first100.npz`` (the first 100 official test images, exact
pixels).

1. Unzip the CIFAR-10 training JPEGs to a temporary folder.
2. Train a CIFAR ResNet-20 with Gaussian data augmentation at sigma = 0.25 (Cohen et al.
   2019) through ``certify train`` (``--dataset folder --preload``: the images are decoded
   once into memory), cosine schedule, checkpointing every epoch into ``--work``; rerunning
   the script resumes an interrupted run.
3. Write ``certify/assets/cifar10_resnet20_sigma0.25.pth.tar`` (the checkpoint in Cohen et
   al.'s format without the optimizer state) and ``certify/assets/cifar10_test_sample.npz``:
   the first 100 official CIFAR-10 test images with exact pixels
   (``cifar10/cifar10-test-exact-first100.npz``; ``x`` uint8 100×32×32×3, ``y`` int64).

The shipped assets were made with this command on a 2-core CPU (about 28 minutes of wall
time, nearly all of it the 10 epochs, 1.7 to 5.5 minutes each depending on what else the
machine ran), from the repository's root after
``pip install -e .`` (or with ``PYTHONPATH=.``)::

    python3 scripts/make_demo_assets.py --data DATA_DIR --work /tmp/ancer-demo10 \\
        --epochs 10 --threads 2

which runs ``certify train --arch cifar_resnet20 --dataset folder --data <unzipped>/train
--preload --sigma 0.25 --epochs 10 --batch-size 128 --lr 0.1 --schedule cosine
--weight-decay 5e-4 --seed 0 --threads 2 --resume --out /tmp/ancer-demo10/<ckpt>``. The
model ends at 0.698 accuracy under noise on the training images; on the 100 shipped test
images, smoothed at n0 = 100, n = 1000, alpha = 0.001, its certified accuracy is 0.77 /
0.59 / 0.32 at l2 radius 0 / 0.25 / 0.5.

For denoised smoothing two more assets (``--only clean denoiser``):

4. ``certify/assets/cifar10_resnet20_clean.pth.tar``: the same ResNet-20 recipe trained
   WITHOUT noise (``certify train ... --sigma 0 --epochs 4``), the kind of classifier users
   hold;
5. ``certify/assets/cifar10_dncnn_small_sigma0.25.pth.tar``: ancer's small DnCNN
   (``cifar_dncnn_small``, 6 convolutions of 32 maps), trained as Salman et al. recommend,
   first by MSE (``certify train-denoiser --objective mse --sigma 0.25 --epochs 3
   --batch-size 128``: Adam, lr 1e-3), then by the stability objective through the frozen
   clean ResNet-20 (``--objective stability --classifier <clean> --init <mse> --lr 1e-4
   --epochs 1``), written in Salman et al.'s ``{'arch', 'state_dict'}`` layout without
   the optimizer state.

They were made with, on the same 2-core CPU shared with other jobs (1 thread each, about
an hour and a half)::

    python3 scripts/make_demo_assets.py --data DATA_DIR --work /tmp/ancer-demo \\
        --only clean denoiser --clean-epochs 4 --denoiser-epochs 3 --stability-epochs 1 \\
        --threads 1

The step schedule of the denoiser does not depend on ``--epochs``, so its epochs are those
of any longer run. The shipped clean ResNet-20 was cut short: its first epoch ran under
``--clean-epochs 10`` and the run was resumed with ``--clean-epochs 4``, so that epoch's
cosine learning rate went from 0.1 to 0.098 rather than to 0.085; a fresh run of the
command above differs by that.
"""
import argparse
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import torch

from ancer.data import load_dataset
from ancer.train import save_checkpoint
from certify.cli import main as certify_main

REPO = Path(__file__).resolve().parents[1]
ASSETS = REPO / "certify" / "assets"
CHECKPOINT = "cifar10_resnet20_sigma0.25.pth.tar"
CLEAN = "cifar10_resnet20_clean.pth.tar"
DENOISER = "cifar10_dncnn_small_sigma0.25.pth.tar"
SAMPLE = "cifar10_test_sample.npz"
SHIPPED_KEYS = ("arch", "state_dict", "epoch", "sigma", "noise", "dataset", "num_classes",
                "config", "history")
DENOISER_KEYS = ("arch", "state_dict", "epoch", "sigma", "objective", "history")
PARTS = ("noise", "clean", "denoiser")


def run_certify(command: str, args: list) -> None:
    """``certify <command> ARGS``, printed first; exit on failure."""
    print(f"certify {command} " + " ".join(args), flush=True)
    if certify_main([command, *args]) != 0:
        raise SystemExit(f"certify {command} failed (see the error above)")


def train_model(train: Path, checkpoint: Path, sigma: float, epochs: int, threads: int) -> Path:
    """Train (or resume training) the ResNet-20 on the training images at noise ``sigma``
    (0: clean); its checkpoint."""
    run_certify("train", [
        "--arch", "cifar_resnet20", "--dataset", "folder", "--data", str(train),
        "--preload", "--sigma", str(sigma), "--epochs", str(epochs), "--batch-size", "128",
        "--lr", "0.1", "--schedule", "cosine", "--weight-decay", "5e-4", "--seed", "0",
        "--threads", str(threads), "--resume", "--out", str(checkpoint),
    ])
    return checkpoint


def train_denoiser(train: Path, work: Path, classifier: Path, epochs: int, stability: int,
                   threads: int) -> Path:
    """Train (or resume) the small DnCNN at sigma = 0.25: by MSE, then by the stability
    objective through ``classifier``; the final checkpoint."""
    common = ["--arch", "cifar_dncnn_small", "--dataset", "folder", "--data", str(train),
              "--preload", "--sigma", "0.25", "--batch-size", "128", "--seed", "0",
              "--threads", str(threads), "--resume"]
    mse = work / DENOISER.replace(".pth.tar", "_mse.pth.tar")
    run_certify("train-denoiser", [*common, "--objective", "mse", "--epochs", str(epochs),
                                   "--out", str(mse)])
    if stability == 0:
        return mse
    final = work / DENOISER
    run_certify("train-denoiser", [*common, "--objective", "stability", "--classifier",
                                   str(classifier), "--init", str(mse), "--lr", "1e-4",
                                   "--epochs", str(stability), "--out", str(final)])
    return final


def ship(checkpoint: Path, name: str, keys: tuple) -> None:
    """Copy ``keys`` of a training checkpoint (no optimizer state) into the assets."""
    ASSETS.mkdir(exist_ok=True)
    saved = torch.load(checkpoint, map_location="cpu", weights_only=True)
    save_checkpoint(ASSETS / name, {key: saved[key] for key in keys})
    print(f"wrote {ASSETS / name} ({(ASSETS / name).stat().st_size} bytes)")


def write_sample(data: Path) -> None:
    """The exact test sample."""
    ASSETS.mkdir(exist_ok=True)
    sample = load_dataset("npz", data / "cifar10" / "cifar10-test-exact-first100.npz", num_classes=10)
    x = sample.images.permute(0, 2, 3, 1).contiguous().numpy()
    np.savez_compressed(ASSETS / SAMPLE, x=x, y=sample.labels.numpy())
    print(f"wrote {ASSETS / SAMPLE} ({(ASSETS / SAMPLE).stat().st_size} bytes)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, required=True,
                        help="the data folder holding cifar10/cifar10-train-jpeg.zip and "
                             "cifar10/cifar10-test-exact-first100.npz")
    parser.add_argument("--work", type=Path, default=Path("/tmp/ancer-demo"),
                        help="where the full training checkpoint is kept")
    parser.add_argument("--epochs", type=int, default=10,
                        help="epochs of the noise-trained ResNet-20")
    parser.add_argument("--clean-epochs", type=int, default=4,
                        help="epochs of the ResNet-20 trained without noise")
    parser.add_argument("--denoiser-epochs", type=int, default=3,
                        help="MSE epochs of the small DnCNN")
    parser.add_argument("--stability-epochs", type=int, default=1,
                        help="stability epochs of the small DnCNN after MSE (0: none)")
    parser.add_argument("--only", nargs="+", choices=PARTS, default=list(PARTS),
                        help="which models to make (default all; the test sample always)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="cifar10-train-") as tmp:
        with zipfile.ZipFile(args.data / "cifar10" / "cifar10-train-jpeg.zip") as archive:
            archive.extractall(tmp)
        train = Path(tmp) / "train"
        if "noise" in args.only:
            ship(train_model(train, args.work / CHECKPOINT, 0.25, args.epochs, args.threads),
                 CHECKPOINT, SHIPPED_KEYS)
        if "clean" in args.only:
            ship(train_model(train, args.work / CLEAN, 0.0, args.clean_epochs, args.threads),
                 CLEAN, SHIPPED_KEYS)
        if "denoiser" in args.only:
            ship(train_denoiser(train, args.work, ASSETS / CLEAN, args.denoiser_epochs,
                                args.stability_epochs, args.threads), DENOISER, DENOISER_KEYS)
    write_sample(args.data)


if __name__ == "__main__":
    main()
