"""Tests of the model registry and of every architecture in ``zoo.models``."""

from __future__ import annotations

import urllib.error
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file
from torch import nn
from torchvision.models import ResNet18_Weights, alexnet, resnet18

from zoo.models import (
    STANDARD_SIZES,
    ModelSpec,
    WeightsUnavailableError,
    create_model,
    get_spec,
    list_models,
)
from zoo.models.lenet import AdaptiveMaxPool2d

EXPECTED_MODELS = {
    "mlp",
    "lenet",
    "lenet_binary",
    "simplecnn_v1",
    "simplecnn",
    "cnn28",
    "cnn128",
    "isic_cnn",
    "alexnet",
    "alexnet_bn",
    "alexnet_nbase",
    "resnet18",
    "resnet50",
    "resnet152",
    "resnet50_tl",
    "xception",
    "ensemble",
}

# The heaviest combinations (1e8-3.4e8 parameters, or 10+ GFLOPs per image) run with one channel
# count each, alternating, to keep this file fast on 2 cores; the channel count only changes the
# first conv, which every other size exercises with both.
HEAVY_CHANNELS = {
    ("cnn128", 128): (3,),
    ("cnn128", 224): (1,),
    ("isic_cnn", 224): (1,),
    ("resnet152", 128): (3,),
    ("resnet152", 224): (1,),
    ("xception", 224): (3,),
}
CASES = [
    pytest.param(name, size, channels, id=f"{name}-{size}px-{channels}ch")
    for name in list_models()
    for size in get_spec(name).sizes()
    for channels in HEAVY_CHANNELS.get((name, size), (1, 3))
]


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def n_params(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of (trainable) parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def check_forward_backward(
    model: nn.Module, channels: int, size: int, num_classes: int, batch: int = 2
) -> None:
    """Forward in train mode: logits shape, then finite grads on every trainable parameter."""
    model.train()
    out = model(torch.randn(batch, channels, size, size))
    assert out.shape == (batch, num_classes)
    assert torch.isfinite(out).all()
    out.square().mean().backward()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert trainable
    for name, param in trainable:
        assert param.grad is not None, name
        # NaN and inf propagate through a sum, which needs no 3e8-entry temporary like isfinite
        assert torch.isfinite(param.grad.sum()), name


def test_every_expected_model_is_registered() -> None:
    assert set(list_models()) == EXPECTED_MODELS
    assert list_models() == sorted(list_models())
    for name in list_models():
        spec = get_spec(name)
        assert spec.name == name and spec.report and spec.summary
        assert spec.sizes(), name


@pytest.mark.parametrize(("name", "size", "channels"), CASES)
def test_forward_backward_every_supported_size(name: str, size: int, channels: int) -> None:
    model = create_model(name, num_classes=3, in_channels=channels, input_size=size, **get_spec(name).example_kwargs)
    check_forward_backward(model, channels, size, 3)


@pytest.mark.parametrize("name", list_models())
def test_min_size_is_exact(name: str) -> None:
    spec = get_spec(name)
    if spec.example_kwargs:
        pytest.skip("an ensemble's smallest input is its members'")
    model = create_model(name, num_classes=2, in_channels=1, input_size=spec.min_size)
    # batch 4: with 1x1 feature maps, BatchNorm over only 2 values overflows ResNet-152's grads
    check_forward_backward(model, 1, spec.min_size, 2, batch=4)
    if spec.min_size > 1:
        with pytest.raises(ValueError, match=name):
            create_model(name, num_classes=2, in_channels=1, input_size=spec.min_size - 1)


@pytest.mark.parametrize("name", ["mlp", "lenet_binary", "alexnet_nbase", "resnet18", "xception"])
def test_single_logit_head(name: str) -> None:
    model = create_model(name, num_classes=1, in_channels=1, input_size=64)
    check_forward_backward(model, 1, 64, 1)


def test_expected_min_sizes() -> None:
    assert get_spec("alexnet").min_size == 63
    assert get_spec("alexnet").sizes() == [64, 128, 224]
    assert get_spec("isic_cnn").min_size == 16
    assert get_spec("xception").min_size == 7
    for name in set(EXPECTED_MODELS) - {"alexnet", "alexnet_bn"}:
        assert get_spec(name).sizes() == list(STANDARD_SIZES), name


@pytest.mark.parametrize("depth", [18, 50, 152])
def test_resnet_small_stem(depth: int) -> None:
    model: Any = create_model(f"resnet{depth}", 4, in_channels=1, input_size=28, stem="small")
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)
    assert isinstance(model.maxpool, nn.Identity)
    check_forward_backward(model, 1, 28, 4)


