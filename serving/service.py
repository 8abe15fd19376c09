"""The medzoo BentoML service: ``bentoml serve serving.service:MedZoo`` (or ``zoo serve``).

Two services, two processes:

* :data:`MedZoo` (the API worker) answers HTTP: ``POST /<task>`` for every served task
  (``/skin``, ``/organ``, ``/pathology`` and any extra task of the config), ``POST
  /pathology_ensemble``, ``GET /models`` and ``GET /stats``; ``POST /<task>/explain`` (typed,
  in ``/docs.json``), answered by the explanation worker ``MedZooExplainer``
  (``serving.explainer``, torch, a process of its own); the upload page at ``/ui``. It reads and decodes the uploads
  of each request itself (``serving.frontend``) and sends only ``uint8 (N, C, H, W)`` arrays on.
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
from collections.abc import Callable
from typing import Any

import bentoml
import numpy as np

from serving.config import ENSEMBLE_ROUTE, load_config
from serving.explain_api import explain_routes
from serving.frontend import Frontend, build_app
from serving.pages import UI_PATH, ui_app

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
INFERENCE_TIMEOUT_S = CONFIG.max_latency_ms / 1000 + 60
MedZooInference = bentoml.service(
    name="MedZooInference", workers=1, threads=1, traffic={"timeout": INFERENCE_TIMEOUT_S},
    runner_connection={"max_requests": 10**9, "max_age": 1e9},
    logging={"access": {"enabled": CONFIG.access_log}},
)(
    type("MedZooInference", (), _inference_namespace())
)


class DependencyBackend:
    """The inference worker as the API layer calls it (remote in a server, local otherwise).

    Inference calls are pure, so a call whose connection to the inference worker dropped is sent
    again (up to ``RETRIES`` times) instead of failing the user's request: BentoML's dependency
    client can lose connections under load (bentoml/BentoML#4971; and #5540, whose session renewal
    is switched off for this service through ``runner_connection``).
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
                log.info("%s: connection to the inference worker dropped (%s); sending again", method, e)
        return await getattr(self.dep.to_async, method)(*args)

    async def describe(self) -> dict[str, Any]:
        return await self._call("describe")

    async def stats(self) -> dict[str, Any]:
        return await self._call("stats")

    async def predict(self, task: str, images: np.ndarray) -> np.ndarray:
        return await self._call(task, images)

    async def predict_members(self, images: np.ndarray) -> np.ndarray:
        return await self._call("ensemble", images)


def _current_frontend() -> Frontend:
    return bentoml.get_current_service().frontend


@bentoml.service(name="MedZoo", workers=CONFIG.api_workers, traffic={"timeout": INFERENCE_TIMEOUT_S + 30},
                 logging={"access": {"enabled": CONFIG.access_log}})
@bentoml.asgi_app(build_app(_current_frontend, TASK_NAMES), path="/")
@bentoml.asgi_app(ui_app(), path=UI_PATH)
class MedZoo(explain_routes(TASK_NAMES, CONFIG.top_k, CONFIG.limits)):  # type: ignore[misc]
    """API worker: per-request decoding, JSON answers; inference in :data:`MedZooInference`,
    explanations (``POST /<task>/explain``, :mod:`serving.explain_api`) in ``MedZooExplainer``,
    the upload page at ``/ui``."""

    inference = bentoml.depends(MedZooInference)

    def __init__(self) -> None:
        self.frontend = Frontend(DependencyBackend(self.inference), CONFIG.limits, CONFIG.top_k)
        log.info("endpoints: %s", ", ".join(f"/{t}" for t in (*TASK_NAMES, ENSEMBLE_ROUTE, "models", "stats")))

    async def __is_ready__(self) -> bool:
        """Ready once the inference worker has described its models."""
        import aiohttp
        from bentoml.exceptions import BentoMLException

        try:
            await self.frontend.table()
        except (BentoMLException, aiohttp.ClientError, OSError) as e:
            log.info("waiting for the inference worker: %s", e)
            return False
        return True
