"""The served models: one ONNX Runtime session per task plus the ensemble members.

Runs inside the inference worker. :class:`ModelTable` opens what the configuration names,
remembers why a task has no model (the message its endpoint answers with 503), fits the
ensemble's prediction sets once (:func:`zoo.ensemble.ensemble_conformal`), runs batches,
counts the batch sizes each model saw and keeps each task's drift window (:mod:`serving.drift`: this
worker sees the images of every API worker).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from serving.config import (
    ENSEMBLE_ROUTE,
    Resolved,
    ServeConfig,
    ensemble_hint,
    resolve_ensemble,
    resolve_task,
)
from serving.drift import DriftMonitor
from serving.outputs import LOGITS, read_record, to_record
from serving.schemas import DriftAnswer, ServedEnsembleInfo, ServedModelInfo, ServedTable
from zoo.card import Card, ConformalInfo, ModelInfo, read_card
from zoo.ensemble import check_compatible, ensemble_conformal
from zoo.errors import BundleError, EnsembleError, ModelFileError
from zoo.postprocess import interpret
from zoo.runtime import GPU_PROVIDERS, OnnxModel, RuntimeOptions
from zoo.settings import runtime_options

log = logging.getLogger("serving")


class NotServed(RuntimeError):
    """A task or the ensemble without a usable model; the message says what to train."""


@dataclass
class ServedModel:
    """One exported bundle opened on ONNX Runtime."""

    task: str
    path: Path
    card: Card
    model: OnnxModel

    @property
    def id(self) -> str:
        return self.card.id

    @property
    def weights_sha256(self) -> str:
        return self.card.weights_sha256

    def info(self) -> ServedModelInfo:
        """The card as the API worker and ``/models`` need it (metrics without the per-epoch history)."""
        return ServedModelInfo(
            task=self.task, status="ok", id=self.id, arch=self.card.arch, dataset=self.card.dataset.name,
            labels=self.model.labels, num_outputs=self.card.num_outputs, preprocessing=self.model.meta.preprocessing,
            metrics=self.card.metrics.model_dump(mode="json", exclude={"history"}),
            reported=self.card.reported.model_dump(mode="json"), weights_sha256=self.weights_sha256,
            created=self.card.created, provider=self.model.provider, onnx=self.model.path.name, path=str(self.path),
            has_ood=self.model.has_ood,
            # what zoo.postprocess.interpret reads of the card (calibration, OOD detector)
            model_info=ModelInfo.model_validate(self.card.model_dump(include=set(ModelInfo.model_fields))),
        )

    def warm_up(self, max_batch: int = 64, budget_s: float = 2.0) -> None:
        """Run at batch sizes 1, 2, 4, … up to ``max_batch`` (while the runs stay within ``budget_s``):
        ONNX Runtime's first run at a batch size allocates and picks kernels, and adaptive batching
        sends batches of every size under load, so the first requests should not pay for it."""
        prep = self.model.preprocessing
        n, spent = 1, 0.0
        while n <= max_batch and spent < budget_s:
            t0 = time.perf_counter()
            self.run(np.zeros((n, prep.in_channels, prep.image_size, prep.image_size), dtype=np.uint8))
            spent += time.perf_counter() - t0
            n *= 2

    def run(self, images: np.ndarray, with_ood: bool | None = None) -> np.ndarray:
        """A uint8 batch's outputs as one record array (``logits``, ``ood_score`` when the model has a
        detector: :mod:`serving.outputs`); device-bound inputs on a GPU provider."""
        gpu = self.model.provider in GPU_PROVIDERS
        outputs = self.model.outputs_bound(images) if gpu else self.model.outputs(images)
        return to_record({LOGITS: outputs[self.model.output_names[0]], **outputs},
                         self.model.has_ood if with_ood is None else with_ood)


def open_bundle(task: str, path: Path, options: RuntimeOptions, max_batch: int = 64) -> ServedModel:
    """Open a bundle's ``model.onnx`` on the best provider."""
    card = read_card(path)
    model = OnnxModel.open(path, options)  # checks the file against the sha256 the card recorded
    log.info("%s: %s (%s) on %s", task, card.id, card.arch, model.provider)
    if model.provider not in GPU_PROVIDERS:
        log.info("%s: no GPU provider in this ONNX Runtime; running on the CPU", task)
    served = ServedModel(task=task, path=path, card=card, model=model)
    served.warm_up(max_batch)
    return served


@dataclass
class BatchStats:
    """Histogram of the batch sizes (images per model call) each model saw."""

    sizes: dict[str, Counter[int]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, name: str, n: int) -> None:
        with self._lock:
            self.sizes.setdefault(name, Counter())[n] += 1

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            out = {}
            for name, hist in self.sizes.items():
                calls = sum(hist.values())
                images = sum(k * v for k, v in hist.items())
                out[name] = {
                    "calls": calls,
                    "images": images,
                    "max": max(hist),
                    "mean": images / calls,
                    "sizes": {str(k): hist[k] for k in sorted(hist)},
                }
            return out


