"""Architectures and the normalization layer: layouts, shapes, forward passes."""
import json

import pytest
import torch
from torch import nn

from ancer.errors import ArgumentError
from ancer.models import DATASET_STATS, NormalizeLayer, available_models, create_model

# torchvision.models.resnet50().state_dict(): every name and shape, in order (v1.5:
# bottleneck stride on conv2; layers of 3, 4, 6, 3 blocks; downsample on each block 0).
RESNET50_STATE = """
conv1.weight [64, 3, 7, 7]
bn1.weight [64]
bn1.bias [64]
bn1.running_mean [64]
bn1.running_var [64]
bn1.num_batches_tracked []
layer1.0.conv1.weight [64, 64, 1, 1]
layer1.0.bn1.weight [64]
layer1.0.bn1.bias [64]
layer1.0.bn1.running_mean [64]
layer1.0.bn1.running_var [64]
layer1.0.bn1.num_batches_tracked []
layer1.0.conv2.weight [64, 64, 3, 3]
layer1.0.bn2.weight [64]
layer1.0.bn2.bias [64]
layer1.0.bn2.running_mean [64]
layer1.0.bn2.running_var [64]
layer1.0.bn2.num_batches_tracked []
layer1.0.conv3.weight [256, 64, 1, 1]
layer1.0.bn3.weight [256]
layer1.0.bn3.bias [256]
layer1.0.bn3.running_mean [256]
layer1.0.bn3.running_var [256]
layer1.0.bn3.num_batches_tracked []
layer1.0.downsample.0.weight [256, 64, 1, 1]
layer1.0.downsample.1.weight [256]
layer1.0.downsample.1.bias [256]
layer1.0.downsample.1.running_mean [256]
layer1.0.downsample.1.running_var [256]
layer1.0.downsample.1.num_batches_tracked []
layer1.1.conv1.weight [64, 256, 1, 1]
layer1.1.bn1.weight [64]
layer1.1.bn1.bias [64]
layer1.1.bn1.running_mean [64]
layer1.1.bn1.running_var [64]
layer1.1.bn1.num_batches_tracked []
layer1.1.conv2.weight [64, 64, 3, 3]
layer1.1.bn2.weight [64]
layer1.1.bn2.bias [64]
layer1.1.bn2.running_mean [64]
layer1.1.bn2.running_var [64]
layer1.1.bn2.num_batches_tracked []
layer1.1.conv3.weight [256, 64, 1, 1]
layer1.1.bn3.weight [256]
layer1.1.bn3.bias [256]
layer1.1.bn3.running_mean [256]
layer1.1.bn3.running_var [256]
layer1.1.bn3.num_batches_tracked []
layer1.2.conv1.weight [64, 256, 1, 1]
layer1.2.bn1.weight [64]
layer1.2.bn1.bias [64]
layer1.2.bn1.running_mean [64]
layer1.2.bn1.running_var [64]
layer1.2.bn1.num_batches_tracked []
layer1.2.conv2.weight [64, 64, 3, 3]
layer1.2.bn2.weight [64]
layer1.2.bn2.bias [64]
layer1.2.bn2.running_mean [64]
layer1.2.bn2.running_var [64]
layer1.2.bn2.num_batches_tracked []
layer1.2.conv3.weight [256, 64, 1, 1]
layer1.2.bn3.weight [256]
layer1.2.bn3.bias [256]
layer1.2.bn3.running_mean [256]
layer1.2.bn3.running_var [256]
layer1.2.bn3.num_batches_tracked []
layer2.0.conv1.weight [128, 256, 1, 1]
layer2.0.bn1.weight [128]
layer2.0.bn1.bias [128]
layer2.0.bn1.running_mean [128]
layer2.0.bn1.running_var [128]
layer2.0.bn1.num_batches_tracked []
layer2.0.conv2.weight [128, 128, 3, 3]
layer2.0.bn2.weight [128]
layer2.0.bn2.bias [128]
layer2.0.bn2.running_mean [128]
layer2.0.bn2.running_var [128]
layer2.0.bn2.num_batches_tracked []
layer2.0.conv3.weight [512, 128, 1, 1]
layer2.0.bn3.weight [512]
layer2.0.bn3.bias [512]
layer2.0.bn3.running_mean [512]
layer2.0.bn3.running_var [512]
layer2.0.bn3.num_batches_tracked []
layer2.0.downsample.0.weight [512, 256, 1, 1]
layer2.0.downsample.1.weight [512]
layer2.0.downsample.1.bias [512]
layer2.0.downsample.1.running_mean [512]
layer2.0.downsample.1.running_var [512]
layer2.0.downsample.1.num_batches_tracked []
layer2.1.conv1.weight [128, 512, 1, 1]
layer2.1.bn1.weight [128]
layer2.1.bn1.bias [128]
layer2.1.bn1.running_mean [128]
layer2.1.bn1.running_var [128]
layer2.1.bn1.num_batches_tracked []
layer2.1.conv2.weight [128, 128, 3, 3]
layer2.1.bn2.weight [128]
layer2.1.bn2.bias [128]
layer2.1.bn2.running_mean [128]
layer2.1.bn2.running_var [128]
layer2.1.bn2.num_batches_tracked []
layer2.1.conv3.weight [512, 128, 1, 1]
layer2.1.bn3.weight [512]
layer2.1.bn3.bias [512]
layer2.1.bn3.running_mean [512]
layer2.1.bn3.running_var [512]
layer2.1.bn3.num_batches_tracked []
layer2.2.conv1.weight [128, 512, 1, 1]
layer2.2.bn1.weight [128]
layer2.2.bn1.bias [128]
layer2.2.bn1.running_mean [128]
layer2.2.bn1.running_var [128]
layer2.2.bn1.num_batches_tracked []
layer2.2.conv2.weight [128, 128, 3, 3]
layer2.2.bn2.weight [128]
layer2.2.bn2.bias [128]
layer2.2.bn2.running_mean [128]
layer2.2.bn2.running_var [128]
layer2.2.bn2.num_batches_tracked []
layer2.2.conv3.weight [512, 128, 1, 1]
layer2.2.bn3.weight [512]
layer2.2.bn3.bias [512]
layer2.2.bn3.running_mean [512]
layer2.2.bn3.running_var [512]
layer2.2.bn3.num_batches_tracked []
layer2.3.conv1.weight [128, 512, 1, 1]
layer2.3.bn1.weight [128]
layer2.3.bn1.bias [128]
layer2.3.bn1.running_mean [128]
layer2.3.bn1.running_var [128]
layer2.3.bn1.num_batches_tracked []
layer2.3.conv2.weight [128, 128, 3, 3]
layer2.3.bn2.weight [128]
layer2.3.bn2.bias [128]
layer2.3.bn2.running_mean [128]
layer2.3.bn2.running_var [128]
layer2.3.bn2.num_batches_tracked []
layer2.3.conv3.weight [512, 128, 1, 1]
layer2.3.bn3.weight [512]
layer2.3.bn3.bias [512]
layer2.3.bn3.running_mean [512]
layer2.3.bn3.running_var [512]
layer2.3.bn3.num_batches_tracked []
layer3.0.conv1.weight [256, 512, 1, 1]
layer3.0.bn1.weight [256]
layer3.0.bn1.bias [256]
layer3.0.bn1.running_mean [256]
layer3.0.bn1.running_var [256]
layer3.0.bn1.num_batches_tracked []
layer3.0.conv2.weight [256, 256, 3, 3]
layer3.0.bn2.weight [256]
layer3.0.bn2.bias [256]
layer3.0.bn2.running_mean [256]
layer3.0.bn2.running_var [256]
layer3.0.bn2.num_batches_tracked []
layer3.0.conv3.weight [1024, 256, 1, 1]
layer3.0.bn3.weight [1024]
layer3.0.bn3.bias [1024]
layer3.0.bn3.running_mean [1024]
layer3.0.bn3.running_var [1024]
layer3.0.bn3.num_batches_tracked []
layer3.0.downsample.0.weight [1024, 512, 1, 1]
layer3.0.downsample.1.weight [1024]
layer3.0.downsample.1.bias [1024]
layer3.0.downsample.1.running_mean [1024]
layer3.0.downsample.1.running_var [1024]
layer3.0.downsample.1.num_batches_tracked []
layer3.1.conv1.weight [256, 1024, 1, 1]
layer3.1.bn1.weight [256]
layer3.1.bn1.bias [256]
layer3.1.bn1.running_mean [256]
layer3.1.bn1.running_var [256]
layer3.1.bn1.num_batches_tracked []
layer3.1.conv2.weight [256, 256, 3, 3]
layer3.1.bn2.weight [256]
layer3.1.bn2.bias [256]
layer3.1.bn2.running_mean [256]
layer3.1.bn2.running_var [256]
layer3.1.bn2.num_batches_tracked []
layer3.1.conv3.weight [1024, 256, 1, 1]
layer3.1.bn3.weight [1024]
layer3.1.bn3.bias [1024]
layer3.1.bn3.running_mean [1024]
layer3.1.bn3.running_var [1024]
layer3.1.bn3.num_batches_tracked []
layer3.2.conv1.weight [256, 1024, 1, 1]
layer3.2.bn1.weight [256]
layer3.2.bn1.bias [256]
layer3.2.bn1.running_mean [256]
layer3.2.bn1.running_var [256]
layer3.2.bn1.num_batches_tracked []
layer3.2.conv2.weight [256, 256, 3, 3]
layer3.2.bn2.weight [256]
layer3.2.bn2.bias [256]
layer3.2.bn2.running_mean [256]
layer3.2.bn2.running_var [256]
layer3.2.bn2.num_batches_tracked []
layer3.2.conv3.weight [1024, 256, 1, 1]
layer3.2.bn3.weight [1024]
layer3.2.bn3.bias [1024]
layer3.2.bn3.running_mean [1024]
layer3.2.bn3.running_var [1024]
layer3.2.bn3.num_batches_tracked []
layer3.3.conv1.weight [256, 1024, 1, 1]
layer3.3.bn1.weight [256]
layer3.3.bn1.bias [256]
layer3.3.bn1.running_mean [256]
layer3.3.bn1.running_var [256]
layer3.3.bn1.num_batches_tracked []
layer3.3.conv2.weight [256, 256, 3, 3]
layer3.3.bn2.weight [256]
layer3.3.bn2.bias [256]
layer3.3.bn2.running_mean [256]
layer3.3.bn2.running_var [256]
layer3.3.bn2.num_batches_tracked []
layer3.3.conv3.weight [1024, 256, 1, 1]
layer3.3.bn3.weight [1024]
layer3.3.bn3.bias [1024]
layer3.3.bn3.running_mean [1024]
layer3.3.bn3.running_var [1024]
layer3.3.bn3.num_batches_tracked []
layer3.4.conv1.weight [256, 1024, 1, 1]
layer3.4.bn1.weight [256]
layer3.4.bn1.bias [256]
layer3.4.bn1.running_mean [256]
layer3.4.bn1.running_var [256]
layer3.4.bn1.num_batches_tracked []
layer3.4.conv2.weight [256, 256, 3, 3]
layer3.4.bn2.weight [256]
layer3.4.bn2.bias [256]
layer3.4.bn2.running_mean [256]
layer3.4.bn2.running_var [256]
layer3.4.bn2.num_batches_tracked []
layer3.4.conv3.weight [1024, 256, 1, 1]
layer3.4.bn3.weight [1024]
layer3.4.bn3.bias [1024]
layer3.4.bn3.running_mean [1024]
layer3.4.bn3.running_var [1024]
layer3.4.bn3.num_batches_tracked []
layer3.5.conv1.weight [256, 1024, 1, 1]
layer3.5.bn1.weight [256]
layer3.5.bn1.bias [256]
layer3.5.bn1.running_mean [256]
layer3.5.bn1.running_var [256]
layer3.5.bn1.num_batches_tracked []
layer3.5.conv2.weight [256, 256, 3, 3]
layer3.5.bn2.weight [256]
layer3.5.bn2.bias [256]
layer3.5.bn2.running_mean [256]
layer3.5.bn2.running_var [256]
layer3.5.bn2.num_batches_tracked []
layer3.5.conv3.weight [1024, 256, 1, 1]
layer3.5.bn3.weight [1024]
layer3.5.bn3.bias [1024]
layer3.5.bn3.running_mean [1024]
layer3.5.bn3.running_var [1024]
layer3.5.bn3.num_batches_tracked []
layer4.0.conv1.weight [512, 1024, 1, 1]
layer4.0.bn1.weight [512]
layer4.0.bn1.bias [512]
layer4.0.bn1.running_mean [512]
layer4.0.bn1.running_var [512]
layer4.0.bn1.num_batches_tracked []
layer4.0.conv2.weight [512, 512, 3, 3]
layer4.0.bn2.weight [512]
layer4.0.bn2.bias [512]
layer4.0.bn2.running_mean [512]
layer4.0.bn2.running_var [512]
layer4.0.bn2.num_batches_tracked []
layer4.0.conv3.weight [2048, 512, 1, 1]
layer4.0.bn3.weight [2048]
layer4.0.bn3.bias [2048]
layer4.0.bn3.running_mean [2048]
layer4.0.bn3.running_var [2048]
layer4.0.bn3.num_batches_tracked []
layer4.0.downsample.0.weight [2048, 1024, 1, 1]
layer4.0.downsample.1.weight [2048]
layer4.0.downsample.1.bias [2048]
layer4.0.downsample.1.running_mean [2048]
layer4.0.downsample.1.running_var [2048]
layer4.0.downsample.1.num_batches_tracked []
layer4.1.conv1.weight [512, 2048, 1, 1]
layer4.1.bn1.weight [512]
layer4.1.bn1.bias [512]
layer4.1.bn1.running_mean [512]
layer4.1.bn1.running_var [512]
layer4.1.bn1.num_batches_tracked []
layer4.1.conv2.weight [512, 512, 3, 3]
layer4.1.bn2.weight [512]
layer4.1.bn2.bias [512]
layer4.1.bn2.running_mean [512]
layer4.1.bn2.running_var [512]
layer4.1.bn2.num_batches_tracked []
layer4.1.conv3.weight [2048, 512, 1, 1]
layer4.1.bn3.weight [2048]
layer4.1.bn3.bias [2048]
layer4.1.bn3.running_mean [2048]
layer4.1.bn3.running_var [2048]
layer4.1.bn3.num_batches_tracked []
layer4.2.conv1.weight [512, 2048, 1, 1]
layer4.2.bn1.weight [512]
layer4.2.bn1.bias [512]
layer4.2.bn1.running_mean [512]
layer4.2.bn1.running_var [512]
layer4.2.bn1.num_batches_tracked []
layer4.2.conv2.weight [512, 512, 3, 3]
layer4.2.bn2.weight [512]
layer4.2.bn2.bias [512]
layer4.2.bn2.running_mean [512]
layer4.2.bn2.running_var [512]
layer4.2.bn2.num_batches_tracked []
layer4.2.conv3.weight [2048, 512, 1, 1]
layer4.2.bn3.weight [2048]
layer4.2.bn3.bias [2048]
layer4.2.bn3.running_mean [2048]
layer4.2.bn3.running_var [2048]
layer4.2.bn3.num_batches_tracked []
fc.weight [1000, 2048]
fc.bias [1000]
"""