def test_resnet_small_stem_larger_input() -> None:
    # the stem is the only size-dependent part: adaptive pooling takes any map after layer4
    check_forward_backward(create_model("resnet18", 4, 3, 128, stem="small"), 3, 128, 4)


def test_sizes_of_spec_variants() -> None:
    def build(*args: object) -> nn.Module:
        return nn.Identity()

    fixed = ModelSpec("f", "tests:build", min_size=28, fixed_size=224, _builder=build)
    assert fixed.sizes() == [224] and fixed.builder is build
    bounded = ModelSpec("b", "tests:build", min_size=60, max_size=130, _builder=build)
    assert bounded.sizes() == [64, 128]


def test_unsupported_size_message() -> None:
    with pytest.raises(ValueError) as info:
        create_model("alexnet", 5, 3, input_size=28)
    message = str(info.value)
    assert "alexnet" in message and "28" in message and "64, 128, 224" in message


def test_unknown_model_lists_known_ones() -> None:
    with pytest.raises(ValueError) as info:
        create_model("vgg16", 5)
    assert "vgg16" in str(info.value)
    for name in EXPECTED_MODELS:
        assert name in str(info.value)
    with pytest.raises(ValueError, match="resnet18"):
        get_spec("nope")


def test_unknown_kwarg() -> None:
    with pytest.raises(ValueError) as info:
        create_model("resnet18", 5, depth=34)
    message = str(info.value)
    assert "resnet18" in message and "depth" in message and "stem" in message
    with pytest.raises(ValueError, match="alexnet_bn"):
        create_model("alexnet_bn", 5, input_size=64, batchnorm=False)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_classes": 0}, "num_classes"),
        ({"in_channels": 2}, "in_channels"),
        ({"input_size": 28.0}, "input_size"),
        ({"pretrained": True}, "pretrained"),
    ],
)
def test_invalid_arguments(kwargs: dict[str, object], match: str) -> None:
    args: dict[str, object] = {"num_classes": 3, "in_channels": 3, "input_size": 28}
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        create_model("simplecnn", **args)  # type: ignore[arg-type]


def test_invalid_kwarg_values() -> None:
    with pytest.raises(ValueError, match="stem"):
        create_model("resnet50", 5, stem="tiny")
    with pytest.raises(ValueError, match="activation"):
        create_model("mlp", 5, activation="gelu")
    with pytest.raises(ValueError, match="middle_blocks"):
        create_model("xception", 5, middle_blocks=-1)


def test_model_variants_build() -> None:
    mlp = create_model("mlp", 11, 1, 28, hidden=[], batchnorm=False, dropout=0.0)
    assert [type(m) for m in mlp.children()] == [nn.Flatten, nn.Linear]
    tanh = create_model("mlp", 11, 1, 28, activation="tanh")
    assert any(isinstance(m, nn.Tanh) for m in tanh.modules())
    bn_only = create_model("simplecnn", 9, 3, 28, dropout=False)
    assert not any(isinstance(m, nn.Dropout) for m in bn_only.modules())
    drop_only = create_model("simplecnn", 9, 3, 28, batchnorm=False)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in drop_only.modules())
    check_forward_backward(drop_only, 3, 28, 9)
    with_bn = create_model("alexnet", 9, 3, 64, batchnorm=True)
    convs = sum(isinstance(m, nn.Conv2d) for m in with_bn.modules())
    assert convs == 5 == sum(isinstance(m, nn.BatchNorm2d) for m in with_bn.modules())
    nbase = create_model("alexnet_nbase", 1, 1, 128, n_base=8, dropout=0.4)
    assert sum(isinstance(m, nn.Dropout) for m in nbase.modules()) == 2
    plain = create_model("alexnet_nbase", 1, 1, 128)
    assert not any(isinstance(m, nn.Dropout) for m in plain.modules())
    short: Any = create_model("xception", 3, 3, 64, middle_blocks=2)
    assert len(short.middle) == 2
    check_forward_backward(short, 3, 64, 3)


