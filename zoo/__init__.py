"""medzoo: a model zoo for medical image classification.

    import zoo
    model = zoo.load("skin")                 # a trained model (zoo.api), ONNX Runtime by default
    model.predict("lesion.png")[0].label
    zoo.list_models()                        # architectures, as timm.list_models()
    net = zoo.create_model("resnet18", num_classes=7)   # an untrained network (torch), as timm

The names are imported when first used (PEP 562), so ``import zoo`` and ``zoo --help`` stay
light: no torch until a network is built or ``backend="torch"`` is asked for.
"""

from __future__ import annotations

import importlib
from typing import Any

from zoo._version import __version__

# public name → the module that defines it
_LAZY = {
    "load": "zoo.api",
    "Model": "zoo.api",
    "Ensemble": "zoo.api",
    "Prediction": "zoo.api",
    "ClassScore": "zoo.api",
    "create_model": "zoo.models.registry",
    "list_models": "zoo.models.registry",
    "register_model": "zoo.models.registry",
    "load_image": "zoo.preprocess",
    "Preprocessing": "zoo.preprocess",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'zoo' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
