"""The newcomer's bad inputs, as a table: each gets one line naming the problem and the fix.

Command-line cases run ``certify`` in this process and must exit non-zero with exactly one
line on stderr, ``certify: error: ...`` (no traceback, no other line), containing the words
the table names (the flag as typed, or the file). Library cases must raise one of ancer's
exception types with a one-line message.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from ancer import Certifier, CertifyConfig, Memory
from ancer.data import CIFAR10_CLASSES, load_dataset
from ancer.errors import AncerError
from ancer.models import load_model
from cli_helpers import certify, make_files
from test_report import write_hand_tsv

Image = pytest.importorskip("PIL.Image")

NO_GPU = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")


class Wide(nn.Module):
    """A 1000-class model on 3×8×8 inputs (a class count no npz of 3 labels has)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 1000)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.mean(dim=(2, 3)))


@pytest.fixture(scope="module")
def place(tmp_path_factory):
    """A folder of good and bad files; ``{name}`` in a case is replaced by its path."""
    root = tmp_path_factory.mktemp("bad-inputs")
    files = make_files(root)   # tiny.pt (TorchScript, 3 classes), data.npz (24 images 8×8)
    (root / "text.txt").write_text("this is not a model\n")
    (root / "empty.pt").write_bytes(b"")
    (root / "junk.npz").write_bytes(b"junk")
    (root / "emptydir").mkdir()
    (root / "a_file").write_text("")
    torch.save({"conv.weight": torch.zeros(2, 3, 3, 3)}, root / "bare.pt")
    torch.save(nn.Linear(2, 2), root / "whole.pt")
    torch.jit.save(torch.jit.script(Wide().eval()), root / "wide.pt")
    arrays = np.load(files["data"])
    y18 = arrays["y"].copy()
    y18[0] = 18
    np.savez(root / "labels18.npz", x=arrays["x"], y=y18)
    np.savez(root / "keys.npz", images=arrays["x"], y=arrays["y"])
    np.savez(root / "flat.npz", x=arrays["x"][:, :, :, 0], y=arrays["y"])
    np.savez(root / "range.npz", x=np.full((2, 3, 8, 8), 2.0, np.float32), y=np.array([0, 1]))
    for name in ("cat", "dog"):
        (root / "pets" / name).mkdir(parents=True)
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / "pets" / name / "0.png")
    write_hand_tsv(root / "good.tsv")
    (root / "empty.tsv").write_text("idx\tlabel\tpredict\tradius\tcorrect\ttime\n")
    (root / "other.tsv").write_text("name\tscore\nx\t1\n")
    return root


RUN = ("--model", "{tiny.pt}", "--data", "{data.npz}", "--sigma", "0.25", "--n0", "10",
       "--n", "20", "--quiet", "--out", "{tmp}/r.tsv")


def run_with(*changes: str, without: tuple[str, ...] = ()) -> tuple[str, ...]:
    """The tiny run's flags with ``changes`` (flags and values) replacing or adding its own,
    and the flags in ``without`` left out."""
    argv = list(RUN)
    for flag in without + tuple(c for c in changes if c.startswith("--")):
        if flag in argv:
            at = argv.index(flag)
            takes_value = at + 1 < len(argv) and not argv[at + 1].startswith("--")
            del argv[at:at + 1 + takes_value]
    return tuple(argv) + changes


