"""The API worker's request pipeline: uploads → decode → infer → interpret → answer.

Every route runs :meth:`Frontend.run`; a :class:`Route` supplies only what differs between them —
which model(s) answer and how one image's result and the whole answer are built (:class:`TaskRoute`
for ``POST /<task>``, :class:`EnsembleRoute` for ``POST /pathology_ensemble``,
:class:`serving.explain_api.ExplainRoute` for the explanations). The steps:

1. uploads: read by :class:`serving.uploads.UploadGuard` (byte limits, 400 / 408 / 413 / 415 for a
   whole request), each a :class:`~serving.uploads.Upload` that carries its own refusal from here on;
2. decode (:func:`serving.decoding.decode`): headers first (413 / 415 per image, 413 for a request
   above its pixel budget), admission (503 with ``Retry-After``), then ``uint8`` arrays under the
   decode pool's thread and memory limits, so only well-formed arrays reach the inference worker;
3. infer: one batch of the request's good images (the :class:`~serving.batching.Coalescer` sends
   concurrent requests' batches together; 503 when the inference worker cannot answer);
4. interpret: logits become answers through :func:`zoo.postprocess.interpret` and
   :func:`zoo.ensemble.combine` only (prediction sets at the request's ``alpha``, 422 for an α that
   is not a level); with ``refuse_ood`` a flagged image is refused (422);
5. answer: one result per upload, in upload order (with ``preview``, each answered image's decoded
   array as a PNG: what the model saw, from the one decode); the request fails (with its images'
   status) only when none could be used;
6. observe: the request's :class:`~serving.events.RequestEvent` (each image's answer or refusal,
   the models, timings) goes to the observers (live metrics, drift windows, the audit trail).
"""

from __future__ import annotations

import abc
import asyncio
import base64
import io
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import numpy as np
from pydantic import BaseModel

from serving.batching import Coalescer
from serving.config import ENSEMBLE_ROUTE, Limits
from serving.decoding import DecodePool, decode
from serving.events import RequestEvent, RequestMeta, ServedModel, image_event, publish
from serving.outputs import read_record
from serving.schemas import (
    ClassScore,
    EnsembleAnswer,
    EnsembleImageResult,
    EnsembleModel,
    ErrorAnswer,
    ImageResult,
    MemberVote,
    ModelsAnswer,
    ServedEnsembleInfo,
    ServedModelInfo,
    ServedModelRef,
    ServedTable,
    StatsAnswer,
    TaskAnswer,
)
from serving.uploads import Problem, Upload
from zoo.card import ModelInfo
from zoo.ensemble import COMBINE, combine
from zoo.postprocess import check_alpha, interpret, top_classes
from zoo.preprocess import Preprocessing

log = logging.getLogger("serving")


class InferenceClient(Protocol):
    """The inference worker as the API layer calls it (the BentoML dependency, or in-process)."""

    async def describe(self) -> ServedTable: ...

    async def stats(self) -> dict[str, Any]: ...

    async def predict(self, task: str, images: np.ndarray) -> np.ndarray: ...

    async def predict_members(self, images: np.ndarray) -> np.ndarray: ...


class Answered(Exception):
    """A route's answer given before (or instead of) the usual steps: a missing model, a bad target."""

    def __init__(self, status: int, body: BaseModel) -> None:
        super().__init__(status)
        self.status, self.body = status, body


class Route(abc.ABC):
    """What one kind of endpoint supplies to :meth:`Frontend.run`."""

    name: str  # counted per request in /stats
    prep: Preprocessing  # the preprocessing its model(s) take
    result_type: type[BaseModel] = ImageResult  # one image's result, also for a refused image
    preview: bool = False  # answer each decoded image as a PNG (``preview_png``)
    previews: dict[int, str] | None = None  # upload index -> base64 PNG, once rendered
    keep_dicom: bool = False  # keep each DICOM header, refuse other images (406): output=dicom-sr (serving.sr)

    async def render(self, uploads: list[Upload]) -> None:
        """With ``preview``: the decoded images as PNGs, in a thread, not on the event loop that answers
        the other requests (a 224 px RGB image of noise took 20-28 ms to encode on a shared 2-core CPU)."""
        if self.preview:
            self.previews = await asyncio.to_thread(
                lambda: {up.index: preview_png(up.array) for up in uploads if up.array is not None})

    def preview_of(self, up: Upload) -> dict[str, str]:
        """``preview_png`` of an answered image, when asked for."""
        return {"preview_png": self.previews[up.index]} if self.previews and up.index in self.previews else {}

    @abc.abstractmethod
    async def infer(self, batch: np.ndarray) -> Any:
        """The model answer for the request's decoded images (uint8 (N, C, H, W))."""

    @abc.abstractmethod
    def result(self, up: Upload, out: Any, n: int) -> BaseModel:
        """The result of image ``n`` of the batch."""

    @abc.abstractmethod
    def answer(self, results: list[Any], error: str | None) -> BaseModel:
        """The request's answer from its results, in upload order."""

    def flagged(self, out: Any, n: int) -> str | None:
        """Why image ``n`` is refused under ``refuse_ood`` (None: it is answered)."""
        return None

    def served(self) -> tuple[ServedModel, ...]:
        """The model(s) that answer this route (bundle ids and weights sha256), for the observers."""
        return ()

    def refused(self, up: Upload) -> BaseModel:
        return self.result_type(index=up.index, filename=up.filename, status=up.status, error=up.error)