@pytest.mark.parametrize("side", [1, 2, 3, 7, 13, 14, 16, 32, 56, 64, 112])
def test_lenet_adaptive_max_pool_matches_torch(side: int) -> None:
    x = torch.randn(2, 3, side, side + 1)
    assert torch.equal(AdaptiveMaxPool2d(7)(x), nn.AdaptiveMaxPool2d(7)(x))


def test_resnet50_tl_backbone_frozen() -> None:
    model: Any = create_model("resnet50_tl", 11, 3, 64)
    for name, param in model.named_parameters():
        assert param.requires_grad == name.startswith("fc."), name
    batchnorms: list[Any] = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert batchnorms
    before = [bn.running_mean.clone() for bn in batchnorms]
    model.train()
    assert all(not bn.training for bn in batchnorms)
    assert model.training and model.fc.training
    check_forward_backward(model, 3, 64, 11)
    for bn, mean in zip(batchnorms, before, strict=True):
        assert torch.equal(bn.running_mean, mean)
    model.eval()
    assert not model.fc.training
    model.train(True)
    assert all(not bn.training for bn in batchnorms)


def meta_params(name: str, *args: int, trainable_only: bool = False, **kwargs: object) -> int:
    """Parameter count of a model built on the meta device (no memory, no init cost)."""
    with torch.device("meta"):
        return n_params(create_model(name, *args, **kwargs), trainable_only)  # type: ignore[arg-type]


def test_parameter_counts_match_reports() -> None:
    # report 002 (OrganAMNIST grey, 11 classes)
    assert abs(meta_params("cnn28", 11, 1, 28) / 3.3e5 - 1) <= 0.30
    assert abs(meta_params("cnn128", 11, 1, 128) / 1.1e8 - 1) <= 0.30
    trainable = meta_params("resnet50_tl", 11, 1, 128, trainable_only=True)
    assert 4.6e5 / 2 <= trainable <= 4.6e5 * 2
    assert abs(meta_params("mlp", 11, 1, 28, hidden=[]) / 8.6e3 - 1) <= 0.05
    assert abs(meta_params("mlp", 11, 1, 28, hidden=[256]) / 2.0e5 - 1) <= 0.05
    assert abs(meta_params("mlp", 11, 1, 28, hidden=[256, 256]) / 2.7e5 - 1) <= 0.05
    assert abs(meta_params("mlp", 11, 1, 128, hidden=[256, 256]) / 4.3e6 - 1) <= 0.05
    # report 004's Keras summary (128 px grey, one sigmoid output)
    assert meta_params("lenet_binary", 1, 1, 128) == 4_213_249
    # report 003: 32*53*53 = 89,888 features into the first FC layer at 224 px
    with torch.device("meta"):
        isic: Any = create_model("isic_cnn", 8, 3, 224)
    assert isic[7].in_features == 32 * 53 * 53 == 89_888
    # torchvision / Chollet 2017 sizes with 1000 classes
    with torch.device("meta"):
        reference = n_params(resnet18())
    assert meta_params("resnet18", 1000, 3, 224) == reference
    assert abs(meta_params("xception", 1000, 3, 224) / 22.9e6 - 1) <= 0.01