# (argv, words the one line must hold)
CLI_CASES = [
    # numbers out of their domain
    (run_with("--sigma", "0"), "--sigma"),
    (run_with("--sigma", "-1"), "--sigma"),
    (run_with("--sigma", "abc"), "'abc' is not a number"),
    (run_with("--sigma", "nan"), "--sigma"),
    (run_with("--sigma", "inf"), "--sigma"),
    (run_with("--n", "0"), "--n"),
    (run_with("--n", "-5"), "--n"),
    (run_with("--n", "1e3"), "--n"),
    (run_with("--n0", "0"), "--n0"),
    (run_with("--alpha", "0"), "--alpha"),
    (run_with("--alpha", "1"), "--alpha"),
    (run_with("--alpha", "1.5"), "--alpha"),
    (run_with("--batch", "0"), "--batch"),
    (run_with("--skip", "0"), "--skip"),
    (run_with("--max", "0"), "--max"),
    (run_with("--inputs-per-batch", "0"), "--inputs-per-batch"),
    (run_with("--seed", "x"), "--seed"),
    (run_with("--opt-iterations", "0", "--method", "ancer"), "--opt-iterations"),
    (run_with("--opt-lr", "-1", "--method", "ancer"), "--opt-lr"),
    (run_with("--kappa", "0", "--method", "ancer"), "--kappa"),
    # choices
    (run_with("--norm", "linf"), "--norm"),
    (run_with("--method", "macer"), "--method"),
    (run_with("--precision", "fp8"), "--precision"),
    (run_with("--compile", "maybe"), "--compile"),
    (run_with("--theta0", "zero"), "--theta0"),
    (run_with("--device", "tpu"), "--device"),
    pytest.param(run_with("--device", "cuda"), "--device cpu", marks=NO_GPU),
    (run_with("--dataset", "mnist"), "--dataset"),
    (run_with("--arch", "resnet1000"), "--arch"),
    (run_with("--norm-stats", "mnist"), "--norm-stats"),
    (run_with("--bogus"), "unrecognized arguments: --bogus"),
    # shards
    (run_with("--shard", "3/2"), "--shard"),
    (run_with("--shard", "1"), "--shard"),
    (run_with("--shard", "a/b"), "--shard"),
    (run_with("--shard", "-1/2"), "--shard"),
    # sequential radii
    (run_with("--radii", "0.5"), "add --sequential"),
    (run_with("--sequential", "--radii", "0.5,0.25"), "--radii"),
    (run_with("--sequential", "--radii", "-1"), "--radii"),
    (run_with("--sequential", "--radii", "a,b"), "--radii"),
    (run_with("--sequential", "--radii", "5,6"), "--radii"),
    # the model
    (run_with(without=("--model",)), "--model"),
    (run_with("--model", "{missing.pt}"), "does not exist"),
    (run_with("--model", "{emptydir}"), "not a regular file"),
    (run_with("--model", "{empty.pt}"), "empty"),
    (run_with("--model", "{text.txt}"), "not a PyTorch checkpoint"),
    (run_with("--model", "{junk.npz}"), "not a PyTorch checkpoint"),
    (run_with("--model", "{bare.pt}"), "--arch NAME"),
    (run_with("--model", "{bare.pt}", "--arch", "cifar_resnet20"), "do not fit architecture"),
    (run_with("--model", "{whole.pt}"), "--trust"),
    (run_with(without=("--sigma",)), "--sigma"),
    # the data
    (run_with(without=("--data",)), "--data"),
    (run_with("--data", "{missing.npz}"), "does not exist"),
    (run_with("--data", "{junk.npz}"), "junk.npz"),
    (run_with("--data", "{labels18.npz}"), "labels18.npz"),
    (run_with("--data", "{keys.npz}"), "'x' and 'y'"),
    (run_with("--data", "{flat.npz}"), "4 dimensions"),
    (run_with("--data", "{range.npz}"), "[0, 1]"),
    (run_with("--dataset", "folder", "--data", "{pets}"), "--labels-sorted"),
    (run_with("--dataset", "folder", "--data", "{emptydir}"), "no class folders"),
    (run_with("--dataset", "cifar10", "--data", "{emptydir}"), "no CIFAR-10 batches"),
    (run_with("--dataset", "imagenet", "--data", "{emptydir}"), "no ImageNet class folders"),
    (run_with("--dataset", "imagenet", "--data", "{pets}", "--synsets", "{missing.txt}"),
     "no ImageNet class folders"),
    (("--demo", "--model", "{tiny.pt}"), "drop --model"),
    pytest.param(run_with("--model", "{wide.pt}"), "1000"),  # classes differ
    # where the results go
    (run_with("--out", "{a_file}/r.tsv"), "a_file"),
    pytest.param(run_with("--out", "{emptydir}"), "--out"),
    # certify report
    (("report",), "RESULTS.tsv"),
    (("report", "{missing.tsv}"), "no such results file"),
    (("report", "{emptydir}"), "is a directory"),
    (("report", "{other.tsv}"), "not a results file"),
    (("report", "{empty.tsv}"), "no rows yet"),
    (("report", "{text.txt}"), "text.txt"),
    (("report", "{good.tsv}", "--radii", "0:2"), "start:stop:step"),
    (("report", "{good.tsv}", "--radii", "0:2:-1"), "step > 0"),
    (("report", "{good.tsv}", "--radii", "a,b"), "--radii"),
    (("report", "{good.tsv}", "--radii", "-1"), "radii must be >= 0"),
    (("report", "{good.tsv}", "--radii", "0:1e9:1e-9"), "larger step"),
    (("report", "{good.tsv}", "--format", "xml"), "invalid choice: 'xml'"),
    (("report", "{good.tsv}", "--plot", "{good.tsv}/c.png"), "cannot write it"),
    (("report", "{good.tsv}", "--plot", "{tmp}/c.xyz"), "unknown image type"),
    (("report", "{good.tsv}", "--label", "a", "--label", "b"), "one --label per file"),
    # certify merge
    (("merge",), "--out"),
    (("merge", "{missing.tsv}", "--out", "{tmp}/m.tsv"), "missing.tsv"),
    pytest.param(("merge", "--out", "{tmp}/o43/r.tsv"), "shard"),
    # certify train
    (("train",), "required"),
    (("train", "--arch", "resnet1000", "--dataset", "npz", "--data", "{data.npz}",
      "--sigma", "0.25", "--out", "{tmp}/t.pt"), "--arch"),
    (("train", "--arch", "cifar_resnet20", "--dataset", "npz", "--data", "{data.npz}",
      "--sigma", "-0.25", "--out", "{tmp}/t.pt"), "--sigma"),
    (("train", "--arch", "cifar_resnet20", "--dataset", "npz", "--data", "{missing.npz}",
      "--sigma", "0.25", "--out", "{tmp}/t.pt"), "missing.npz"),
    (("train", "--arch", "cifar_resnet20", "--dataset", "npz", "--data", "{data.npz}",
      "--sigma", "0.25", "--batch-size", "0", "--out", "{tmp}/t.pt"), "--batch-size"),
]


