"""Training: the engine (``train``), optimisers/schedulers/losses, batched augmentation."""

from zoo.train.engine import TrainResult, load_splits, predict_logits, train

__all__ = ["TrainResult", "load_splits", "predict_logits", "train"]