class ModelTable:
    """Every served model, opened once per inference worker."""

    def __init__(self, cfg: ServeConfig) -> None:
        self.cfg = cfg
        self.models: dict[str, ServedModel] = {}
        self.missing: dict[str, str] = {}
        self.members: list[ServedModel] = []
        self.ensemble_message = ""
        self.ensemble_conformal: ConformalInfo | None = None
        self.stats = BatchStats()
        self.drift = DriftMonitor(cfg.drift_window)
        # This worker shares the CPU with the HTTP workers: by default (ort_spinning) ONNX Runtime's
        # idle threads sleep rather than spin.
        self.options = runtime_options(threads=cfg.ort_threads, spinning=cfg.ort_spinning)
        for task in cfg.task_names:
            self._open_task(resolve_task(cfg, task))
        self._open_ensemble()

    def _open_task(self, r: Resolved) -> None:
        if r.path is None:
            self.missing[r.task] = r.message
            log.warning("%s: not served: %s", r.task, r.message)
            return
        try:
            self.models[r.task] = served = open_bundle(r.task, r.path, self.options, self.cfg.max_batch_size)
        except (BundleError, ModelFileError) as e:
            self.missing[r.task] = f"{e}"
            log.warning("%s: not served: %s", r.task, e)
            return
        self.drift.watch(r.task, served.id, served.model.labels, served.card.drift)

    def _open_ensemble(self) -> None:
        found, problems = resolve_ensemble(self.cfg)
        notes = [problems] if problems else []
        for r in found:
            assert r.path is not None
            try:
                m = open_bundle(ENSEMBLE_ROUTE, r.path, self.options, self.cfg.max_batch_size)
            except (BundleError, ModelFileError) as e:
                notes.append(str(e))
                continue
            if self.members:
                try:
                    check_compatible([self.members[0].model.meta, m.model.meta])
                except EnsembleError as e:
                    notes.append(f"{m.id} left out: {e}")
                    continue
            self.members.append(m)
        if len(self.members) < 2:
            have = ", ".join(m.id for m in self.members) or "none"
            notes.insert(0, (
                f"the ensemble needs at least two pathology bundles of arch {self.cfg.ensemble_arch} "
                f"(found {len(self.members)}: {have}): {ensemble_hint(self.cfg.ensemble_arch)}"
            ))
            log.warning("%s: not served: %s", ENSEMBLE_ROUTE, notes[0])
        else:
            # the ensemble's own sets, from its members' validation logits (None: answers carry no set)
            self.ensemble_conformal = ensemble_conformal([m.path for m in self.members], [m.card for m in self.members])
            if self.ensemble_conformal is None:
                log.info("%s: no prediction sets (a member has no conformal scores: zoo calibrate)", ENSEMBLE_ROUTE)
        self.ensemble_message = "; ".join(notes)

    def get(self, task: str) -> ServedModel:
        if task in self.models:
            return self.models[task]
        raise NotServed(self.missing.get(task, f"unknown task {task!r}"))

    def predict(self, task: str, images: np.ndarray) -> np.ndarray:
        """``task``'s model outputs for a batch (a record array, :mod:`serving.outputs`); the batch size
        is recorded, and the answers join the task's drift window."""
        model = self.get(task)
        self.stats.record(task, len(images))
        record = model.run(images)
        logits, ood = read_record(record)
        self.drift.add(task, interpret(logits, model.card, ood))  # the answers the API workers give
        return record

    def predict_members(self, images: np.ndarray) -> np.ndarray:
        """The members' outputs, a record array (N, M) (each member's OOD score when all have one)."""
        if len(self.members) < 2:
            raise NotServed(self.ensemble_message)
        self.stats.record(ENSEMBLE_ROUTE, len(images))
        with_ood = self.members_have_ood
        return np.stack([m.run(images, with_ood) for m in self.members], axis=1)

    @property
    def members_have_ood(self) -> bool:
        return bool(self.members) and all(m.model.has_ood for m in self.members)

    def describe(self) -> ServedTable:
        """What the API layer needs to decode and answer: cards, preprocessing, what is missing."""
        tasks = {task: self.models[task].info() if task in self.models else
                 ServedModelInfo(task=task, status="missing", message=self.missing[task])
                 for task in self.cfg.task_names}
        first = self.members[0].model if self.members else None
        ensemble = ServedEnsembleInfo(
            task=ENSEMBLE_ROUTE, status="ok" if len(self.members) >= 2 else "missing", arch=self.cfg.ensemble_arch,
            members=[m.info() for m in self.members], message=self.ensemble_message, has_ood=self.members_have_ood,
            labels=first.labels if first else None, preprocessing=first.meta.preprocessing if first else None,
            conformal=self.ensemble_conformal)
        return ServedTable(tasks=tasks, ensemble=ensemble, config=self.cfg.to_dict())


class LocalInference:
    """A :class:`ModelTable` in this process as the API layer calls it (:class:`serving.frontend.InferenceClient`)
    (no batching across requests: for tools, tests and single-process use)."""

    def __init__(self, table: ModelTable) -> None:
        self.table = table

    async def describe(self) -> ServedTable:
        return self.table.describe()

    async def stats(self) -> dict[str, Any]:
        return self.table.stats.snapshot()

    async def drift(self) -> DriftAnswer:
        return self.table.drift.report()

    async def predict(self, task: str, images: np.ndarray) -> np.ndarray:
        import anyio

        return await anyio.to_thread.run_sync(self.table.predict, task, images)

    async def predict_members(self, images: np.ndarray) -> np.ndarray:
        import anyio

        return await anyio.to_thread.run_sync(self.table.predict_members, images)
