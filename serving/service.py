"""The medzoo BentoML service: ``bentoml serve serving.service:MedZoo`` (or ``zoo serve``).

Three services, each in its own process:

* :class:`MedZoo`, the API worker, answers HTTP with typed ``@bentoml.api`` endpoints, listed in
  ``/docs.json`` (OpenAPI, the Swagger page at ``/``) and callable by name through
  ``bentoml.SyncHTTPClient`` / ``AsyncHTTPClient``: ``POST /<task>`` and ``POST /<task>/explain``
  for every configured task (added by :func:`task_routes`, each calling :meth:`MedZoo.classify` or
  :meth:`MedZoo.explain`), ``POST /pathology_ensemble`` and its explanation, ``/models``,
  ``/stats`` and ``/drift`` (POST, and GET for curl), the upload page at ``/ui``, the Open Inference Protocol v2 at
  ``/v2/…`` (:mod:`serving.v2`). :class:`serving.uploads.UploadGuard`
  reads the uploads with the limits before BentoML sees the request; :class:`serving.frontend.Frontend`
  runs the request pipeline (decode, infer, interpret, answer).
* :class:`MedZooInference` holds one ONNX Runtime session per model and exposes one ``batchable``
  method per task (added by :func:`inference_routes`, each calling :meth:`MedZooInference.infer`)
  plus one for the ensemble members: BentoML's adaptive batching merges the arrays of concurrent
  requests into one model call. It keeps each task's drift window (:mod:`serving.drift`).
* ``MedZooExplainer`` (:mod:`serving.explainer`): the explanations, with torch.

The configuration is read once, by the one call ``CONFIG = load_config()`` below: the tasks, hence
the endpoints, are fixed when this module is imported (BentoML reads a service's endpoints from its
class when the class is decorated).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import bentoml
import numpy as np
from pydantic import BaseModel
from starlette.responses import Response

from serving.audit import AuditTrail
from serving.config import ENSEMBLE_ROUTE, load_config
from serving.connections import install as install_connections
from serving.decoding import DecodePool
from serving.events import subscribe
from serving.explain_api import explain, explain_doc
from serving.explainer import MedZooExplainer
from serving.frontend import Frontend
from serving.metrics import ServiceMetrics, export_drift
from serving.pages import UI_PATH, ui_app
from serving.schemas import (
    DriftAnswer,
    EnsembleAnswer,
    ErrorAnswer,
    ExplainAnswer,
    ExplainInput,
    ImagesInput,
    ModelsAnswer,
    ServedTable,
    StatsAnswer,
    TaskAnswer,
)
from serving.sr import sr_answer, wants_sr
from serving.uploads import Problem, Upload, UploadGuard, as_uploads
from serving.v2 import INFER_PATH, v2_app

log = logging.getLogger("serving")
if not log.handlers:
    _handler = logging.StreamHandler()
    _handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s serving: %(message)s"))
    log.addHandler(_handler)
    log.setLevel(logging.INFO)
    log.propagate = False

CONFIG = load_config()
# One worker and one thread per model process: one ONNX Runtime session per model uses every core itself.
# A request may wait up to max_latency_ms in the batching queue, then run.
INFERENCE_TIMEOUT_S = CONFIG.max_latency_ms / 1000 + 60
CODES = ("Refusals: 400 malformed request or empty file, 408 stalled upload, 413 file, request or image too large "
         "(limits in /models → config), 415 not a PNG/JPEG/TIFF/BMP/DICOM image or a codec that cannot be decoded, "
         "422 corrupt or truncated image, each per image in `results` when other images of the request were "
         "answered (HTTP 200); 406 for an image that is not DICOM when output=dicom-sr (DICOM SRs: one "
         "application/dicom, several multipart/related, 206 + Warning when some were refused); 422 for an `alpha` "
         "that is not a number strictly between 0 and 1; 503 when the task has no model (the message says what to "
         "train) or the server is busy (Retry-After).")
SETS = ("Each answered image carries `prediction_set` (the labels plausible at level 1 - `alpha`, most probable "
        "first; split conformal prediction) and its `alpha` once the model card has conformal scores.")
Cls = TypeVar("Cls", bound=type)
Fn = TypeVar("Fn", bound=Callable[..., Any])


# ---------------------------------------------------------------------------------------------
# the inference worker


def inference_routes(tasks: Sequence[str]) -> Callable[[Cls], Cls]:
    """Class decorator: one batchable method per task, named after it, calling ``self.infer(task, …)``.
    A batchable BentoML method takes one array, so the task is its name; the tasks come from the
    config, so the methods are added before ``@bentoml.service`` reads the class."""

    def method(task: str) -> Any:
        def infer_task(self: MedZooInference, images: np.ndarray) -> np.ndarray:
            return self.infer(task, images)

        infer_task.__name__ = task
        infer_task.__doc__ = f"Outputs (record array: logits, ood_score) of the {task} model for uint8 (N, C, H, W)."
        return bentoml.api(batchable=True, max_batch_size=CONFIG.max_batch_size,
                           max_latency_ms=CONFIG.max_latency_ms)(infer_task)

    def add(cls: Cls) -> Cls:
        for task in tasks:
            setattr(cls, task, method(task))
        return cls

    return add


# runner_connection: the API worker's client session to this service is never renewed; BentoML's
# default renews it every 100 requests and closes the old one under requests still in flight.
# No access log here: its calls are internal (one per batch of user requests, which the API worker logs).
@bentoml.service(name="MedZooInference", workers=1, threads=1, traffic={"timeout": INFERENCE_TIMEOUT_S},
                 runner_connection={"max_requests": 10**9, "max_age": 1e9}, logging={"access": {"enabled": False}})
@inference_routes(CONFIG.task_names)
class MedZooInference:
    """Inference worker: ONNX Runtime sessions behind batchable methods."""

    def __init__(self) -> None:
        from serving.models import ModelTable

        self.table = ModelTable(CONFIG)
        self.table.drift.start(export_drift)  # the medzoo_drift_* gauges follow the windows (serving.metrics)

    # async: answered on the event loop, not queued behind a running batch in the one thread
    @bentoml.api
    async def describe(self) -> dict[str, Any]:
        """Cards, preprocessing and status of every served model (a :class:`ServedTable`)."""
        return self.table.describe().model_dump(mode="json")

    @bentoml.api
    async def stats(self) -> dict[str, Any]:
        """Histogram of the batch sizes each model saw in this worker."""
        return self.table.stats.snapshot()

    @bentoml.api
    async def drift(self) -> dict[str, Any]:
        """Each task's drift window and its tests (a :class:`DriftAnswer`)."""
        return self.table.drift.report().model_dump(mode="json")

    @bentoml.api(batchable=True, max_batch_size=CONFIG.max_batch_size, max_latency_ms=CONFIG.max_latency_ms)
    def ensemble(self, images: np.ndarray) -> np.ndarray:
        """The members' outputs (record array (N, M)) for a uint8 batch (N, C, H, W)."""
        return self.table.predict_members(images)

    def infer(self, task: str, images: np.ndarray) -> np.ndarray:
        """``task``'s outputs for a uint8 batch: what every task method calls."""
        return self.table.predict(task, images)