def _overall(uploads: list[Upload]) -> tuple[int, str | None]:
    """200 when any image was answered; else the images' common status (400 when they differ)."""
    if any(up.array is not None for up in uploads):
        return 200, None
    statuses = {up.status for up in uploads}
    return (statuses.pop() if len(statuses) == 1 else 400), "; ".join(f"{up.filename}: {up.error}" for up in uploads)


def _stack(uploads: list[Upload]) -> np.ndarray:
    arrays = [up.array for up in uploads if up.array is not None]
    return arrays[0][None] if len(arrays) == 1 else np.stack(arrays)


def _extras(pred: Any, n: int, labels: list[str]) -> dict[str, Any]:
    """Calibration, out-of-distribution and prediction-set fields of image ``n``, where the answer
    carries them."""
    out: dict[str, Any] = {}
    if getattr(pred, "calibrated", None) is not None:
        out["calibrated"] = bool(pred.calibrated)
    for name, cast in (("ood_score", float), ("in_distribution", bool)):
        values = getattr(pred, name, None)
        if values is not None:
            out[name] = cast(values[n])
    plausible = pred.prediction_set(n, labels)
    if plausible is not None:
        out["prediction_set"], out["alpha"] = plausible, pred.alpha
    return out


def preview_png(array: np.ndarray) -> str:
    """Base64 PNG of a decoded uint8 (C, H, W) image: what the model saw (grey or RGB)."""
    from PIL import Image

    pixels = array[0] if array.shape[0] == 1 else array.transpose(1, 2, 0)
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(pixels)).save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def checked_alpha(alpha: float | None, route: str) -> float | None:
    """The request's α, or its answer: 422 unless it is a number strictly between 0 and 1 (the
    HTTP options are checked on arrival; this covers in-process calls)."""
    try:
        return check_alpha(alpha)
    except ValueError as e:
        raise Answered(422, ErrorAnswer(error=str(e), task=route)) from None


def _scores(probs: np.ndarray, labels: list[str], k: int) -> list[ClassScore]:
    return [ClassScore.model_validate(c) for c in top_classes(probs, labels, k)]


def _ood_refusal(pred: Any, n: int, card: ModelInfo | None) -> str | None:
    """The refusal of an image flagged out of distribution (None when it is not flagged)."""
    if pred.in_distribution is None or bool(pred.in_distribution[n]):
        return None
    threshold = f"{card.ood.threshold:.3f}" if card is not None and card.ood is not None else "0 (ensemble margin)"
    return (f"refused: the image looks unlike the model's training images (out-of-distribution score "
            f"{float(pred.ood_score[n]):.3f} above {threshold}); this service answers no such image")


class TaskRoute(Route):
    """``POST /<task>``: one model, the top classes and the prediction set per image."""

    def __init__(self, fe: Frontend, info: ServedModelInfo, top_k: int, alpha: float | None = None,
                 preview: bool = False) -> None:
        assert info.preprocessing is not None and info.labels is not None
        self.fe, self.info, self.top_k, self.alpha, self.preview = fe, info, top_k, alpha, preview
        self.name, self.prep, self.labels = info.task, info.preprocessing, info.labels

    async def infer(self, batch: np.ndarray) -> Any:
        task = self.name
        record = await self.fe.call(task, lambda x: self.fe.inference.predict(task, x), batch)
        logits, ood = read_record(record)
        return interpret(logits, self.info.model_info, ood, self.alpha)

    def result(self, up: Upload, out: Any, n: int) -> BaseModel:
        return ImageResult(index=up.index, filename=up.filename, model=self.info.ref,
                           top=_scores(out.probs[n], self.labels, self.top_k), **_extras(out, n, self.labels),
                           **self.preview_of(up))

    def flagged(self, out: Any, n: int) -> str | None:
        return _ood_refusal(out, n, self.info.model_info)

    def served(self) -> tuple[ServedModel, ...]:
        return (ServedModel(self.info.id or "", self.info.weights_sha256 or ""),)

    def answer(self, results: list[Any], error: str | None) -> BaseModel:
        i = self.info
        model = ServedModelRef(id=i.id or "", weights_sha256=i.weights_sha256 or "", arch=i.arch or "",
                               provider=i.provider or "")
        return TaskAnswer(task=self.name, model=model, results=results, error=error)


