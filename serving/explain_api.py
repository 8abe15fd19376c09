"""``POST /<task>/explain`` and ``POST /pathology_ensemble/explain``: typed BentoML endpoints (in
``/docs.json``, callable with ``bentoml.SyncHTTPClient``) answering the classes and the Grad-CAM
overlay of each uploaded image as a base64 PNG in JSON.

The API service gets them by inheriting :func:`explain_routes`: a base class holding the
explanation worker (``bentoml.depends(MedZooExplainer)``) and one endpoint per route. Uploads are
read by :class:`serving.uploads.UploadGuard` (byte limits, body timeout, no URL fetching) and
checked and decoded in the API worker by :meth:`serving.frontend.Frontend.decode`, exactly as for
the prediction endpoints (the same limits and status codes per image); the worker gets
``uint8 (N, C, H, W)`` arrays. Nothing here imports torch.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import bentoml
import numpy as np
from pydantic import BaseModel, Field
from typing_extensions import TypedDict

from serving.config import ENSEMBLE_ROUTE
from serving.explainer import MedZooExplainer
from serving.frontend import Frontend, Item
from serving.schemas import ExplainInput
from serving.uploads import Problem, Upload, as_uploads
from zoo.errors import UserError
from zoo.postprocess import class_index
from zoo.preprocess import Preprocessing
from zoo.preprocess.image import FORMATS_TEXT

log = logging.getLogger("serving")

# One class of an answer: {"class": 2, "label": "nevus", "prob": 0.91} ("class" is a keyword).
TopClass = TypedDict("TopClass", {"class": int, "label": str, "prob": float})


class ExplainedItem(BaseModel):
    """One uploaded image: its classes and the overlay, or why it was refused (``status`` ≠ 200)."""

    index: int
    filename: str
    status: int = 200
    error: str = ""
    top: list[TopClass] = []
    predicted: TopClass | None = None
    explained: TopClass | None = Field(None, description="the class the heat map explains")
    overlay_png: str | None = Field(None, description="base64 PNG: the heat map on the image, 224 px or more")
    in_distribution: bool | None = Field(None, description="false: unlike the training images (when the model "
                                                           "carries an out-of-distribution detector)")
    ood_score: float | None = None


class ExplainAnswer(bentoml.IODescriptor):
    """Classes and heat maps of the uploaded images."""

    task: str
    models: list[dict[str, str]] = []
    method: str | None = Field(None, description="grad-cam (convolutional networks) or saliency (MLPs)")
    layer: str | None = Field(None, description="the layer Grad-CAM reads (the model registry's cam_layer)")
    feature_size: list[int] | None = None
    note: str = ""
    results: list[ExplainedItem] = []
    error: str | None = None


def _merge(route: str, items: list[Item], answer: dict[str, Any]) -> tuple[int, ExplainAnswer]:
    """The worker's answers for the decoded images and the refusals, in upload order."""
    good = iter(answer.get("results", []))
    results = [ExplainedItem(index=it.index, filename=it.filename, **next(good)) if it.array is not None else
               ExplainedItem(index=it.index, filename=it.filename, status=it.status, error=it.error) for it in items]
    body = ExplainAnswer(task=route, results=results,
                         **{k: answer[k] for k in ("models", "method", "layer", "feature_size", "note") if k in answer})
    if any(it.array is not None for it in items):
        return 200, body
    statuses = {it.status for it in items}
    body.error = "; ".join(f"{it.filename}: {it.error}" for it in items)
    return statuses.pop() if len(statuses) == 1 else 400, body


async def _worker(call: Any) -> Any:
    import aiohttp
    from bentoml.exceptions import BentoMLException

    try:
        return await call
    except (BentoMLException, aiohttp.ClientError, OSError) as e:
        log.warning("explanation worker: %s", e)
        raise Problem(503, f"explanation worker unavailable: {str(e)[:200]}") from None


async def explain(frontend: Frontend, explainer: Any, route: str, uploads: list[Upload], target: str | None,
                  top_k: int) -> tuple[int, ExplainAnswer]:
    """Status and answer of ``POST /<route>/explain`` (``explainer``: the worker, remote or local).
    Uploads are checked and decoded by the prediction endpoints' rules (:meth:`Frontend.decode`)."""
    info = (await _worker(explainer.to_async.describe())).get(route, {"status": "missing",
                                                                      "message": f"unknown task {route!r}"})
    if info["status"] != "ok":
        return 503, ExplainAnswer(task=route, error=info["message"])
    try:
        if target:
            class_index(target, info["labels"])  # a class the model does not have is refused before any work
    except UserError as e:
        return 400, ExplainAnswer(task=route, error=str(e))
    items = await frontend.decode(uploads, Preprocessing.from_dict(info["preprocessing"]))
    good = [it.array for it in items if it.array is not None]
    result: dict[str, Any] = {}
    if good:
        result = await _worker(explainer.to_async.explain(route=route, images=np.stack(good), target=target or "",
                                                          top_k=top_k))
    if "error" in result:
        return int(result.get("status", 500)), ExplainAnswer(task=route, error=result["error"])
    return _merge(route, items, result)


def explain_endpoint(route: str, default_top_k: int, respond: Callable[..., Any]) -> Callable[..., Any]:
    """The typed endpoint of one route; ``respond`` turns (status, answer) into the HTTP response."""

    async def endpoint(self: Any, images: list[Path], target: str | None = None, top_k: int | None = None) -> Any:
        uploads = as_uploads(images, self.frontend.limits.max_file_bytes)
        return await respond(explain(self.frontend, self.explainer, route, uploads, target, top_k or default_top_k))

    what = "the pathology ensemble (the mean of its members' maps)" if route == ENSEMBLE_ROUTE else f"the {route} model"
    endpoint.__name__ = endpoint.__qualname__ = f"explain_{route}"
    endpoint.__doc__ = (f"Where {what} looked: for each uploaded image ({FORMATS_TEXT}, multipart field `images`) "
                        "the top classes and a Grad-CAM overlay (gradient saliency for MLPs) as a base64 PNG, for the "
                        "predicted class or `target` (class index or label). Refusals per image as in the "
                        "prediction endpoints; 503 while the task has no model or the explanation worker cannot "
                        "answer.")
    return endpoint


def explain_routes(tasks: tuple[str, ...], top_k: int, respond: Callable[..., Any]) -> type:
    """Base class of the API service: the explanation worker and ``POST /<route>/explain`` for every
    task and the ensemble (their uploads read by :class:`serving.uploads.UploadGuard`)."""
    namespace: dict[str, Any] = {"__module__": __name__, "explainer": bentoml.depends(MedZooExplainer),
                                 "__doc__": "Explanation endpoints, answered by MedZooExplainer."}
    for route in explain_paths(tasks):
        name = route.strip("/").split("/")[0]
        namespace[f"explain_{name}"] = bentoml.api(route=route, input_spec=ExplainInput, output_spec=ExplainAnswer)(
            explain_endpoint(name, top_k, respond))
    return type("ExplainRoutes", (), namespace)


def explain_paths(tasks: tuple[str, ...]) -> list[str]:
    """``/<task>/explain`` for every task and the ensemble."""
    return [f"/{route}/explain" for route in (*tasks, ENSEMBLE_ROUTE)]


__all__ = ["ExplainAnswer", "ExplainedItem", "explain", "explain_paths", "explain_routes"]
