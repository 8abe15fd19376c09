"""``POST /<task>/explain`` and ``POST /pathology_ensemble/explain``: typed BentoML endpoints (in
``/docs.json``, callable with ``bentoml.SyncHTTPClient``) answering the classes and the Grad-CAM
overlay of each uploaded image as a base64 PNG in JSON.

The API service gets them by inheriting :func:`explain_routes`: a base class holding the
explanation worker (``bentoml.depends(MedZooExplainer)``) and one endpoint per route. Uploads are
checked and decoded here, in the API worker, with the prediction endpoints' rules
(``serving.frontend.decode_one``: the same limits and status codes per image); the worker gets
``uint8 (N, C, H, W)`` arrays. Nothing here imports torch.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import anyio
import bentoml
import numpy as np
from pydantic import BaseModel, Field
from typing_extensions import TypedDict

from serving.config import ENSEMBLE_ROUTE, Limits
from serving.explainer import MedZooExplainer
from serving.frontend import Item, Upload, decode_one
from zoo.errors import UserError
from zoo.postprocess import class_index
from zoo.preprocess import Preprocessing

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


class ExplainAnswer(BaseModel):
    """Classes and heat maps of the uploaded images."""

    task: str
    models: list[dict[str, str]] = []
    method: str | None = Field(None, description="grad-cam (convolutional networks) or saliency (MLPs)")
    layer: str | None = Field(None, description="the layer Grad-CAM reads (the model registry's cam_layer)")
    feature_size: list[int] | None = None
    note: str = ""
    results: list[ExplainedItem] = []
    error: str | None = None


def upload_name(path: Path) -> str:
    """The client's file name: BentoML stores an upload as ``tmp`` + 8 random characters + the
    original name (``tempfile.NamedTemporaryFile(suffix=filename)``)."""
    name = path.name
    return name[11:] if name.startswith("tmp") and len(name) > 11 else name


def read_items(paths: list[Path], prep: Preprocessing, limits: Limits) -> list[Item]:
    """Each upload checked against the per-file limit and decoded as the prediction endpoints do."""
    items = []
    for i, path in enumerate(paths):
        up = Upload(i, upload_name(path))
        size = path.stat().st_size
        if size > limits.max_file_bytes:
            up.status, up.error = 413, (f"file of {size / 2**20:.1f} MB is larger than the "
                                        f"{limits.max_file_bytes / 2**20:g} MB limit")
        else:
            up.data = path.read_bytes()
        items.append(decode_one(up, prep))
    return items


def _refuse(ctx: bentoml.Context, route: str, status: int, message: str) -> ExplainAnswer:
    ctx.response.status_code = status
    return ExplainAnswer(task=route, error=message)


def _merge(route: str, items: list[Item], answer: dict[str, Any]) -> tuple[ExplainAnswer, int]:
    """The worker's answers for the decoded images and the refusals, in upload order."""
    good = iter(answer.get("results", []))
    results = [ExplainedItem(index=it.index, filename=it.filename, **next(good)) if it.array is not None else
               ExplainedItem(index=it.index, filename=it.filename, status=it.status, error=it.error) for it in items]
    body = ExplainAnswer(task=route, results=results,
                         **{k: answer[k] for k in ("models", "method", "layer", "feature_size", "note") if k in answer})
    if any(it.array is not None for it in items):
        return body, 200
    statuses = {it.status for it in items}
    body.error = "; ".join(f"{it.filename}: {it.error}" for it in items)
    return body, statuses.pop() if len(statuses) == 1 else 400


async def _worker(call: Any) -> Any:
    import aiohttp
    from bentoml.exceptions import BentoMLException

    try:
        return await call
    except (BentoMLException, aiohttp.ClientError, OSError) as e:
        log.warning("explanation worker: %s", e)
        raise ConnectionError(f"explanation worker unavailable: {str(e)[:200]}") from None


async def answer(explainer: Any, ctx: bentoml.Context, route: str, images: list[Path], target: str | None,
                 top_k: int, limits: Limits) -> ExplainAnswer:
    """What ``POST /<route>/explain`` answers (``explainer``: the worker, remote or local)."""
    try:
        info = (await _worker(explainer.to_async.describe())).get(route, {"status": "missing",
                                                                          "message": f"unknown task {route!r}"})
        if info["status"] != "ok":
            return _refuse(ctx, route, 503, info["message"])
        if len(images) > limits.max_images:
            return _refuse(ctx, route, 413, f"more than {limits.max_images} images in one request")
        if target:
            class_index(target, info["labels"])  # a class the model does not have is refused before any work
        items = await anyio.to_thread.run_sync(read_items, images, Preprocessing.from_dict(info["preprocessing"]),
                                               limits)
        good = [it.array for it in items if it.array is not None]
        result: dict[str, Any] = {}
        if good:
            result = await _worker(explainer.to_async.explain(route=route, images=np.stack(good),
                                                              target=target or "", top_k=top_k))
        if "error" in result:
            return _refuse(ctx, route, int(result.get("status", 500)), result["error"])
    except UserError as e:
        return _refuse(ctx, route, 400, str(e))
    except ConnectionError as e:
        return _refuse(ctx, route, 503, str(e))
    body, status = _merge(route, items, result)
    ctx.response.status_code = status
    return body


def explain_endpoint(route: str, default_top_k: int, limits: Limits) -> Callable[..., Any]:
    """The typed endpoint of one route."""

    async def explain(self: Any, ctx: bentoml.Context, images: list[Path], target: str | None = None,
                      top_k: Annotated[int, Field(ge=1)] = default_top_k) -> ExplainAnswer:
        return await answer(self.explainer, ctx, route, images, target, top_k, limits)

    what = "the pathology ensemble (the mean of its members' maps)" if route == ENSEMBLE_ROUTE else f"the {route} model"
    explain.__name__ = explain.__qualname__ = f"explain_{route}"
    explain.__doc__ = (f"Where {what} looked: for each uploaded image (multipart field `images`, PNG, JPEG, "
                       "TIFF or BMP) the top classes and a Grad-CAM overlay (gradient saliency for MLPs) as a "
                       "base64 PNG, for the predicted class or `target` (class index or label).")
    return explain


def explain_routes(tasks: tuple[str, ...], top_k: int, limits: Limits) -> type:
    """Base class of the API service: the explanation worker and ``POST /<route>/explain`` for every
    task and the ensemble."""
    namespace: dict[str, Any] = {"__module__": __name__, "explainer": bentoml.depends(MedZooExplainer),
                                 "__doc__": "Explanation endpoints, answered by MedZooExplainer."}
    for route in (*tasks, ENSEMBLE_ROUTE):
        namespace[f"explain_{route}"] = bentoml.api(route=f"/{route}/explain")(explain_endpoint(route, top_k, limits))
    return type("ExplainRoutes", (), namespace)


__all__ = ["ExplainAnswer", "ExplainedItem", "answer", "explain_routes", "read_items", "upload_name"]