def _filled(argv, place, tmp_path) -> list[str]:
    out = []
    for arg in argv:
        if arg.startswith("{") and "}" in arg:
            name, rest = arg[1:].split("}", 1)
            base = tmp_path if name == "tmp" else place / name
            arg = str(base) + rest
        out.append(arg)
    return out


def _case_id(value) -> str:
    """A readable test id: the command line (flags and file names), or the expected words."""
    if isinstance(value, tuple):
        return " ".join(arg.strip("{}").rsplit("/", 1)[-1] for arg in value if arg not in RUN)
    return str(value)[:40]


@pytest.mark.parametrize("argv, words", CLI_CASES, ids=_case_id)
def test_a_bad_command_line_gets_one_line(place, tmp_path, capsys, argv, words):
    code = certify(*_filled(argv, place, tmp_path))
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert code != 0, captured
    assert "Traceback" not in captured.err
    assert len(lines) == 1 and lines[0].startswith("certify: error: "), captured.err
    assert words in lines[0], lines[0]


def _tiny_certifier(place) -> tuple[Certifier, torch.Tensor]:
    loaded = load_model(place / "tiny.pt")
    x = load_dataset("npz", place / "data.npz")[0][0]
    return Certifier(loaded, CertifyConfig(sigma=0.25, n0=10, n=20)), x


# (call on the place's folder, words the message must hold)
API_CASES = [
    (lambda p: load_model(p / "missing.pt"), "does not exist"),
    (lambda p: load_model(p / "text.txt"), "not a PyTorch checkpoint"),
    (lambda p: load_model(p / "bare.pt"), "arch= (certify: --arch NAME)"),
    (lambda p: load_model(p / "whole.pt"), "trust=True (certify: --trust)"),
    (lambda p: load_model(p / "tiny.pt", arch="resnet1000"), "unknown architecture"),
    (lambda p: load_model(p / "tiny.pt", trust="yes"), "trust must be True or False"),
    (lambda p: load_model(p / "tiny.pt", normalize="yes"), "normalize must be"),
    (lambda p: load_model(p / "tiny.pt", dataset="mnist"), "unknown dataset"),
    (lambda p: load_dataset("mnist", p), "unknown dataset"),
    (lambda p: load_dataset("npz", p / "labels18.npz", num_classes=3), "labels18.npz"),
    (lambda p: load_dataset("npz", p / "data.npz", num_classes=0), "num_classes"),
    (lambda p: load_dataset("folder", p / "pets", classes=["x", "y"]), "labels_sorted=True"),
    (lambda p: load_dataset("folder", p / "pets", classes=CIFAR10_CLASSES[:2]), "'cat'"),
    (lambda p: CertifyConfig(sigma=0), "sigma"),
    (lambda p: CertifyConfig(sigma=0.25, alpha=2), "alpha"),
    (lambda p: CertifyConfig(sigma=0.25, n=0), "n"),
    (lambda p: Memory("l2").save(p / "a_file" / "m.pt"), "cannot create the folder"),
    pytest.param(lambda p: _tiny_certifier(p)[0].certify(_tiny_certifier(p)[1][None], idx=0),
                 "shape"),
    pytest.param(lambda p: _tiny_certifier(p)[0].certify(
        _tiny_certifier(p)[1].permute(1, 2, 0).contiguous(), idx=0), "shape"),
    pytest.param(lambda p: _tiny_certifier(p)[0].certify(
        (_tiny_certifier(p)[1] * 255).to(torch.uint8), idx=0), "[0, 1]"),
]


@pytest.mark.parametrize("call, words", API_CASES, ids=lambda v: v if isinstance(v, str) else "")
def test_a_bad_library_call_raises_one_line(place, call, words):
    with pytest.raises(AncerError) as error:
        call(place)
    message = str(error.value)
    assert "\n" not in message and words in message, message
