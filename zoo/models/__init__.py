"""Model registry and every architecture of the zoo (one module per family).

Importing this package registers all families; use :func:`create_model` to build one.
"""

from . import alexnet, isic_cnn, lenet, mlp, organ_cnn, resnet, simplecnn, xception
from .registry import (
    STANDARD_SIZES,
    ModelSpec,
    WeightsUnavailableError,
    create_model,
    get_spec,
    list_models,
    register_model,
)

__all__ = [
    "STANDARD_SIZES",
    "ModelSpec",
    "WeightsUnavailableError",
    "alexnet",
    "create_model",
    "get_spec",
    "isic_cnn",
    "lenet",
    "list_models",
    "mlp",
    "organ_cnn",
    "register_model",
    "resnet",
    "simplecnn",
    "xception",
]