def _meta_state(arch: str, **kw) -> dict:
    with torch.device("meta"):
        return create_model(arch, **kw)[1].state_dict()


def test_resnet50_keys_and_shapes_equal_torchvision():
    expected = [
        (name, tuple(json.loads(shape)))
        for name, shape in (line.split(" ", 1) for line in RESNET50_STATE.strip().splitlines())
    ]
    assert len(expected) == 320
    got = [(k, tuple(v.shape)) for k, v in _meta_state("resnet50").items()]
    assert got == expected


def test_resnet18_matches_torchvision_layout():
    state = _meta_state("resnet18")
    assert sum(v.numel() for k, v in state.items() if "running" not in k and "tracked" not in k) == 11689512
    assert tuple(state["conv1.weight"].shape) == (64, 3, 7, 7)
    assert tuple(state["layer2.0.downsample.0.weight"].shape) == (128, 64, 1, 1)
    assert "layer1.0.downsample.0.weight" not in state
    assert tuple(state["layer4.1.conv2.weight"].shape) == (512, 512, 3, 3)
    assert tuple(state["fc.weight"].shape) == (1000, 512)


@pytest.mark.parametrize("depth", [20, 56, 110])
def test_cifar_resnet_layout_is_cohens(depth):
    n = (depth - 2) // 6
    state = create_model(f"cifar_resnet{depth}").state_dict()
    assert all(k.startswith("1.") for k in state)
    assert len(state) == 6 + 3 * n * 12 + 2 * 6 + 2  # stem, blocks, two downsamples, fc
    assert f"1.layer1.{n - 1}.bn2.running_var" in state and f"1.layer1.{n}.conv1.weight" not in state
    assert [k for k in state if "downsample" in k and k.endswith("0.weight")] == [
        "1.layer2.0.downsample.0.weight",
        "1.layer3.0.downsample.0.weight",
    ]
    assert tuple(state["1.layer3.0.downsample.0.weight"].shape) == (64, 32, 1, 1)
    assert tuple(state["1.fc.weight"].shape) == (10, 64)


