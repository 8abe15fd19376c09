"""Live metrics at BentoML's ``/metrics`` (Prometheus exposition), beside BentoML's own.

:class:`ServiceMetrics` is an observer (:mod:`serving.events`) in each API worker: it turns every
request's :class:`~serving.events.RequestEvent` into counters and histograms labelled by task,
endpoint (``classify`` or ``explain``) and model — never by file name or request id, so the series
stay few. :func:`export_drift` sets the drift gauges from the inference worker, which holds the one
window per task (:mod:`serving.drift`).

Several processes write these metrics (every API worker, the inference worker): BentoML starts each
with ``PROMETHEUS_MULTIPROC_DIR`` set, and prometheus_client's multiprocess mode writes each
process's values to files there, which ``/metrics`` sums (counters, histograms) or, for the drift
gauges, takes the most recent value of a live process. ``prometheus_client`` is imported here
inside functions (the way ``bentoml.metrics``, deprecated since BentoML 1.4, defers it): it chooses
multiprocess mode when first imported, so it must be imported after the worker has its
environment, and :mod:`serving.service` imports this module before that.

Names and units follow Prometheus' conventions (``_total`` counters, ``_seconds``); every metric
has its HELP text. The table is in README.md ("Monitoring").
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from serving.drift import CLASS_MIX, OOD_SCORE
from serving.events import ImageEvent, RequestEvent, split_route
from serving.schemas import TaskDrift

PREFIX = "medzoo"
OOD_KIND = "out_of_distribution"  # the refusal kind of an image refused under refuse_ood
UNKNOWN_TASK = "unknown"  # the task label of a route no task has (e.g. /v2/models/<any name>/infer)
SECONDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
IMAGES = (1, 2, 4, 8, 16, 32, 64, 128, 256)
SET_SIZES = (0, 1, 2, 3, 4, 5, 6, 8, 10, 12, 16)
PROBABILITIES = (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0)


@dataclass(frozen=True)
class RequestMetrics:
    """The API workers' metrics (prometheus_client objects)."""

    requests: Any
    received: Any
    answered: Any
    flagged: Any
    refused: Any
    set_size: Any
    top_probability: Any
    decode: Any
    inference: Any
    batch: Any


@dataclass(frozen=True)
class DriftGauges:
    """The inference worker's drift gauges (prometheus_client objects)."""

    p_value: Any
    window: Any
    ood_rate: Any
    reference_ood_rate: Any


@functools.cache
def request_metrics() -> RequestMetrics:
    """The API workers' metrics, created once per process (a second registration would be refused)."""
    from prometheus_client import Counter, Histogram

    def counter(name: str, doc: str, labels: tuple[str, ...]) -> Any:
        return Counter(f"{PREFIX}_{name}", doc, labels)

    def histogram(name: str, doc: str, labels: tuple[str, ...], buckets: tuple[float, ...]) -> Any:
        return Histogram(f"{PREFIX}_{name}", doc, labels, buckets=buckets)

    task = ("task", "endpoint")
    return RequestMetrics(
        requests=counter("requests_total", "Requests to a task's endpoints by HTTP status answered "
                         "(refused whole before any image was read included)", (*task, "status")),
        received=counter("images_received_total", "Images uploaded to a task's endpoints, answered or refused", task),
        answered=counter("images_total", "Images answered, by the model that answered and its predicted class",
                         (*task, "model", "predicted")),
        flagged=counter("images_flagged_total", "Images the model's detector flagged out of distribution "
                        "(answered, or refused under refuse_ood)", (*task, "model")),
        refused=counter("images_refused_total", "Images refused, by HTTP status and kind (too_large, unsupported, "
                        "corrupt, out_of_distribution ...)", (*task, "status", "kind")),
        set_size=histogram("prediction_set_size", "Classes in an answered image's conformal prediction set",
                           (*task, "model"), SET_SIZES),
        top_probability=histogram("top_probability", "Probability of an answered image's predicted class",
                                  (*task, "model"), PROBABILITIES),
        decode=histogram("decode_duration_seconds", "Time a request spent decoding its images (headers and "
                         "pixels, admission included)", task, SECONDS),
        inference=histogram("inference_duration_seconds", "Time a request waited for its model outputs "
                            "(batching wait included)", task, SECONDS),
        batch=histogram("request_batch_images", "Images one request sent to the model(s) "
                        "(bentoml_service_adaptive_batch_size: the batches the models ran)", task, IMAGES),
    )


