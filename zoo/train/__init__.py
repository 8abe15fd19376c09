"""Training: the engine (``train``), its epoch loop, run directories, optimisers/schedulers/losses,
batched augmentation."""

from zoo.train.engine import TrainResult, train

__all__ = ["TrainResult", "train"]