def test_wrn40_2_layout():
    state = _meta_state("wrn40_2")
    assert sum(v.numel() for k, v in state.items() if "running" not in k and "tracked" not in k) == 2243546
    assert tuple(state["block1.layer.0.convShortcut.weight"].shape) == (32, 16, 1, 1)
    assert "block1.layer.5.conv2.weight" in state and "block1.layer.6.conv1.weight" not in state
    assert "block1.layer.1.convShortcut.weight" not in state
    assert tuple(state["fc.weight"].shape) == (10, 128)


@pytest.mark.parametrize(
    "arch, kw, size, classes",
    [
        ("cifar_resnet20", {}, 32, 10),
        ("wrn40_2", {}, 16, 10),
        ("resnet18", {"num_classes": 7}, 32, 7),
        ("imagenet32_resnet110", {"num_classes": 5}, 16, 5),
    ],
)
def test_forward_gives_logits_of_right_shape(arch, kw, size, classes):
    torch.manual_seed(0)
    model = create_model(arch, **kw).eval()
    with torch.no_grad():
        out = model(torch.rand(2, 3, size, size))
    assert out.shape == (2, classes) and torch.isfinite(out).all()


def test_create_model_wraps_a_normalize_layer():
    model = create_model("cifar_resnet20")
    assert isinstance(model, nn.Sequential) and isinstance(model[0], NormalizeLayer)
    assert torch.allclose(model[0].mean.flatten(), torch.tensor(DATASET_STATS["cifar10"][0]))
    imagenet = create_model("resnet18")[0]
    assert torch.allclose(imagenet.std.flatten(), torch.tensor([0.229, 0.224, 0.225]))
    assert isinstance(create_model("cifar_resnet20", normalize=False)[0], nn.Identity)
    assert create_model("resnet18", dataset="cifar10")[1].fc.out_features == 10


def test_normalize_layer_has_no_state_and_computes_mean_std():
    layer = NormalizeLayer.for_dataset("cifar10")
    assert layer.state_dict() == {}
    x = torch.rand(2, 3, 4, 4)
    mean, std = DATASET_STATS["cifar10"]
    expected = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    assert torch.allclose(layer(x), expected)
    assert layer.to(torch.float64)(x.double()).dtype == torch.float64


@pytest.mark.parametrize(
    "call",
    [
        lambda: create_model("resnet34"),
        lambda: create_model("cifar_resnet20", dataset="mnist"),
        lambda: create_model("cifar_resnet20", num_classes=1),
        lambda: create_model("cifar_resnet20", num_classes=2.5),
        lambda: NormalizeLayer((0.5,), (0.0,)),
        lambda: NormalizeLayer((0.5, 0.5), (1.0,)),
    ],
)
def test_bad_arguments_raise_argument_error(call):
    with pytest.raises(ArgumentError):
        call()


def test_available_models():
    assert {"cifar_resnet20", "cifar_resnet56", "cifar_resnet110", "imagenet32_resnet110",
            "wrn40_2", "resnet18", "resnet50"} == set(available_models())