def _save_state(state: dict[str, torch.Tensor], path: Path) -> Path:
    state = {k: v.contiguous() for k, v in state.items()}
    if path.suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save(state, path)
    return path


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_pretrained_from_local_file(tmp_path: Path, suffix: str) -> None:
    reference = resnet18()
    path = _save_state(reference.state_dict(), tmp_path / f"weights{suffix}")
    model: Any = create_model("resnet18", 5, pretrained=path)
    assert torch.equal(model.conv1.weight, reference.conv1.weight)
    assert torch.equal(model.layer4[1].bn2.running_var, reference.layer4[1].bn2.running_var)
    assert model.fc.out_features == 5
    grey: Any = create_model("resnet18", 5, in_channels=1, pretrained=str(path))
    assert grey.conv1.weight.shape == (64, 1, 7, 7)
    assert torch.allclose(grey.conv1.weight, reference.conv1.weight.sum(dim=1, keepdim=True))
    assert torch.equal(grey.layer1[0].conv1.weight, reference.layer1[0].conv1.weight)


def test_pretrained_local_file_with_other_head(tmp_path: Path) -> None:
    reference = resnet18(num_classes=7)
    path = _save_state(reference.state_dict(), tmp_path / "w.safetensors")
    model: Any = create_model("resnet18", 3, pretrained=path)
    assert torch.equal(model.conv1.weight, reference.conv1.weight)
    assert model.fc.out_features == 3


def test_pretrained_alexnet_bn_keeps_conv_weights(tmp_path: Path) -> None:
    reference = alexnet()
    path = _save_state(reference.state_dict(), tmp_path / "alexnet.safetensors")
    model: Any = create_model("alexnet_bn", 9, in_channels=1, input_size=64, pretrained=path)
    convs = [m for m in model.features if isinstance(m, nn.Conv2d)]
    ref_convs = [m for m in reference.features if isinstance(m, nn.Conv2d)]
    assert torch.allclose(convs[0].weight, ref_convs[0].weight.sum(dim=1, keepdim=True))
    for conv, ref in zip(convs[1:], ref_convs[1:], strict=True):
        assert torch.equal(conv.weight, ref.weight)
    assert torch.equal(model.classifier[4].weight, reference.classifier[4].weight)
    assert model.classifier[6].out_features == 9


def test_pretrained_file_errors(tmp_path: Path) -> None:
    with pytest.raises(WeightsUnavailableError, match="not found"):
        create_model("resnet18", 5, pretrained=str(tmp_path / "missing.pth"))
    other = tmp_path / "weights.bin"
    other.write_bytes(b"\0")
    with pytest.raises(ValueError, match="safetensors"):
        create_model("resnet18", 5, pretrained=str(other))
    wrong = _save_state(alexnet().features.state_dict(), tmp_path / "wrong.safetensors")
    with pytest.raises(ValueError, match="do not fit"):
        create_model("resnet18", 5, pretrained=wrong)


def _offline(monkeypatch: pytest.MonkeyPatch, torch_home: Path) -> None:
    """No network and an empty torch hub cache."""
    monkeypatch.setenv("TORCH_HOME", str(torch_home))

    def refuse(url: str, *args: object, **kwargs: object) -> None:
        raise urllib.error.URLError("network is unreachable")

    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)


def test_pretrained_true_offline_raises(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    _offline(monkeypatch, tmp_path)
    url = ResNet18_Weights.IMAGENET1K_V1.url
    with pytest.raises(WeightsUnavailableError) as info:
        create_model("resnet18", 5, pretrained=True)
    message = str(info.value)
    assert "\n" not in message
    assert Path(url).name in message and url in message
    assert 'pretrained="/path/to/weights.safetensors|.pth"' in message
    assert isinstance(info.value, RuntimeError)


def test_pretrained_true_uses_hub_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    _offline(monkeypatch, tmp_path)
    reference = resnet18()
    cache = tmp_path / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.save(reference.state_dict(), cache / Path(ResNet18_Weights.IMAGENET1K_V1.url).name)
    model: Any = create_model("resnet18", 5, in_channels=1, pretrained=True)
    assert torch.allclose(model.conv1.weight, reference.conv1.weight.sum(dim=1, keepdim=True))
