"""Every architecture of the zoo, as data: name, builder, sizes, report, pretrained weights,
Grad-CAM layer. The code of each family lives in its own module (``zoo/models/<family>.py``);
this table is what the registry lists without importing torch."""

from __future__ import annotations

from zoo.models.registry import ModelSpec

_RESNET = "torchvision ResNet-{d}, fc replaced; stem 'imagenet' or 'small' (MedMNIST)"

ARCHITECTURES: tuple[ModelSpec, ...] = (
    ModelSpec("alexnet", "zoo.models.alexnet:build_alexnet", min_size=63, report="001",
              summary="torchvision AlexNet (ImageNet weights available), last layer replaced",
              supports_pretrained=True),
    ModelSpec("alexnet_bn", "zoo.models.alexnet:build_alexnet_bn", min_size=63, report="001",
              summary="torchvision AlexNet with BatchNorm2d after every conv", supports_pretrained=True),
    ModelSpec("alexnet_nbase", "zoo.models.alexnet:build_alexnet_nbase", min_size=8, report="004",
              summary="AlexNet-style convs n/2n/4n/4n/2n (k3, 3 max pools), dense 64, 64, out"),
    ModelSpec("ensemble", "zoo.models.ensemble:build_ensemble", min_size=1, report="medzoo",
              summary="seed ensemble: the mean of its member networks' logits (zoo train … --seeds N)",
              example_kwargs={"members": [{"arch": "simplecnn"}, {"arch": "simplecnn_v1"}]}),
    ModelSpec("isic_cnn", "zoo.models.isic_cnn:build_isic_cnn", min_size=16, report="003",
              summary="conv 16 k5, pool, conv 32 k5, pool, FC 1200, 840, out (32x53x53 at 224 px)"),
    ModelSpec("lenet", "zoo.models.lenet:build_lenet", min_size=2, report="000",
              summary="LeNet: 2 convs k5 p2 (6, 16), adaptive max pool 7x7, 4 FC layers, dropout 0.5"),
    ModelSpec("lenet_binary", "zoo.models.lenet:build_lenet_binary", min_size=4, report="004",
              summary="LeNet-like: conv 32 k3, pool, conv 64 k3, pool, dense 64, dense out (1 logit)"),
    ModelSpec("mlp", "zoo.models.mlp:build_mlp", min_size=1, report="000",
              summary="MLP on the flattened image; hidden [256, 128], Linear-BN-ReLU-Dropout"),
    ModelSpec("cnn28", "zoo.models.organ_cnn:build_cnn28", min_size=4, report="002",
              summary="2 convs (32, 64, ReLU, max pool) + hidden FC 100 + output; 3.3e5 params at 28 px"),
    ModelSpec("cnn128", "zoo.models.organ_cnn:build_cnn128", min_size=1, report="002",
              summary="constant-width convs, no pooling, 3 hidden FC of 286; 1.1e8 params at 128 px"),
    ModelSpec("resnet18", "zoo.models.resnet:build_resnet18", min_size=1, report="001",
              summary=_RESNET.format(d=18), supports_pretrained=True),
    ModelSpec("resnet50", "zoo.models.resnet:build_resnet50", min_size=1, report="003",
              summary=_RESNET.format(d=50), supports_pretrained=True),
    ModelSpec("resnet152", "zoo.models.resnet:build_resnet152", min_size=1, report="001",
              summary=_RESNET.format(d=152), supports_pretrained=True),
    ModelSpec("resnet50_tl", "zoo.models.resnet:build_resnet50_tl", min_size=1, report="002",
              summary="ResNet-50 backbone frozen (BN in eval), fc replaced by a trainable MLP head",
              supports_pretrained=True),
    ModelSpec("simplecnn_v1", "zoo.models.simplecnn:build_simplecnn_v1", min_size=4, report="001",
              summary="SimpleCNN v1: conv 32 / conv 64 (k3 same, LeakyReLU, max pool), linear"),
    ModelSpec("simplecnn", "zoo.models.simplecnn:build_simplecnn", min_size=8, report="001",
              summary="SimpleCNN: 3 conv blocks 32/64/128 (BN, ReLU, pool, dropout 0.25), fc 256, fc out"),
    ModelSpec("xception", "zoo.models.xception:build_xception", min_size=7, report="001",
              summary="Xception (Chollet 2017): entry/middle(8)/exit flows of separable convs, global pool"),
)
