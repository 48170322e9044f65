"""load_model: every checkpoint format round-trips; bad files give clear errors."""
import hashlib

import pytest
import torch
from torch import nn

from ancer.data import load_dataset
from ancer.errors import ArgumentError, CheckpointError
from ancer.models import create_model, load_model


@pytest.fixture(scope="module")
def original():
    """A cifar_resnet20 with random weights and batch-norm statistics, in eval mode."""
    torch.manual_seed(0)
    model = create_model("cifar_resnet20")
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if name.endswith(("running_mean", "bias")):
                t.normal_(0, 0.1)
            elif name.endswith("running_var"):
                t.uniform_(0.5, 1.5)
    return model.eval()


@pytest.fixture(scope="module")
def x():
    return torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def _out(model, x):
    with torch.no_grad():
        return model(x)


def _prefixed(state, prefix):
    return {prefix + k: v for k, v in state.items()}


def _net_state(original, prefix=""):
    return _prefixed(original[1].state_dict(), prefix)


@pytest.mark.parametrize(
    "make, kw, fmt",
    [
        (lambda m: {"arch": "cifar_resnet20", "state_dict": m.state_dict(), "epoch": 90}, {}, "cohen"),
        (
            lambda m: {"arch": "cifar_resnet20", "state_dict": _net_state(m, "1.module."), "optimizer": {}},
            {},
            "cohen",
        ),
        (
            lambda m: {"epoch": 3, "state_dict": m.state_dict(), "optimizer_param": {"lr": 0.1}},
            {"arch": "cifar_resnet20"},
            "ddrs",
        ),
        (lambda m: m.state_dict(), {"arch": "cifar_resnet20"}, "state_dict"),
        (lambda m: _net_state(m), {"arch": "cifar_resnet20"}, "state_dict"),
        (lambda m: _net_state(m, "module."), {"arch": "cifar_resnet20"}, "state_dict"),
        (lambda m: _net_state(m, "module.1."), {"arch": "cifar_resnet20"}, "state_dict"),
    ],
)
def test_state_dict_formats_round_trip(tmp_path, original, x, make, kw, fmt):
    path = tmp_path / "ckpt.pth.tar"
    torch.save(make(original), path)
    loaded = load_model(path, **kw)
    assert loaded.format == fmt
    assert (loaded.arch, loaded.dataset, loaded.num_classes) == ("cifar_resnet20", "cifar10", 10)
    assert loaded.outputs == "logits" and loaded.sigma is None
    assert not loaded.model.training
    assert loaded.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert torch.equal(_out(loaded.model, x), _out(original, x))


def test_macer_checkpoint_has_no_normalization(tmp_path, original, x):
    torch.save({"net": original[1].state_dict(), "epoch": 440}, tmp_path / "440.pth")
    loaded = load_model(tmp_path / "440.pth", arch="cifar_resnet20")
    assert loaded.format == "macer" and isinstance(loaded.model[0], nn.Identity)
    assert torch.equal(_out(loaded.model, x), _out(original[1], x))
    renormalized = load_model(tmp_path / "440.pth", arch="cifar_resnet20", normalize=True)
    assert not isinstance(renormalized.model[0], nn.Identity)


def test_sigma_and_legacy_serialization(tmp_path, original, x):
    path = tmp_path / "legacy.pth.tar"
    torch.save(
        {"arch": "cifar_resnet20", "state_dict": original.state_dict(), "sigma": 0.5},
        path,
        _use_new_zipfile_serialization=False,
    )
    loaded = load_model(path)
    assert loaded.sigma == 0.5
    assert torch.equal(_out(loaded.model, x), _out(original, x))


def test_num_classes_and_dataset_follow_the_file(tmp_path, x):
    model = create_model("cifar_resnet20", dataset="imagenet", num_classes=7).eval()
    torch.save({"arch": "cifar_resnet20", "state_dict": model.state_dict()}, tmp_path / "c.pt")
    loaded = load_model(tmp_path / "c.pt", dataset="imagenet")
    assert loaded.num_classes == 7 and loaded.dataset == "imagenet"
    assert torch.equal(_out(loaded.model, x), _out(model, x))


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_torchscript_round_trip_and_probabilities(tmp_path, x):
    torch.manual_seed(0)
    tiny = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 10)).eval()
    torch.jit.save(torch.jit.script(tiny), tmp_path / "logits.pt")
    loaded = load_model(tmp_path / "logits.pt", dataset="cifar10")
    assert (loaded.format, loaded.outputs, loaded.num_classes) == ("torchscript", "logits", 10)
    assert loaded.arch is None
    assert torch.equal(_out(loaded.model, x), _out(tiny, x))

    soft = nn.Sequential(tiny, nn.Softmax(dim=1)).eval()
    torch.jit.save(torch.jit.script(soft), tmp_path / "probs.pt")
    loaded = load_model(tmp_path / "probs.pt")
    assert (loaded.outputs, loaded.num_classes) == ("probabilities", 10)
    assert torch.equal(_out(loaded.model, x), _out(soft, x))


