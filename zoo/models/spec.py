"""What the registry knows about one architecture (:class:`ModelSpec`), as data: no torch, and
nothing of the registry itself, so that the catalogue (:mod:`zoo.models.catalog`) and the registry
(:mod:`zoo.models.registry`) both build on it without importing each other."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

STANDARD_SIZES: tuple[int, ...] = (28, 64, 128, 224)


@dataclass(frozen=True)
class ModelSpec:
    """What the registry knows about one architecture."""

    name: str
    entry: str  # "package.module:function" of the builder (imported when a model is built)
    min_size: int = 28
    max_size: int | None = None
    fixed_size: int | None = None
    report: str = ""
    summary: str = ""
    supports_pretrained: bool = False
    # Grad-CAM target: dotted path of the module inside the network whose activations are read
    # (syntax in zoo.models.catalog; None: no convolutional feature map, gradient saliency instead).
    cam_layer: str | None = None
    # Keyword arguments an architecture cannot do without, for a small example network (tests,
    # benchmarks): the ``ensemble`` needs its members. Empty for every ordinary architecture.
    example_kwargs: dict[str, Any] = field(default_factory=dict, compare=False)
    _builder: Callable[..., Any] | None = field(default=None, compare=False, repr=False)

    @property
    def builder(self) -> Callable[..., Any]:
        """The builder function (imports the family module, hence torch)."""
        if self._builder is not None:
            return self._builder
        module, _, func = self.entry.partition(":")
        return getattr(importlib.import_module(module), func)

    def sizes(self) -> list[int]:
        """The standard input sizes this architecture supports (only ``fixed_size`` if set)."""
        if self.fixed_size is not None:
            return [self.fixed_size]
        return [s for s in STANDARD_SIZES if self.accepts(s)]

    def accepts(self, input_size: int) -> bool:
        """Whether a square input of ``input_size`` pixels is accepted."""
        if self.fixed_size is not None:
            return input_size == self.fixed_size
        if input_size < self.min_size:
            return False
        return self.max_size is None or input_size <= self.max_size

    def size_rule(self) -> str:
        """Human-readable statement of the accepted sizes."""
        if self.fixed_size is not None:
            return f"exactly {self.fixed_size} px"
        if self.max_size is None:
            return f"{self.min_size} px or more"
        return f"{self.min_size} to {self.max_size} px"

    def describe(self) -> dict[str, Any]:
        """JSON view (``zoo models --json``)."""
        return {"name": self.name, "report": self.report, "summary": self.summary, "sizes": self.sizes(),
                "size_rule": self.size_rule(), "pretrained": self.supports_pretrained, "cam_layer": self.cam_layer}


__all__ = ["STANDARD_SIZES", "ModelSpec"]
