"""torchvision ResNets (reports 000, 001, 002, 003) and the frozen-backbone transfer model.

``resnet18`` / ``resnet50`` / ``resnet152``: torchvision's networks with ``fc`` replaced. The
``stem`` keyword picks the first layers: ``"imagenet"`` (torchvision's 7×7 stride-2 conv and
3×3 stride-2 max pool) or ``"small"``, MedMNIST v2's 28 px stem (3×3 stride-1 conv, no max pool),
which keeps 4× more resolution (and costs ~16× the compute at a given size). A 1-channel model
gets a 1-channel first conv; with the ImageNet stem and pretrained weights its kernel is the sum
of the pretrained RGB kernels. With ``stem="small"`` the pretrained 7×7 kernel does not fit and
the new 3×3 stem starts from random weights while the rest of the network is pretrained.

``resnet50_tl`` (report 002): ResNet-50 whose whole backbone is frozen (``requires_grad=False``,
BatchNorm kept in eval mode even under ``.train()``), with ``fc`` replaced by an MLP head. The
default head ``[224]`` has 2048·224 + 224 + 224·11 + 11 = 461,451 trainable parameters with 11
classes, the report's 4.6e5 (its Optuna-tuned head is not given).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch import nn
from torchvision.models import ResNet18_Weights, ResNet50_Weights, ResNet152_Weights
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

from zoo.errors import UsageError
from zoo.models.weights import (
    Pretrained,
    load_backbone_state,
    resolve_pretrained,
)

_LAYOUTS: dict[int, tuple[type[BasicBlock | Bottleneck], list[int], str]] = {
    18: (BasicBlock, [2, 2, 2, 2], ResNet18_Weights.IMAGENET1K_V1.url),
    50: (Bottleneck, [3, 4, 6, 3], ResNet50_Weights.IMAGENET1K_V1.url),
    152: (Bottleneck, [3, 8, 36, 3], ResNet152_Weights.IMAGENET1K_V1.url),
}
STEMS = ("imagenet", "small")


class FrozenBackboneResNet(ResNet):
    """A ResNet whose non-head BatchNorm layers stay in eval mode in ``train()``."""

    def train(self, mode: bool = True) -> FrozenBackboneResNet:
        """Set the training mode of the head only; backbone BatchNorm stays in eval."""
        super().train(mode)
        for name, module in self.named_modules():
            if not name.startswith("fc") and isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.train(False)
        return self


def _resnet(
    depth: int,
    in_channels: int,
    pretrained: Pretrained,
    stem: str,
    arch: str,
    cls: type[ResNet] = ResNet,
) -> ResNet:
    """A torchvision ResNet of ``depth`` with its stem set and weights loaded (head still 1000)."""
    if stem not in STEMS:
        raise UsageError(f"{arch}: stem must be one of {STEMS}, got {stem!r}")
    block, layers, url = _LAYOUTS[depth]
    model = cls(block, layers)
    if in_channels != 3:
        model.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
    state = resolve_pretrained(pretrained, url, arch)
    if state is not None:
        load_backbone_state(model, state, first_conv="conv1", head_prefixes=("fc.",))
    if stem == "small":
        model.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
        nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
        model.maxpool = nn.Identity()
    return model


def _plain(depth: int) -> Callable[..., nn.Module]:
    """The builder of ``resnet{depth}``: torchvision's network with a ``num_classes`` head."""
    name = f"resnet{depth}"

    def build(
        num_classes: int,
        in_channels: int,
        input_size: int,
        pretrained: Pretrained = False,
        *,
        stem: str = "imagenet",
    ) -> nn.Module:
        model = _resnet(depth, in_channels, pretrained, stem, name)
        model.fc = nn.Linear(model.fc.in_features, num_classes)
        return model

    build.__name__ = build.__qualname__ = f"build_{name}"
    build.__doc__ = f"torchvision ResNet-{depth} with a ``num_classes`` head."
    return build


build_resnet18 = _plain(18)
build_resnet50 = _plain(50)
build_resnet152 = _plain(152)


def build_resnet50_tl(
    num_classes: int,
    in_channels: int,
    input_size: int,
    pretrained: Pretrained = False,
    *,
    head_hidden: Sequence[int] = (224,),
    head_dropout: float = 0.2,
) -> nn.Module:
    """Transfer learning model of report 002: frozen ResNet-50 + MLP head (use pretrained=True)."""
    if not 0.0 <= head_dropout < 1.0:
        raise UsageError(f"resnet50_tl: head_dropout must be in [0, 1), got {head_dropout}")
    model = _resnet(50, in_channels, pretrained, "imagenet", "resnet50_tl", FrozenBackboneResNet)
    for param in model.parameters():
        param.requires_grad_(False)
    head: list[nn.Module] = []
    width = model.fc.in_features
    for h in head_hidden:
        head += [nn.Linear(width, int(h)), nn.ReLU()]
        if head_dropout > 0:
            head.append(nn.Dropout(head_dropout))
        width = int(h)
    head.append(nn.Linear(width, num_classes))
    model.fc = nn.Sequential(*head)
    model.train()
    return model