class RemoteInference:
    """The inference worker as the API worker calls it (:class:`serving.frontend.InferenceClient`).

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

    async def describe(self) -> ServedTable:
        return ServedTable.model_validate(await self._call("describe"))  # validated once, on arrival

    async def stats(self) -> dict[str, Any]:
        return await self._call("stats")

    async def drift(self) -> DriftAnswer:
        return DriftAnswer.model_validate(await self._call("drift"))

    async def predict(self, task: str, images: np.ndarray) -> np.ndarray:
        return await self._call(task, images)

    async def predict_members(self, images: np.ndarray) -> np.ndarray:
        return await self._call("ensemble", images)


# ---------------------------------------------------------------------------------------------
# the API worker


async def respond(work: Awaitable[tuple[int, BaseModel] | Response]) -> Response:
    """The JSON answer with its status; fields that are None are left out (a Response, e.g. DICOM SRs,
    as it is)."""
    headers: dict[str, str] = {}
    try:
        answer = await work
        if isinstance(answer, Response):
            return answer
        status, body = answer
    except Problem as p:
        status, body, headers = p.status, ErrorAnswer(error=p.message), p.headers
    return Response(body.model_dump_json(exclude_none=True), status_code=status, headers=headers,
                    media_type="application/json")


def documented(doc: str) -> Callable[[Fn], Fn]:
    """Give an endpoint a docstring built from constants (the OpenAPI description shows it)."""

    def set_doc(fn: Fn) -> Fn:
        fn.__doc__ = doc
        return fn

    return set_doc


def _uploads(images: list[Path] | list[Upload]) -> list[Upload]:
    return as_uploads(images, CONFIG.limits.max_file_bytes)


def task_routes(tasks: Sequence[str]) -> Callable[[Cls], Cls]:
    """Class decorator: ``POST /<task>`` and ``POST /<task>/explain`` for every configured task, each
    calling the class's one method for it (:meth:`MedZoo.classify`, :meth:`MedZoo.explain`). The tasks
    come from the config, so the routes are added before ``@bentoml.service`` reads the class."""

    def classify(task: str) -> Any:
        async def endpoint(self: MedZoo, images: list[Path], top_k: int | None = None, alpha: float | None = None,
                           preview: bool = False, output: str | None = None) -> Response:
            return await self.classify(task, images, top_k, alpha, preview, output)

        endpoint.__name__ = task
        endpoint.__doc__ = (f"Classify {task} images with the served {task} model: the top_k classes with "
                            f"probabilities per image, and the model (bundle id, weights sha256). {SETS} {CODES}")
        return bentoml.api(input_spec=ImagesInput, output_spec=TaskAnswer)(endpoint)

    def explain_task(task: str) -> Any:
        async def endpoint(self: MedZoo, images: list[Path], target: str | None = None,
                           top_k: int | None = None, alpha: float | None = None) -> Response:
            return await self.explain(task, images, target, top_k, alpha)

        endpoint.__name__ = f"explain_{task}"
        endpoint.__doc__ = explain_doc(task)
        return bentoml.api(route=f"/{task}/explain", input_spec=ExplainInput, output_spec=ExplainAnswer)(endpoint)

    def add(cls: Cls) -> Cls:
        for task in tasks:
            setattr(cls, task, classify(task))
            setattr(cls, f"explain_{task}", explain_task(task))
        return cls

    return add


# Its traffic timeout is the request's time limit: BentoML cancels the handler and answers 504
# (the request's decoding is abandoned, serving.decoding). The upload page is a static ASGI app at /ui.
@bentoml.service(name="MedZoo", workers=CONFIG.api_workers, traffic={"timeout": CONFIG.request_timeout_s},
                 logging={"access": {"enabled": CONFIG.access_log}})
@bentoml.asgi_app(ui_app(), path=UI_PATH)
@task_routes(CONFIG.task_names)
class MedZoo:
    """medzoo: medical image classification (skin, organ, pathology, extra tasks) over HTTP."""

    inference = bentoml.depends(MedZooInference)
    explainer = bentoml.depends(MedZooExplainer)

    def __init__(self) -> None:
        pool = DecodePool(CONFIG.decode_threads, int(CONFIG.decode_memory_mb * 2**20), CONFIG.admission_s)
        self.remote = RemoteInference(self.inference)
        self.frontend = Frontend(self.remote, CONFIG.limits, CONFIG.top_k, pool,
                                 CONFIG.max_batch_size, CONFIG.refuse_ood)
        # the audit trail of this API worker: a file of its own (serving.audit), closed by close_audit
        self.audit: AuditTrail | None = None
        if CONFIG.audit_log is not None:
            self.audit = AuditTrail(CONFIG.audit_log, CONFIG.audit_max_mb, CONFIG.audit_flush_s)
            subscribe(self.audit)
        # live metrics at /metrics: this worker's counts, summed with the other workers' by BentoML
        subscribe(ServiceMetrics((*CONFIG.task_names, ENSEMBLE_ROUTE)))
        log.info("endpoints: %s", ", ".join(f"/{t}" for t in (*CONFIG.task_names, ENSEMBLE_ROUTE, "models", "stats",
                                                                "drift")))

    @bentoml.on_shutdown
    def close_audit(self) -> None:
        """After the SIGTERM drain: write and fsync what the audit trail still holds."""
        if self.audit is not None:
            self.audit.close()

    async def __is_ready__(self) -> bool:
        """Ready once the inference worker has described its models."""
        try:
            await self.frontend.table()
        except Problem as p:
            log.info("waiting for the inference worker: %s", p.message)
            return False
        return True

    async def classify(self, task: str, images: list[Path] | list[Upload], top_k: int | None,
                       alpha: float | None = None, preview: bool = False, output: str | None = None) -> Response:
        """``POST /<task>``: what every task route calls (``output="dicom-sr"``: DICOM SRs, serving.sr)."""
        if wants_sr(output):
            return await respond(sr_answer(self.frontend, self.frontend.task_route(task, top_k, alpha),
                                           _uploads(images)))
        return await respond(self.frontend.classify(task, _uploads(images), top_k, alpha, preview))

    async def explain(self, route: str, images: list[Path] | list[Upload], target: str | None,
                      top_k: int | None, alpha: float | None = None) -> Response:
        """``POST /<route>/explain``: what every explanation route calls."""
        return await respond(explain(self.frontend, self.explainer, route, _uploads(images), target,
                                     top_k or CONFIG.top_k, alpha))

    @bentoml.api(input_spec=ImagesInput, output_spec=EnsembleAnswer)
    @documented(f"Classify pathology images with the ensemble (mean of the members' logits): per image the top_k "
                f"classes, probabilities, logits, each member's vote and their agreement. {SETS} {CODES}")
    async def pathology_ensemble(self, images: list[Path], top_k: int | None = None, alpha: float | None = None,
                                 preview: bool = False, output: str | None = None) -> Response:
        if wants_sr(output):
            return await respond(sr_answer(self.frontend, self.frontend.ensemble_route(top_k, alpha),
                                           _uploads(images)))
        return await respond(self.frontend.ensemble(_uploads(images), top_k, alpha, preview))

    @bentoml.api(route=f"/{ENSEMBLE_ROUTE}/explain", input_spec=ExplainInput, output_spec=ExplainAnswer)
    @documented(explain_doc(ENSEMBLE_ROUTE))  # as POST /<task>/explain, for the mean of the members' maps
    async def explain_pathology_ensemble(self, images: list[Path], target: str | None = None,
                                         top_k: int | None = None, alpha: float | None = None) -> Response:
        return await self.explain(ENSEMBLE_ROUTE, images, target, top_k, alpha)

    @bentoml.api
    async def models(self) -> ModelsAnswer:
        """The served models: cards, validation and test metrics, provider; why a task has none; the config.
        Also ``GET /models``."""
        return await respond(self._ok(self.frontend.models()))  # type: ignore[return-value]

    @bentoml.api
    async def stats(self) -> StatsAnswer:
        """Batch sizes each model saw (adaptive batching) and the requests answered per route. Also ``GET /stats``."""
        return await respond(self._ok(self.frontend.stats()))  # type: ignore[return-value]

    @bentoml.api
    async def drift(self) -> DriftAnswer:
        """Per task, the last `drift_window` images its model scored against its validation split: the
        predicted-class mix (chi-square), the OOD scores (Kolmogorov-Smirnov), the OOD rate. One window per
        task, kept by the inference worker. Also ``GET /drift``."""
        return await respond(self._ok(self.frontend.infer(self.remote.drift())))  # type: ignore[return-value]

    @staticmethod
    async def _ok(work: Awaitable[BaseModel]) -> tuple[int, BaseModel]:
        return 200, await work


UPLOAD_ROUTES = [f"/{route}{suffix}" for route in (*CONFIG.task_names, ENSEMBLE_ROUTE) for suffix in ("", "/explain")]
MedZoo.add_asgi_middleware(UploadGuard, upload_routes=UPLOAD_ROUTES, get_routes=["/models", "/stats", "/drift"],
                           limits=CONFIG.limits, body_routes=INFER_PATH)


def _frontend() -> Frontend:
    """This API worker's pipeline: the ``MedZoo`` that BentoML created in this process."""
    return bentoml.get_current_service().frontend  # type: ignore[no-any-return]


# The Open Inference Protocol v2 (serving.v2): a Starlette app mounted at "/" (BentoML's PassiveMount
# hands it only the /v2/... paths its routes match); no FastAPI needed to reach the service's Frontend.
MedZoo.mount_asgi_app(v2_app(_frontend), path="/")
# Idle / header timeout, a cap on open connections, the drain on SIGTERM (serving.connections).
install_connections(MedZoo, CONFIG.shutdown_grace_s, CONFIG.idle_timeout_s, CONFIG.max_connections)