class EnsembleRoute(Route):
    """``POST /pathology_ensemble``: the mean of the members' logits, each member's vote, the
    ensemble's prediction set."""

    result_type = EnsembleImageResult

    def __init__(self, fe: Frontend, info: ServedEnsembleInfo, top_k: int, alpha: float | None = None,
                 preview: bool = False) -> None:
        assert info.preprocessing is not None and info.labels is not None
        self.fe, self.info, self.top_k, self.alpha, self.preview = fe, info, top_k, alpha, preview
        self.name, self.prep, self.labels = ENSEMBLE_ROUTE, info.preprocessing, info.labels
        self.members = [m.ref for m in info.members]

    async def infer(self, batch: np.ndarray) -> Any:
        record = await self.fe.call(ENSEMBLE_ROUTE, self.fe.inference.predict_members, batch)  # (N, M)
        logits, ood = read_record(record)
        cards = [m.model_info for m in self.info.members]
        return combine(logits.transpose(1, 0, 2), cards if all(cards) else None,
                       list(ood.T) if ood is not None else None, self.info.conformal, self.alpha)

    def result(self, up: Upload, out: Any, n: int) -> BaseModel:
        votes = []
        for j, m in enumerate(self.members):
            c = int(out.member_classes[n, j])
            votes.append(MemberVote(id=m.id, weights_sha256=m.weights_sha256, class_=c, label=self.labels[c],
                                    prob=float(out.member_probs[n, j, c])))
        return EnsembleImageResult(
            index=up.index, filename=up.filename, top=_scores(out.probs[n], self.labels, self.top_k),
            probs=[float(v) for v in out.probs[n]], logits=[float(v) for v in out.logits[n]],
            agreement=float(out.agreement[n]), members=votes, **_extras(out, n, self.labels),
            **self.preview_of(up))

    def flagged(self, out: Any, n: int) -> str | None:
        return _ood_refusal(out, n, None)

    def served(self) -> tuple[ServedModel, ...]:
        return tuple(ServedModel(m.id, m.weights_sha256) for m in self.members)

    def answer(self, results: list[Any], error: str | None) -> BaseModel:
        model = EnsembleModel(ensemble=self.members, arch=self.info.arch, combine=COMBINE)
        return EnsembleAnswer(task=ENSEMBLE_ROUTE, model=model, error=error, results=results)


def _log_table(table: ServedTable) -> None:
    for task, info in table.tasks.items():
        if info.status == "ok":
            log.info("/%s: %s (%s) on %s", task, info.id, info.arch, info.provider)
        else:
            log.warning("/%s answers 503: %s", task, info.message)
    ens = table.ensemble
    if ens.status == "ok":
        log.info("/%s: %s on %s", ENSEMBLE_ROUTE, ", ".join(m.id or "" for m in ens.members), ens.members[0].provider)
    else:
        log.warning("/%s answers 503: %s", ENSEMBLE_ROUTE, ens.message)


