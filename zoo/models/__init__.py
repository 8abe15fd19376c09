"""Model registry and every architecture of the zoo (one module per family).

The registry (names, sizes, reports) imports no torch; :func:`create_model` imports the family
module of the architecture it builds. Family modules: ``alexnet``, ``isic_cnn``, ``lenet``,
``mlp``, ``organ_cnn``, ``resnet``, ``simplecnn``, ``xception``; pretrained weights: ``weights``.
"""

from zoo.errors import WeightsUnavailableError
from zoo.models.registry import (
    STANDARD_SIZES,
    ModelSpec,
    create_model,
    get_spec,
    list_models,
    model_kwargs,
    register_model,
)

__all__ = [
    "STANDARD_SIZES",
    "ModelSpec",
    "WeightsUnavailableError",
    "create_model",
    "get_spec",
    "list_models",
    "model_kwargs",
    "register_model",
]
