"""Every architecture of the zoo, as data: name, builder, sizes, report, pretrained weights,
Grad-CAM layer. The code of each family lives in its own module (``zoo/models/<family>.py``);
this table is what the registry lists without importing torch.

``cam_layer`` is the module whose output Grad-CAM reads (:mod:`zoo.explain`): the last
convolutional feature map before the network pools it away, after its activation where the
family has one. It is a dotted path inside the network; a step is a child's name (``layer4``),
an index into a ``Sequential`` (``4``, ``-1``), or ``Type[i]``, the ``i``-th child of that class
(``ReLU[-1]``: the last ReLU child), used where keyword arguments of the family insert or remove
layers and move the indices (``alexnet``'s ``batchnorm``, ``cnn28``'s ``pool``, ``cnn128``'s
``n_convs``, ``simplecnn``'s ``batchnorm``). ``None``: no convolutional feature map (the MLP),
explained by gradient saliency instead.
"""

from __future__ import annotations

from zoo.models.spec import ModelSpec

_RESNET = "torchvision ResNet-{d}, fc replaced; stem 'imagenet' or 'small' (MedMNIST)"
# ResNets: the output of the last stage (torchvision's and pytorch-grad-cam's usual choice). With
# the ImageNet stem it is input/32 per side: 7x7 at 224 px, 1x1 at 28 px (no localisation; the
# 'small' stem keeps 4x4 at 28 px). zoo.explain reports the feature-map size with every map.
_RESNET_CAM = "layer4"

ARCHITECTURES: tuple[ModelSpec, ...] = (
    # features = conv, [BN], ReLU, pool ... conv, [BN], ReLU, pool: the ReLU after the 5th conv
    ModelSpec("alexnet", "zoo.models.alexnet:build_alexnet", min_size=63, report="001",
              summary="torchvision AlexNet (ImageNet weights available), last layer replaced",
              supports_pretrained=True, cam_layer="features.ReLU[-1]"),
    ModelSpec("alexnet_bn", "zoo.models.alexnet:build_alexnet_bn", min_size=63, report="001",
              summary="torchvision AlexNet with BatchNorm2d after every conv", supports_pretrained=True,
              cam_layer="features.ReLU[-1]"),
    # conv/ReLU pairs at 0-1, 3-4, 6-7, 8-9, 10-11, pool at 12: the ReLU after the 5th conv
    ModelSpec("alexnet_nbase", "zoo.models.alexnet:build_alexnet_nbase", min_size=8, report="004",
              summary="AlexNet-style convs n/2n/4n/4n/2n (k3, 3 max pools), dense 64, 64, out",
              cam_layer="11"),
    ModelSpec("ensemble", "zoo.models.ensemble:build_ensemble", min_size=1, report="medzoo",
              summary="seed ensemble: the mean of its member networks' logits (zoo train … --seeds N)",
              example_kwargs={"members": [{"arch": "simplecnn"}, {"arch": "simplecnn_v1"}]}),
    # conv 0, ReLU 1, pool 2, conv 3, ReLU 4, pool 5: the ReLU after the 2nd conv (8x8 at 28 px)
    ModelSpec("isic_cnn", "zoo.models.isic_cnn:build_isic_cnn", min_size=16, report="003",
              summary="conv 16 k5, pool, conv 32 k5, pool, FC 1200, 840, out (32x53x53 at 224 px)",
              cam_layer="4"),
    # conv 0, ReLU 1, pool 2, conv 3, ReLU 4, adaptive pool 5: before the 7x7 adaptive pool
    ModelSpec("lenet", "zoo.models.lenet:build_lenet", min_size=2, report="000",
              summary="LeNet: 2 convs k5 p2 (6, 16), adaptive max pool 7x7, 4 FC layers, dropout 0.5",
              cam_layer="4"),
    ModelSpec("lenet_binary", "zoo.models.lenet:build_lenet_binary", min_size=4, report="004",
              summary="LeNet-like: conv 32 k3, pool, conv 64 k3, pool, dense 64, dense out (1 logit)",
              cam_layer="4"),
    ModelSpec("mlp", "zoo.models.mlp:build_mlp", min_size=1, report="000",
              summary="MLP on the flattened image; hidden [256, 128], Linear-BN-ReLU-Dropout"),
    # the 2nd ReLU follows the 2nd conv with or without the pools (pool=False)
    ModelSpec("cnn28", "zoo.models.organ_cnn:build_cnn28", min_size=4, report="002",
              summary="2 convs (32, 64, ReLU, max pool) + hidden FC 100 + output; 3.3e5 params at 28 px",
              cam_layer="ReLU[1]"),
    # n_convs conv/ReLU pairs then FC/ReLU pairs: the last conv is the one fixed point (no pooling:
    # full resolution)
    ModelSpec("cnn128", "zoo.models.organ_cnn:build_cnn128", min_size=1, report="002",
              summary="constant-width convs, no pooling, 3 hidden FC of 286; 1.1e8 params at 128 px",
              cam_layer="Conv2d[-1]"),
    ModelSpec("resnet18", "zoo.models.resnet:build_resnet18", min_size=1, report="001",
              summary=_RESNET.format(d=18), supports_pretrained=True, cam_layer=_RESNET_CAM),
    ModelSpec("resnet50", "zoo.models.resnet:build_resnet50", min_size=1, report="003",
              summary=_RESNET.format(d=50), supports_pretrained=True, cam_layer=_RESNET_CAM),
    ModelSpec("resnet152", "zoo.models.resnet:build_resnet152", min_size=1, report="001",
              summary=_RESNET.format(d=152), supports_pretrained=True, cam_layer=_RESNET_CAM),
    ModelSpec("resnet50_tl", "zoo.models.resnet:build_resnet50_tl", min_size=1, report="002",
              summary="ResNet-50 backbone frozen (BN in eval), fc replaced by a trainable MLP head",
              supports_pretrained=True, cam_layer=_RESNET_CAM),
    # conv 0, LeakyReLU 1, pool 2, conv 3, LeakyReLU 4, pool 5: before the 2nd pool (14x14 at 28 px)
    ModelSpec("simplecnn_v1", "zoo.models.simplecnn:build_simplecnn_v1", min_size=4, report="001",
              summary="SimpleCNN v1: conv 32 / conv 64 (k3 same, LeakyReLU, max pool), linear",
              cam_layer="4"),
    # block conv3 = conv, [BN], ReLU, pool, [dropout]: its ReLU, before the pool (7x7 at 28 px)
    ModelSpec("simplecnn", "zoo.models.simplecnn:build_simplecnn", min_size=8, report="001",
              summary="SimpleCNN: 3 conv blocks 32/64/128 (BN, ReLU, pool, dropout 0.25), fc 256, fc out",
              cam_layer="conv3.ReLU[0]"),
    # exit = block, sepconv, BN, ReLU, sepconv 2048, BN, ReLU (6), global pool: the last ReLU
    ModelSpec("xception", "zoo.models.xception:build_xception", min_size=7, report="001",
              summary="Xception (Chollet 2017): entry/middle(8)/exit flows of separable convs, global pool",
              cam_layer="exit.6"),
)