class Frontend:
    """The request pipeline of the API worker (module docstring); ``inference`` runs the models."""

    def __init__(self, inference: InferenceClient, limits: Limits, top_k: int, pool: DecodePool | None = None,
                 max_batch: int = 64, refuse_ood: bool = False) -> None:
        self.inference = inference
        self.limits = limits
        self.top_k = top_k
        self.pool = pool or DecodePool(threads=2, memory_bytes=512 << 20, queue_s=20)
        self.max_batch = max_batch
        self.refuse_ood = refuse_ood
        self.requests: Counter[str] = Counter()
        self._table: ServedTable | None = None
        self._lock = asyncio.Lock()
        self._batchers: dict[str, Coalescer] = {}

    async def table(self) -> ServedTable:
        """The inference worker's description of the served models (fetched once); 503 while it
        cannot be reached."""
        if self._table is None:
            async with self._lock:
                if self._table is None:
                    table = await self.infer(self.inference.describe())
                    _log_table(table)
                    self._table = table
        return self._table

    async def infer(self, call: Awaitable[Any]) -> Any:
        """The inference worker's answer, or 503 when it cannot give one."""
        import aiohttp
        from bentoml.exceptions import BentoMLException

        try:
            return await call
        except (BentoMLException, aiohttp.ClientError, OSError, asyncio.TimeoutError) as e:
            log.warning("inference failed: %s", e)
            raise Problem(503, f"inference backend unavailable: {str(e)[:200]}") from None

    async def call(self, name: str, send: Callable[[np.ndarray], Awaitable[np.ndarray]], batch: np.ndarray) -> Any:
        """``send(batch)`` through the model's coalescer (batches of concurrent requests sent together)."""
        if name not in self._batchers:
            self._batchers[name] = Coalescer(send, self.max_batch)
        return await self.infer(self._batchers[name](batch))

    async def run(self, route: Route, uploads: list[Upload]) -> tuple[int, BaseModel]:
        """The pipeline's steps for one request (module docstring): status and answer; the request's
        :class:`~serving.events.RequestEvent` goes to the observers (metrics, drift, audit)."""
        self.requests[route.name] += 1
        started = time.perf_counter()
        timings: dict[str, Any] = {}
        results: dict[int, BaseModel] = {}
        try:
            await decode(self.pool, uploads, route.prep, self.limits, route.keep_dicom)
            timings["decode_s"] = time.perf_counter() - started
            good = [up for up in uploads if up.array is not None]
            if good:
                out = await route.infer(_stack(good))
                timings["infer_s"], timings["batch"] = time.perf_counter() - started - timings["decode_s"], len(good)
                await route.render(good)
                for n, up in enumerate(good):
                    reason = route.flagged(out, n) if self.refuse_ood else None
                    if reason:
                        up.refuse(422, reason, "out_of_distribution")
                    else:
                        results[up.index] = route.result(up, out, n)
        except (Problem, Answered) as e:
            message = e.message if isinstance(e, Problem) else getattr(e.body, "error", None) or ""
            self._publish(route, uploads, {}, e.status, timings, message)
            raise
        for up in uploads:
            if up.index not in results:
                results[up.index] = route.refused(up)
        status, error = _overall(uploads)
        self._publish(route, uploads, results, status, timings, error or "")
        return status, route.answer([results[i] for i in sorted(results)], error)

    @staticmethod
    def _publish(route: Route, uploads: list[Upload], results: dict[int, BaseModel], status: int,
                 timings: dict[str, Any], error: str) -> None:
        meta = uploads[0].meta if uploads else RequestMeta()
        images = tuple(image_event(up, results.get(up.index)) for up in uploads)
        publish(RequestEvent(meta=meta, route=route.name, status=status, images=images, models=route.served(),
                             error=error, **timings))

    async def answered(self, build: Awaitable[Route], uploads: list[Upload]) -> tuple[int, BaseModel]:
        """:meth:`run` with the route ``build`` gives, or the answer it gave instead (:class:`Answered`)."""
        try:
            return await self.run(await build, uploads)
        except Answered as a:
            return a.status, a.body

    async def task_route(self, task: str, top_k: int | None, alpha: float | None = None,
                         preview: bool = False) -> Route:
        info = (await self.table()).tasks.get(task)
        if info is None:
            raise Answered(404, ErrorAnswer(error=f"unknown task {task!r}", task=task))
        if info.status != "ok":  # read nothing: the task cannot answer whatever was sent
            raise Answered(503, ErrorAnswer(error=info.message or "", task=task))
        return TaskRoute(self, info, top_k or self.top_k, checked_alpha(alpha, task), preview)

    async def ensemble_route(self, top_k: int | None, alpha: float | None = None, preview: bool = False) -> Route:
        info = (await self.table()).ensemble
        if info.status != "ok":
            raise Answered(503, ErrorAnswer(error=info.message, task=ENSEMBLE_ROUTE))
        return EnsembleRoute(self, info, top_k or self.top_k, checked_alpha(alpha, ENSEMBLE_ROUTE), preview)

    async def classify(self, task: str, uploads: list[Upload], top_k: int | None, alpha: float | None = None,
                       preview: bool = False) -> tuple[int, BaseModel]:
        """Status and answer of ``POST /<task>`` (prediction sets at level 1 − ``alpha``, default the card's)."""
        return await self.answered(self.task_route(task, top_k, alpha, preview), uploads)

    async def ensemble(self, uploads: list[Upload], top_k: int | None, alpha: float | None = None,
                       preview: bool = False) -> tuple[int, BaseModel]:
        """Status and answer of ``POST /pathology_ensemble``."""
        return await self.answered(self.ensemble_route(top_k, alpha, preview), uploads)

    async def models(self) -> ModelsAnswer:
        table = await self.table()
        return ModelsAnswer(models=[m.listed() for m in table.tasks.values()], ensemble=table.ensemble.listed(),
                            config=table.config)

    async def stats(self) -> StatsAnswer:
        batches = await self.infer(self.inference.stats())
        return StatsAnswer.model_validate({"batches": batches, "requests": dict(self.requests)})


__all__ = ["Answered", "EnsembleRoute", "Frontend", "InferenceClient", "Route", "TaskRoute", "checked_alpha",
           "preview_png"]
