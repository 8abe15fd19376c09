"""The run directory of a training run: its lock, its epoch snapshots, resume.

A run lives in ``<store>/runs/<run id>`` (same recipe and data → same id, which is what
``--resume`` finds). Each run holds an exclusive lock (``flock``) on its directory for as long as
it trains, so two ``zoo train`` of the same recipe at the same time never share one: the second
takes the next free slot (``<run id>.2``, ``.3`` …). Every epoch ends with an atomic snapshot
(``state.pt``: weights, optimiser, scheduler, RNGs, history, best weights) that ``--resume``
continues from; a finished run leaves ``done.json`` (naming its bundle) and no snapshot, which a
later ``--resume`` of the same recipe returns instead of training again.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from zoo.errors import TrainingError
from zoo.io import FileLock, atomic_file, file_lock, write_json

log = logging.getLogger(__name__)
STATE = "state.pt"
DONE = "done.json"
LOCK = ".lock"
MAX_SLOTS = 64


@dataclass
class Progress:
    """What a run has done so far (the part of a snapshot that is not a module's state)."""

    next_epoch: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    best_score: float = float("-inf")
    best_epoch: int = -1
    best_state: dict[str, torch.Tensor] | None = None
    bad_epochs: int = 0


class RunDir:
    """A locked run directory (see the module docstring); use as a context manager."""

    def __init__(self, base: Path, run_id: str, resume: bool, path: Path | None = None) -> None:
        self.run_id = run_id
        self._lock: FileLock | None = None
        # ``path`` given: a follower (a distributed rank other than 0) reading rank 0's directory,
        # which it neither locks nor writes
        self.writer = path is None
        self.path = self._claim(base, run_id, resume) if path is None else path

    def _try_lock(self, path: Path) -> bool:
        """Take the slot's lock (held for the whole run) unless another run holds it."""
        self._lock = file_lock(path / LOCK, blocking=False)
        return self._lock is not None

    def _claim(self, base: Path, run_id: str, resume: bool) -> Path:
        slots = [base / (run_id if k == 1 else f"{run_id}.{k}") for k in range(1, MAX_SLOTS + 1)]
        if resume:  # the first unlocked slot holding a snapshot, else a fresh one
            for path in slots:
                if (path / STATE).is_file() and self._try_lock(path):
                    return path
        for path in slots:
            if self._try_lock(path):
                if path != slots[0]:
                    log.warning("%s is in use by another `zoo train`; this run uses %s", slots[0].name, path.name)
                return path
        raise TrainingError(f"more than {MAX_SLOTS} concurrent runs of {run_id}; wait for one to finish")

    @property
    def state_file(self) -> Path:
        return self.path / STATE

    def save(self, snapshot: dict[str, Any]) -> None:
        if not self.writer:
            return
        atomic_file(self.state_file, lambda tmp: torch.save(snapshot, tmp))

    def load(self, device: torch.device) -> dict[str, Any] | None:
        """The last snapshot (``weights_only``: tensors and plain containers, never code)."""
        if not self.state_file.is_file():
            return None
        return torch.load(self.state_file, map_location=device, weights_only=True)

    def finish(self, bundle: Path) -> None:
        write_json(self.path / DONE, {"bundle": str(bundle)})
        self.state_file.unlink(missing_ok=True)

    def finished_bundle(self) -> Path | None:
        """The bundle this run directory finished with, when it did and the bundle is still there."""
        if self.state_file.is_file() or not (self.path / DONE).is_file():
            return None
        try:
            bundle = Path(json.loads((self.path / DONE).read_text(encoding="utf-8"))["bundle"])
        except (OSError, ValueError, KeyError, TypeError):
            return None
        return bundle if (bundle / "card.json").is_file() else None

    def release(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def __enter__(self) -> RunDir:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def progress_of(snapshot: dict[str, Any]) -> Progress:
    """What a snapshot says of the run (``best_is_net``: the best weights are the snapshot's network)."""
    best = snapshot["net"] if snapshot.get("best_is_net") else snapshot["best_state"]
    return Progress(next_epoch=snapshot["epoch"] + 1, history=snapshot["history"], best_score=snapshot["best_score"],
                    best_epoch=snapshot["best_epoch"], best_state=best, bad_epochs=snapshot["bad_epochs"])


__all__ = ["LOCK", "STATE", "Progress", "RunDir", "progress_of"]
