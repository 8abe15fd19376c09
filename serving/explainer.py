"""The explanation worker: a BentoML service of its own holding torch bundles (``MedZooExplainer``).

Explanations need gradients, hence torch, pytorch-grad-cam and Captum; predictions do not. The
API worker and the inference worker never import torch: this module imports none at import time
(``serving.service`` imports it to depend on the worker) and loads :mod:`zoo.explain` in the
worker, when a task is first explained. Each task's bundle is the one the inference worker serves
(the same ``serving.config`` resolution); its ``model.safetensors`` is loaded on first use, and
the ensemble's prediction sets are fitted then, once (:func:`zoo.ensemble.ensemble_conformal`, as
the inference worker does), so an explanation answers the same set as the prediction endpoints.

Where torch or a bundle's weights are missing (a Bento built without torch carries ONNX files
only), the worker still starts and says why for each task: the explain endpoints answer 503 with
that message while predictions go on.
"""

from __future__ import annotations

import base64
import importlib.util
import logging
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import bentoml
import numpy as np

from serving.config import ENSEMBLE_ROUTE, Resolved, ServeConfig, load_config, resolve_ensemble, resolve_task
from serving.schemas import ExplainableRoute, WorkerExplanation
from zoo.card import WEIGHTS, ConformalInfo, read_card
from zoo.errors import UserError
from zoo.models import get_spec

log = logging.getLogger("serving")
NEEDS = ("torch", "pytorch_grad_cam", "captum")  # import names of what explanations need
EXPLAIN_TIMEOUT_S = 300


def missing_libraries() -> str:
    """'' when torch, pytorch-grad-cam and Captum are installed, else what to install."""
    absent = [name for name in NEEDS if importlib.util.find_spec(name) is None]
    if not absent:
        return ""
    return (f"explanations need {', '.join(absent)} (pip install medzoo: torch, grad-cam, captum); "
            "this server was built without them, predictions are not affected")


@dataclass
class Entry:
    """One explainable route (a task, or the ensemble): its bundles, or why it cannot explain."""

    route: str
    paths: list[Path]
    message: str = ""
    explainers: list[Any] | None = None  # zoo.explain.Explainer per bundle, loaded on first use
    conformal: ConformalInfo | None = None  # an ensemble's own prediction sets, fitted with the explainers


def _why_not(paths: list[Path]) -> str:
    lacking = [p for p in paths if not (p / WEIGHTS).is_file()]
    if lacking:
        return (f"{lacking[0]} has no {WEIGHTS}: explanations need the bundle's weights "
                "(a packaged Bento carries the ONNX file only)")
    return ""


def make_entry(r: Resolved | list[Resolved], route: str, message: str = "") -> Entry:
    found = r if isinstance(r, list) else [r]
    paths = [x.path for x in found if x.path is not None]
    if not isinstance(r, list) and r.path is None:
        return Entry(route, [], r.message)
    if isinstance(r, list) and len(paths) < 2:
        return Entry(route, [], message or "the ensemble has fewer than two members")
    return Entry(route, paths, _why_not(paths))


def _b64_png(image: np.ndarray, heat: np.ndarray) -> str:
    from zoo.explain import overlay, png_bytes

    return base64.b64encode(png_bytes(overlay(image, heat))).decode("ascii")


class ExplainTable:
    """Every explainable route of the configuration; bundles loaded on first use, one call at a time."""

    def __init__(self, cfg: ServeConfig) -> None:
        self.cfg = cfg
        self.unavailable = missing_libraries()
        self.entries = {t: make_entry(resolve_task(cfg, t), t) for t in cfg.task_names}
        members, problems = resolve_ensemble(cfg)
        self.entries[ENSEMBLE_ROUTE] = make_entry(members, ENSEMBLE_ROUTE, problems)
        self._lock = threading.Lock()

    def status(self, route: str) -> str:
        """'' when ``route`` can be explained, else why not."""
        entry = self.entries.get(route)
        if entry is None:
            return f"unknown task {route!r}"
        return self.unavailable or entry.message

    def describe(self) -> dict[str, ExplainableRoute]:
        """Per route: whether it explains, and what the API worker needs to decode and check uploads."""
        out: dict[str, ExplainableRoute] = {}
        for route, entry in self.entries.items():
            why = self.status(route)
            if why:
                out[route] = ExplainableRoute(status="missing", message=why)
                continue
            cards = [read_card(p) for p in entry.paths]
            layer = get_spec(cards[0].arch).cam_layer
            out[route] = ExplainableRoute(status="ok", ids=[c.id for c in cards], arch=cards[0].arch,
                                          labels=list(cards[0].labels), preprocessing=cards[0].preprocessing,
                                          method="grad-cam" if layer else "saliency", layer=layer)
        return out

    def _explainers(self, entry: Entry) -> list[Any]:
        if entry.explainers is None:
            from zoo.ensemble import ensemble_conformal
            from zoo.explain import Explainer

            entry.explainers = [Explainer.load(p) for p in entry.paths]
            if len(entry.explainers) > 1:
                entry.conformal = ensemble_conformal(entry.paths, [e.info for e in entry.explainers])
            log.info("explanations for /%s: %s", entry.route, ", ".join(e.info.id for e in entry.explainers))
        return entry.explainers

    def explain(self, route: str, images: np.ndarray, target: str | None, top_k: int,
                alpha: float | None = None) -> WorkerExplanation:
        """Classes, prediction set at level 1 − ``alpha`` and overlay (base64 PNG) of each image;
        ``error`` and ``status`` for a user's mistake."""
        from zoo.postprocess import check_alpha, with_sets

        why = self.status(route)
        if why:
            return WorkerExplanation(error=why, status=503)
        try:
            alpha = check_alpha(alpha)  # the API worker checked it already
        except ValueError as e:
            return WorkerExplanation(error=str(e), status=422)
        try:
            with self._lock:
                entry = self.entries[route]
                explainers = self._explainers(entry)
                if len(explainers) == 1:
                    exp = explainers[0](images, target)
                    if alpha is not None:  # interpret gave the card's level; the request asks for another
                        with_sets(exp.predictions, explainers[0].info.conformal, alpha)
                else:
                    exp = _ensemble(explainers, images, target, entry.conformal, alpha)
        except UserError as e:
            return WorkerExplanation(error=str(e), status=400)
        return _answer(exp, images, explainers, top_k)


