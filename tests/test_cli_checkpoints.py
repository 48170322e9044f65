"""Every checkpoint the loader reads certifies from the command line too: a bare state dict
and a DDRS/ANCER checkpoint with --arch, a pickled module with --trust; each message that
asks for a loader option names its flag; a text file as --model is one line."""
from __future__ import annotations

import pytest
import torch

from ancer.errors import CheckpointError
from ancer.models import load_model
from certify import demo
from cli_helpers import certify, rows_without_time

pytestmark = pytest.mark.skipif(not demo.CHECKPOINT.is_file(), reason="shipped model absent")

FAST = ("--n0", "20", "--n", "100", "--batch", "120", "--max", "3", "--quiet", "--sigma", "0.25")


@pytest.fixture(scope="module")
def shipped():
    """The shipped checkpoint's dict, and one run of the shipped model to compare with."""
    return torch.load(demo.CHECKPOINT, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, shipped):
    out = tmp_path_factory.mktemp("reference") / "shipped.tsv"
    assert certify("--model", str(demo.CHECKPOINT), *FAST, "--out", str(out)) == 0
    return rows_without_time(out)


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("certify: error: "), err
    return err[0]


@pytest.mark.parametrize("layout", ["bare", "ddrs"])
def test_a_checkpoint_without_arch_certifies_with_arch_flag(tmp_path, shipped, reference, layout,
                                                            capsys):
    path = tmp_path / f"{layout}.pth"
    if layout == "bare":
        torch.save(shipped["state_dict"], path)
    else:  # DDRS/ANCER's layout: no architecture name, an optimizer state beside the weights
        torch.save({"epoch": 3, "state_dict": shipped["state_dict"], "optimizer_param": {}}, path)
    out = tmp_path / "r.tsv"
    assert certify("--model", str(path), *FAST, "--out", str(out)) != 0
    line = _one_error_line(capsys)
    assert "--arch NAME" in line and "--arch cifar_resnet20" in line  # the flag, and the fit
    assert certify("--model", str(path), "--arch", "cifar_resnet20", *FAST, "--out", str(out)) == 0
    assert rows_without_time(out) == reference


def test_a_pickled_module_certifies_with_trust(tmp_path, reference, capsys):
    path = tmp_path / "whole.pt"
    torch.save(load_model(demo.CHECKPOINT).model, path)
    out = tmp_path / "r.tsv"
    assert certify("--model", str(path), *FAST, "--out", str(out)) != 0
    assert "--trust" in _one_error_line(capsys)
    assert certify("--model", str(path), "--trust", "--norm-stats", "cifar10", *FAST,
                   "--out", str(out)) == 0
    assert rows_without_time(out) == reference


def test_no_normalize_changes_the_model_and_is_a_setting(tmp_path, shipped, reference):
    path = tmp_path / "bare.pth"
    torch.save(shipped["state_dict"], path)
    out = tmp_path / "raw.tsv"
    argv = ("--model", str(path), "--arch", "cifar_resnet20", *FAST)
    assert certify(*argv, "--no-normalize", "--out", str(out)) == 0
    assert rows_without_time(out) != reference   # raw inputs into a normalized-trained net
    # resuming the file without the flag would mix two models: refused, naming the setting
    assert certify(*argv, "--out", str(out)) != 0


def test_library_messages_name_the_flag(tmp_path, shipped):
    path = tmp_path / "bare.pth"
    torch.save(shipped["state_dict"], path)
    with pytest.raises(CheckpointError, match=r"pass arch= \(certify: --arch NAME\)"):
        load_model(path)
    whole = tmp_path / "whole.pt"
    torch.save(load_model(demo.CHECKPOINT).model, whole)
    with pytest.raises(CheckpointError, match=r"trust=True \(certify: --trust\)"):
        load_model(whole)


@pytest.mark.parametrize("content", [b"this is not a model\n", b"", b"\x00\x01garbage" * 8,
                                     b"\x80\x02garbage"])
def test_a_file_that_is_no_checkpoint_is_one_line(tmp_path, content, capsys):
    path = tmp_path / "model.txt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match="model.txt"):
        load_model(path)
    assert certify("--model", str(path), "--sigma", "0.25", "--quiet",
                   "--out", str(tmp_path / "r.tsv")) == 1
    assert "model.txt" in _one_error_line(capsys)
