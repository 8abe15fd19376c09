"""Training: the engine (``train``), its epoch loop, run directories, optimisers/schedulers/losses,
batched augmentation, weight averaging (EMA / SWA), seed ensembles (``ensemble_bundles``)."""

from zoo.train.engine import TrainResult
from zoo.train.ensemble import ensemble_bundles, train_ensemble
from zoo.train.entry import train

__all__ = ["TrainResult", "ensemble_bundles", "train", "train_ensemble"]