def _ensemble(explainers: list[Any], images: np.ndarray, target: str | None, conformal: ConformalInfo | None = None,
              alpha: float | None = None) -> Any:
    """The ensemble's answer (mean of the members' logits, :func:`zoo.ensemble.combine`, with its
    prediction sets) and the mean of the members' maps for the class it predicts (or ``target``)."""
    from zoo.ensemble import combine
    from zoo.explain import Explanation
    from zoo.postprocess import Predictions

    outputs = [e.outputs(images) for e in explainers]
    out = combine([o[0] for o in outputs], [e.info for e in explainers], [o[1] for o in outputs], conformal, alpha)
    wanted = target if target is not None else [int(c) for c in out.classes]
    maps = [e(images, wanted) for e in explainers]
    first = maps[0]
    answer = Predictions(probs=out.probs, classes=out.classes, calibrated=out.calibrated, ood_score=out.ood_score,
                         in_distribution=out.in_distribution, sets=out.sets, alpha=out.alpha)
    return Explanation(heatmaps=np.mean([m.heatmaps for m in maps], axis=0).astype(np.float32),
                       targets=first.targets, predictions=answer, method=first.method, layer=first.layer,
                       feature_size=first.feature_size, logits=out.logits)


def _answer(exp: Any, images: np.ndarray, explainers: list[Any], top_k: int) -> WorkerExplanation:
    from zoo.explain import describe_image

    labels = list(explainers[0].info.labels)
    results = []
    for n in range(len(exp)):
        item = asdict(describe_image(exp, n, "", labels, top_k))
        for key in ("source", "heatmap", "overlay", "error"):
            item.pop(key)
        plausible = exp.predictions.prediction_set(n, labels)
        if plausible is not None:
            item.update(prediction_set=plausible, alpha=exp.predictions.alpha)
        results.append({**item, "overlay_png": _b64_png(images[n], exp.heatmaps[n])})
    return WorkerExplanation(models=[{**e.info.identity(), "arch": e.info.arch} for e in explainers],
                             method=exp.method, layer=exp.layer,
                             feature_size=list(exp.feature_size) if exp.feature_size else None, note=exp.note,
                             results=results)


@bentoml.service(name="MedZooExplainer", workers=1, threads=1, traffic={"timeout": EXPLAIN_TIMEOUT_S},
                 runner_connection={"max_requests": 10**9, "max_age": 1e9})
class MedZooExplainer:
    """Explanation worker: Grad-CAM / saliency with the served bundles' torch weights."""

    def __init__(self) -> None:
        self.table = ExplainTable(load_config())
        for route in self.table.entries:
            why = self.table.status(route)
            if why:
                log.info("/%s/explain answers 503: %s", route, why)

    @bentoml.api
    async def describe(self) -> dict[str, Any]:
        """Which routes explain, with their labels and preprocessing (:class:`ExplainableRoute` each,
        validated by the API worker)."""
        return {route: info.model_dump(mode="json") for route, info in self.table.describe().items()}

    @bentoml.api
    def explain(self, route: str, images: np.ndarray, target: str = "", top_k: int = 3,
                alpha: float | None = None) -> dict[str, Any]:
        """Classes, prediction sets (level 1 − ``alpha``, default the card's) and overlays of a uint8
        batch (N, C, H, W) for ``route`` (a :class:`WorkerExplanation`, validated by the API worker);
        ``target`` '' = predicted."""
        return self.table.explain(route, images, target or None, top_k, alpha).model_dump()


__all__ = ["ExplainTable", "MedZooExplainer", "missing_libraries"]
