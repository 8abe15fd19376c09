"""``POST /<task>/explain`` and ``POST /pathology_ensemble/explain``: the classes and the Grad-CAM
overlay of each uploaded image as a base64 PNG in JSON (typed BentoML endpoints of ``MedZoo``).

An explanation request runs the prediction endpoints' pipeline (:meth:`serving.frontend.Frontend.run`:
the same upload limits, decoding and status codes per image); its :class:`ExplainRoute` sends the
``uint8 (N, C, H, W)`` arrays to the explanation worker (``serving.explainer.MedZooExplainer``, torch,
in a process of its own) instead of the inference worker. Nothing here imports torch.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
from pydantic import BaseModel, TypeAdapter

from serving.config import ENSEMBLE_ROUTE
from serving.events import ServedModel
from serving.frontend import Answered, Frontend, Route, checked_alpha
from serving.schemas import ExplainableRoute, ExplainAnswer, ExplainedItem, WorkerExplanation
from serving.uploads import Problem, Upload
from zoo.errors import UserError
from zoo.postprocess import class_index
from zoo.preprocess.image import FORMATS_TEXT

log = logging.getLogger("serving")

async def _worker(call: Any) -> Any:
    import aiohttp
    from bentoml.exceptions import BentoMLException

    try:
        return await call
    except (BentoMLException, aiohttp.ClientError, OSError) as e:
        log.warning("explanation worker: %s", e)
        raise Problem(503, f"explanation worker unavailable: {str(e)[:200]}") from None


_ROUTES = TypeAdapter(dict[str, ExplainableRoute])


class ExplainRoute(Route):
    """``POST /<route>/explain``: the classes and the heat map of each image, from the explanation worker."""

    result_type = ExplainedItem

    def __init__(self, explainer: Any, route: str, info: ExplainableRoute, target: str | None, top_k: int,
                 alpha: float | None = None) -> None:
        assert info.preprocessing is not None
        self.explainer, self.route, self.target, self.top_k, self.alpha = explainer, route, target, top_k, alpha
        self.name, self.prep = f"{route}/explain", info.preprocessing
        self.meta: dict[str, Any] = {}

    async def infer(self, batch: np.ndarray) -> WorkerExplanation:
        raw = await _worker(self.explainer.to_async.explain(route=self.route, images=batch, target=self.target or "",
                                                            top_k=self.top_k, alpha=self.alpha))
        out = WorkerExplanation.model_validate(raw)
        if out.error is not None:
            raise Answered(out.status or 500, ExplainAnswer(task=self.route, error=out.error))
        self.meta = out.model_dump(include={"models", "method", "layer", "feature_size", "note"})
        return out

    def result(self, up: Upload, out: WorkerExplanation, n: int) -> ExplainedItem:
        return ExplainedItem(index=up.index, filename=up.filename, **out.results[n])

    def answer(self, results: list[Any], error: str | None) -> ExplainAnswer:
        return ExplainAnswer(task=self.route, results=results, error=error, **self.meta)

    def served(self) -> tuple[ServedModel, ...]:
        return tuple(ServedModel(m["id"], m["weights_sha256"]) for m in self.meta.get("models") or ())


async def explain_route(explainer: Any, route: str, target: str | None, top_k: int,
                        alpha: float | None = None) -> Route:
    """The route of ``POST /<route>/explain``, or its answer: 503 while the route cannot explain,
    400 for a ``target`` class the model does not have, 422 for an ``alpha`` that is not a level
    (before any work)."""
    described = _ROUTES.validate_python(await _worker(explainer.to_async.describe()))
    info = described.get(route, ExplainableRoute(status="missing", message=f"unknown task {route!r}"))
    if info.status != "ok":
        raise Answered(503, ExplainAnswer(task=route, error=info.message))
    try:
        if target:
            class_index(target, info.labels or [])  # a class the model does not have is refused before any work
    except UserError as e:
        raise Answered(400, ExplainAnswer(task=route, error=str(e))) from None
    return ExplainRoute(explainer, route, info, target, top_k, checked_alpha(alpha, route))


async def explain(frontend: Frontend, explainer: Any, route: str, uploads: list[Upload], target: str | None,
                  top_k: int, alpha: float | None = None) -> tuple[int, BaseModel]:
    """Status and answer of ``POST /<route>/explain`` (``explainer``: the worker, remote or local):
    the prediction endpoints' pipeline (:meth:`Frontend.run`) with the worker's explanations and
    prediction sets at level 1 − ``alpha``."""
    return await frontend.answered(explain_route(explainer, route, target, top_k, alpha), uploads)


def explain_doc(route: str) -> str:
    what = "the pathology ensemble (the mean of its members' maps)" if route == ENSEMBLE_ROUTE else f"the {route} model"
    return (f"Where {what} looked: for each uploaded image ({FORMATS_TEXT}, multipart field `images`) the top "
            "classes and a Grad-CAM overlay (gradient saliency for MLPs) as a base64 PNG, for the predicted class "
            "or `target` (class index or label), and the prediction set at level 1 - `alpha` as in the prediction "
            "endpoints. Refusals per image as in the prediction endpoints (422 for an `alpha` that is not a number "
            "strictly between 0 and 1); 503 while the task has no model or the explanation worker cannot answer.")


__all__ = ["ExplainAnswer", "ExplainRoute", "ExplainedItem", "explain", "explain_doc", "explain_route"]