def test_pickled_module_needs_trust(tmp_path, original, x):
    torch.save(original, tmp_path / "whole.pt")
    with pytest.raises(CheckpointError, match="trust=True"):
        load_model(tmp_path / "whole.pt")
    loaded = load_model(tmp_path / "whole.pt", trust=True)
    assert (loaded.format, loaded.outputs, loaded.num_classes) == ("module", "logits", 10)
    assert torch.equal(_out(loaded.model, x), _out(original, x))


def test_wrong_architecture_names_first_mismatching_key(tmp_path, original):
    torch.save({"epoch": 1, "state_dict": original.state_dict(), "optimizer_param": {}}, tmp_path / "r20.pt")
    with pytest.raises(CheckpointError) as err:
        load_model(tmp_path / "r20.pt", arch="cifar_resnet56")
    msg = str(err.value)
    assert "'layer1.3.conv1.weight'" in msg and "missing" in msg and "cifar_resnet20" in msg

    state = original.state_dict()
    state["1.layer2.1.conv2.weight"] = torch.zeros(32, 32, 1, 1)
    torch.save(state, tmp_path / "bad_shape.pt")
    shapes = r"'layer2.1.conv2.weight' has shape \[32, 32, 1, 1\].*\[32, 32, 3, 3\]"
    with pytest.raises(CheckpointError, match=shapes):
        load_model(tmp_path / "bad_shape.pt", arch="cifar_resnet20")

    state = original.state_dict()
    state["1.extra.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / "extra.pt")
    with pytest.raises(CheckpointError, match="'extra.weight' of the file is not in the architecture"):
        load_model(tmp_path / "extra.pt", arch="cifar_resnet20")


def test_bare_state_dict_needs_arch_and_gets_a_hint(tmp_path, original):
    torch.save(original.state_dict(), tmp_path / "bare.pt")
    with pytest.raises(CheckpointError, match=r"pass arch=.*fit arch='cifar_resnet20'"):
        load_model(tmp_path / "bare.pt")


def test_unknown_file_lists_what_was_found(tmp_path):
    torch.save({"model_weights": {"conv.weight": torch.zeros(2)}, "step": 5}, tmp_path / "odd.pt")
    with pytest.raises(CheckpointError) as err:
        load_model(tmp_path / "odd.pt")
    msg = str(err.value)
    assert "'model_weights'" in msg and "'step'" in msg and "conv.weight" in msg
    assert "{'arch', 'state_dict'}" in msg and "TorchScript" in msg


@pytest.mark.parametrize(
    "content, match",
    [
        (None, "does not exist"),
        (b"", "empty"),
        (b"not a checkpoint at all", "not a PyTorch checkpoint.*the text 'not a checkpoint"),
    ],
)
def test_unreadable_files(tmp_path, content, match):
    path = tmp_path / "file.pt"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(CheckpointError, match=match):
        load_model(path, arch="cifar_resnet20")


@pytest.mark.parametrize("legacy", [False, True])
def test_truncated_checkpoint(tmp_path, original, legacy):
    path = tmp_path / "full.pt"
    torch.save({"arch": "cifar_resnet20", "state_dict": original.state_dict()}, path,
               _use_new_zipfile_serialization=not legacy)
    data = path.read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(CheckpointError, match="truncated"):
        load_model(tmp_path / "cut.pt")


@pytest.mark.parametrize(
    "kw, error",
    [
        ({"arch": "vgg16"}, ArgumentError),
        ({"dataset": "mnist"}, ArgumentError),
        ({"trust": "yes"}, ArgumentError),
        ({"map_location": "gpu7"}, ArgumentError),
        ({"arch": "cifar_resnet56"}, ArgumentError),  # contradicts the file's arch
    ],
)
def test_bad_arguments(tmp_path, original, kw, error):
    torch.save({"arch": "cifar_resnet20", "state_dict": original.state_dict()}, tmp_path / "c.pt")
    with pytest.raises(error):
        load_model(tmp_path / "c.pt", **kw)


def test_real_cohen_resnet110_loads_strictly_and_classifies(shared_data):
    path = shared_data / "models" / "cifar10_r110_sigma0.25.pth.tar"
    npz = shared_data / "cifar10" / "cifar10-test-exact-first100.npz"
    if not path.is_file() or not npz.is_file():
        pytest.skip("real checkpoint or exact CIFAR-10 sample absent")
    loaded = load_model(path)
    assert (loaded.format, loaded.arch, loaded.dataset) == ("cohen", "cifar_resnet110", "cifar10")
    assert loaded.num_classes == 10
    assert loaded.sigma == 0.25 and loaded.outputs == "logits"
    raw = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    assert loaded.model.state_dict().keys() == raw.keys()
    data = load_dataset("npz", npz)
    x = torch.stack([data[i][0] for i in range(len(data))])
    y = torch.tensor([data[i][1] for i in range(len(data))])
    with torch.no_grad():
        accuracy = (loaded.model(x).argmax(1) == y).float().mean().item()
    assert accuracy >= 0.5  # chance is 0.1; about 0.7 measured