@functools.cache
def drift_gauges() -> DriftGauges:
    """The drift gauges, created once per process; multiprocess mode keeps the most recent value of a
    live process (one inference worker writes them)."""
    from prometheus_client import Gauge

    def gauge(name: str, doc: str, labels: tuple[str, ...]) -> Any:
        return Gauge(f"{PREFIX}_{name}", doc, labels, multiprocess_mode="livemostrecent")

    return DriftGauges(
        p_value=gauge("drift_p_value", "p-value of a drift test of a task's window against the validation split "
                      "(test: class_mix = chi-square of the predicted classes, ood_score = Kolmogorov-Smirnov of "
                      "the OOD scores)", ("task", "test")),
        window=gauge("drift_window_images", "Images in a task's drift window", ("task",)),
        ood_rate=gauge("drift_ood_rate", "Share of a task's drift window flagged out of distribution", ("task",)),
        reference_ood_rate=gauge("drift_reference_ood_rate", "Share of the validation split flagged out of "
                                 "distribution (the model card's drift reference)", ("task",)),
    )


def model_label(event: RequestEvent) -> str:
    """The model(s) that answered: a bundle id, or the ensemble's ids joined by ``+`` (configured, so bounded)."""
    return "+".join(m.id for m in event.models)


class ServiceMetrics:
    """The observer that counts requests and images (subscribed in each API worker); ``tasks``: the
    served routes' names, the only ``task`` label values (a client's made-up name counts as ``unknown``,
    so that no request can add series)."""

    def __init__(self, tasks: Iterable[str]) -> None:
        self.tasks = frozenset(tasks)
        self.m = request_metrics()

    def observe(self, event: RequestEvent) -> None:
        task, endpoint = split_route(event.route)
        task = task if task in self.tasks else UNKNOWN_TASK
        m = self.m
        m.requests.labels(task, endpoint, str(event.status)).inc()
        if event.decode_s is not None:
            m.decode.labels(task, endpoint).observe(event.decode_s)
        if event.infer_s is not None:
            m.inference.labels(task, endpoint).observe(event.infer_s)
        if event.batch:
            m.batch.labels(task, endpoint).observe(event.batch)
        model = model_label(event)
        for image in event.images:
            self._image(task, endpoint, model, image)

    def _image(self, task: str, endpoint: str, model: str, image: ImageEvent) -> None:
        m = self.m
        m.received.labels(task, endpoint).inc()
        if image.in_distribution is False or image.kind == OOD_KIND:
            m.flagged.labels(task, endpoint, model).inc()
        if image.status != 200:
            m.refused.labels(task, endpoint, str(image.status), image.kind or "refused").inc()
            return
        if image.predicted is not None:
            m.answered.labels(task, endpoint, model, image.predicted).inc()
            m.top_probability.labels(task, endpoint, model).observe(image.top[0][1])
        if image.prediction_set is not None:
            m.set_size.labels(task, endpoint, model).observe(len(image.prediction_set))


def export_drift(report: TaskDrift) -> None:
    """Set the gauges of one task's drift report; a test that
    cannot run (no reference, too few images) leaves its gauge absent."""
    g = drift_gauges()
    g.window.labels(report.task).set(report.images)
    if report.ood_rate is not None:
        g.ood_rate.labels(report.task).set(report.ood_rate)
    if report.reference_ood_rate is not None:
        g.reference_ood_rate.labels(report.task).set(report.reference_ood_rate)
    for name, test in ((CLASS_MIX, report.class_test), (OOD_SCORE, report.ood_test)):
        if test is not None:
            g.p_value.labels(report.task, name).set(test.p_value)


__all__ = ["UNKNOWN_TASK", "DriftGauges", "RequestMetrics", "ServiceMetrics", "drift_gauges", "export_drift",
           "model_label", "request_metrics"]
