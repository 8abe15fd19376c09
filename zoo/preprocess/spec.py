"""What turns a file or an array into a model input: :class:`Preprocessing`, stored in every card
and every exported file."""

from __future__ import annotations

import dataclasses
from typing import Annotated, Any

from pydantic import ConfigDict, Field, model_validator
from pydantic.dataclasses import dataclass

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True, config=ConfigDict(extra="forbid"))
class Preprocessing:
    """Resolution of the arrays the model takes, the network's input size, channels, normalisation.

    A (validated, frozen) pydantic dataclass: ``Preprocessing(28, 224, 3, mean, std)`` works as
    before, and cards validate it as a field.
    """

    image_size: Annotated[int, Field(ge=1)]  # resolution of the arrays the model takes (the dataset's)
    input_size: Annotated[int, Field(ge=1)]  # resolution the network sees after the adapter's resize
    in_channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @model_validator(mode="after")
    def _check(self) -> Preprocessing:
        if self.in_channels not in (1, 3):
            raise ValueError(f"in_channels must be 1 or 3, not {self.in_channels}")
        if len(self.mean) != self.in_channels or len(self.std) != self.in_channels:
            raise ValueError("mean and std need one value per channel")
        if any(s <= 0 for s in self.std):
            raise ValueError("std must be positive")
        return self

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of one image as the model takes it (uint8)."""
        return (self.in_channels, self.image_size, self.image_size)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Preprocessing:
        return cls(**d)
