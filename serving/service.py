"""The medzoo BentoML service: ``bentoml serve serving.service:MedZoo`` (or ``zoo serve``).

Two services, two processes:

* :data:`MedZoo` (the API worker; explanations from ``MedZooExplainer``, the upload page at ``/ui``)
  answers HTTP with typed ``@bentoml.api`` endpoints, listed in
  ``/docs.json`` (OpenAPI, the Swagger page at ``/``) and ``/schema.json``, hence callable by
  name through ``bentoml.SyncHTTPClient`` / ``AsyncHTTPClient``: ``POST /<task>`` for every served
  task (``/skin``, ``/organ``, ``/pathology`` and any extra task of the config; one method per
  task, made from the config at import time), ``POST /pathology_ensemble``, ``/models`` and
  ``/stats`` (POST, and GET for curl). :class:`serving.uploads.UploadGuard` reads the uploads
  with the limits before BentoML sees the request; ``serving.frontend`` checks the headers and
  decodes them, and sends only ``uint8 (N, C, H, W)`` arrays on.
* :data:`MedZooInference` holds one ONNX Runtime session per model (GPU provider when there is
  one, CPU otherwise) and exposes one ``batchable=True`` method per task plus one for the
  ensemble members: BentoML's adaptive batching merges the arrays of concurrent requests into
  one model call. It counts the batch sizes each model saw (``GET /stats``).

Which bundle serves which task, the batching limits and the upload limits come from
``serving.config`` (environment and ``MEDZOO_SERVE_CONFIG``), read once when this module is
imported: the set of tasks, hence of endpoints, is fixed at start-up.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import bentoml
import numpy as np
from starlette.responses import Response

from serving.config import ENSEMBLE_ROUTE, load_config
from serving.connections import install as install_connections
from serving.decoding import DecodePool
from serving.explain_api import explain_paths, explain_routes
from serving.frontend import Frontend
from serving.pages import UI_PATH, ui_app
from serving.schemas import EnsembleAnswer, ErrorAnswer, ImagesInput, ModelsAnswer, StatsAnswer, TaskAnswer
from serving.uploads import Problem, UploadGuard, as_uploads

log = logging.getLogger("serving")
if not log.handlers:
    _handler = logging.StreamHandler()
    _handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s serving: %(message)s"))
    log.addHandler(_handler)
    log.setLevel(logging.INFO)
    log.propagate = False

CONFIG = load_config()
TASK_NAMES = CONFIG.task_names
_BATCHING: dict[str, Any] = {
    "batchable": True,
    "max_batch_size": CONFIG.max_batch_size,
    "max_latency_ms": CONFIG.max_latency_ms,
}


def _inference_namespace() -> dict[str, Any]:
    """Methods of the inference service; one batchable method per task (named after it)."""

    def __init__(self: Any) -> None:
        from serving.models import ModelTable

        # This worker shares the CPU with the HTTP workers: ONNX Runtime's idle threads should
        # sleep rather than spin (zoo.runtime reads this when it creates the sessions).
        os.environ.setdefault("MEDZOO_ORT_SPINNING", "0")
        self.table = ModelTable(CONFIG)

    # async: answered on the event loop, not queued behind a running batch in the one thread
    async def describe(self: Any) -> dict[str, Any]:
        """Cards, preprocessing and status of every served model (read by the API worker)."""
        return self.table.describe()

    async def stats(self: Any) -> dict[str, Any]:
        """Histogram of the batch sizes each model saw in this worker."""
        return self.table.stats.snapshot()

    def ensemble(self: Any, images: np.ndarray) -> np.ndarray:
        """Logits (N, M, K) of the M ensemble members for a uint8 batch (N, C, H, W)."""
        return self.table.predict_members(images)

    def task_method(task: str) -> Callable[[Any, np.ndarray], np.ndarray]:
        def infer(self: Any, images: np.ndarray) -> np.ndarray:
            return self.table.predict(task, images)

        infer.__name__ = infer.__qualname__ = task
        infer.__doc__ = f"Logits (N, K) of the {task} model for a uint8 batch (N, C, H, W)."
        return infer

    ns: dict[str, Any] = {
        "__module__": __name__,
        "__doc__": "Inference worker: ONNX Runtime sessions behind batchable methods.",
        "__init__": __init__,
        "describe": bentoml.api(describe),
        "stats": bentoml.api(stats),
        "ensemble": bentoml.api(**_BATCHING)(ensemble),
    }
    ns.update({t: bentoml.api(**_BATCHING)(task_method(t)) for t in TASK_NAMES})
    return ns


# One worker and one thread: one ONNX Runtime session per model that uses every core itself.
# runner_connection: the API worker's client session to this service is never renewed; BentoML's
# default renews it every 100 requests and closes the old one under requests still in flight.
# Timeouts: a request may wait up to max_latency_ms in the batching queue, then run.
# No access log here: its calls are internal (one per batch of user requests, which the API worker logs).
INFERENCE_TIMEOUT_S = CONFIG.max_latency_ms / 1000 + 60
MedZooInference = bentoml.service(
    name="MedZooInference", workers=1, threads=1, traffic={"timeout": INFERENCE_TIMEOUT_S},
    runner_connection={"max_requests": 10**9, "max_age": 1e9},
    logging={"access": {"enabled": False}},
)(
    type("MedZooInference", (), _inference_namespace())
)


class DependencyBackend:
    """The inference worker as the API layer calls it (remote in a server, local otherwise).

    Inference calls are pure, so a call whose connection to the inference worker dropped is sent
    again (up to ``RETRIES`` times) instead of failing the user's request: BentoML's dependency
    client (aiohttp) can lose connections under load (bentoml/BentoML#4971; and #5540, whose session
    renewal is switched off for this service through ``runner_connection``).
    """

    RETRIES = 3

    def __init__(self, dep: Any) -> None:
        self.dep = dep

    async def _call(self, method: str, *args: Any) -> Any:
        import aiohttp

        for _ in range(self.RETRIES - 1):
            try:
                return await getattr(self.dep.to_async, method)(*args)
            except aiohttp.ClientConnectionError as e:
                log.info("%s: connection to the inference worker dropped (%r); sending again", method, e)
        return await getattr(self.dep.to_async, method)(*args)

    async def describe(self) -> dict[str, Any]:
        return await self._call("describe")

    async def stats(self) -> dict[str, Any]:
        return await self._call("stats")

    async def predict(self, task: str, images: np.ndarray) -> np.ndarray:
        return await self._call(task, images)

    async def predict_members(self, images: np.ndarray) -> np.ndarray:
        return await self._call("ensemble", images)


async def answer(work: Awaitable[tuple[int, Any]]) -> Response:
    """The JSON answer with its status; fields that are None are left out."""
    headers: dict[str, str] = {}
    try:
        status, body = await work
    except Problem as p:
        status, body, headers = p.status, ErrorAnswer(error=p.message), p.headers
    return Response(body.model_dump_json(exclude_none=True), status_code=status, headers=headers,
                    media_type="application/json")


async def _ok(work: Awaitable[Any]) -> tuple[int, Any]:
    return 200, await work


CODES = ("Refusals: 400 malformed request or empty file, 408 stalled upload, 413 file, request or image too large "
         "(limits in /models → config), 415 not a PNG/JPEG/TIFF/BMP/DICOM image or a codec that cannot be decoded, "
         "422 corrupt or truncated image, each per image in `results` when other images of the request were "
         "answered (HTTP 200); 503 when the task has no model (the message says what to train).")


def _task_method(task: str) -> Any:
    async def predict(self: Any, images: list[Path], top_k: int | None = None) -> Response:
        return await answer(self.frontend.classify(task, as_uploads(images, CONFIG.limits.max_file_bytes), top_k))

    predict.__name__ = predict.__qualname__ = task
    predict.__doc__ = (f"Classify {task} images with the served {task} model: the top_k classes with probabilities "
                       f"per image, and the model (bundle id, weights sha256). {CODES}")
    return bentoml.api(input_spec=ImagesInput, output_spec=TaskAnswer)(predict)


def _api_namespace() -> dict[str, Any]:
    """Methods of the API service: one typed endpoint per task, the ensemble, /models, /stats."""

    def __init__(self: Any) -> None:
        self.frontend = Frontend(DependencyBackend(self.inference), CONFIG.limits, CONFIG.top_k,
                                 DecodePool(CONFIG.decode_threads, int(CONFIG.decode_memory_mb * 2**20),
                                            CONFIG.admission_s),
                                 CONFIG.max_batch_size, CONFIG.refuse_ood)
        log.info("endpoints: %s", ", ".join(f"/{t}" for t in (*TASK_NAMES, ENSEMBLE_ROUTE, "models", "stats")))

    async def __is_ready__(self: Any) -> bool:
        """Ready once the inference worker has described its models."""
        try:
            await self.frontend.table()
        except Problem as p:
            log.info("waiting for the inference worker: %s", p.message)
            return False
        return True

    async def pathology_ensemble(self: Any, images: list[Path], top_k: int | None = None) -> Response:
        return await answer(self.frontend.ensemble(as_uploads(images, CONFIG.limits.max_file_bytes), top_k))

    pathology_ensemble.__doc__ = ("Classify pathology images with the ensemble (mean of the members' logits): "
                                  f"per image the top_k classes, probabilities, logits, each member's vote and "
                                  f"their agreement. {CODES}")

    async def models(self: Any) -> ModelsAnswer:
        """The served models: cards, validation and test metrics, provider; why a task has none; the config.
        Also ``GET /models``."""
        return await answer(_ok(self.frontend.models()))  # type: ignore[return-value]

    async def stats(self: Any) -> StatsAnswer:
        """Batch sizes each model saw (adaptive batching) and the requests answered per route. Also ``GET /stats``."""
        return await answer(_ok(self.frontend.stats()))  # type: ignore[return-value]

    ns: dict[str, Any] = {
        "__module__": __name__,
        "__doc__": "medzoo: medical image classification (skin, organ, pathology, extra tasks) over HTTP.",
        "__init__": __init__,
        "__is_ready__": __is_ready__,
        "inference": bentoml.depends(MedZooInference),
        ENSEMBLE_ROUTE: bentoml.api(input_spec=ImagesInput, output_spec=EnsembleAnswer)(pathology_ensemble),
        "models": bentoml.api(models),
        "stats": bentoml.api(stats),
    }
    ns.update({t: _task_method(t) for t in TASK_NAMES})
    return ns


# The API worker. Its traffic timeout is the request's time limit: BentoML cancels the handler
# (decoding stops between two images) and answers 504.
# Explanations (POST /<task>/explain) come from a base class holding the torch worker
# (serving.explain_api, serving.explainer); the upload page is a static ASGI app at /ui.
MedZoo = bentoml.service(
    name="MedZoo", workers=CONFIG.api_workers, traffic={"timeout": CONFIG.request_timeout_s},
    logging={"access": {"enabled": CONFIG.access_log}},
)(bentoml.asgi_app(ui_app(), path=UI_PATH)(
    type("MedZoo", (explain_routes(TASK_NAMES, CONFIG.top_k, answer),), _api_namespace())))
MedZoo.add_asgi_middleware(
    UploadGuard, upload_routes=[f"/{t}" for t in (*TASK_NAMES, ENSEMBLE_ROUTE)] + explain_paths(TASK_NAMES),
    get_routes=["/models", "/stats"], limits=CONFIG.limits,
)
# Idle / header timeout, a cap on open connections, the drain on SIGTERM (serving.connections).
install_connections(MedZoo, CONFIG.shutdown_grace_s, CONFIG.idle_timeout_s, CONFIG.max_connections)
