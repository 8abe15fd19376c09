"""The API worker's work per request: uploads → limits from the headers → uint8 batches → answers.

Every request is checked and decoded here, in the API worker, so only well-formed ``uint8
(N, C, H, W)`` arrays reach the batchable inference methods: a bad upload fails alone, before
batching, and never takes a batch with it.

* Headers first: :func:`zoo.preprocess.probe` reads each file's format, size and frames without
  decoding it, in bounded time; an image above ``max_image_pixels``, of an absurd aspect ratio or
  with too many frames is refused (413), a file that is not PNG, JPEG, TIFF, BMP or DICOM (415), and
  a request whose images hold more than ``max_request_pixels`` in all is refused as a whole (413)
  before anything is decoded.
* Then admission and decoding (:mod:`serving.decoding`): a request whose decoding would not finish
  soon is refused with 503 and ``Retry-After``; the images of an admitted one are decoded
  (:func:`zoo.preprocess.load_image`) in the worker's decode threads under its memory budget. A
  request that is cancelled (past ``request_timeout_s``, or its client gone) abandons its decoding.
* Logits become answers through :func:`zoo.postprocess.interpret` and
  :func:`zoo.ensemble.combine` only.

Status codes of refused inputs: 400 malformed request or empty file, 408 stalled upload, 413 file,
request or image too large, 415 not a PNG/JPEG/TIFF/BMP/DICOM file or a codec / image mode that
cannot be decoded, 422 a corrupt or truncated image. In a request with several images each item
answers for itself; the request fails (with the items' status) only when none could be used.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from serving.batching import Coalescer
from serving.config import ENSEMBLE_ROUTE, Limits
from serving.decoding import AbandonableBytes, Abandoned, DecodePool
from serving.outputs import unpack
from serving.schemas import (
    ClassScore,
    EnsembleAnswer,
    EnsembleImageResult,
    EnsembleModel,
    ErrorAnswer,
    ImageResult,
    MemberVote,
    ModelRef,
    ModelsAnswer,
    ServedModelRef,
    StatsAnswer,
    TaskAnswer,
)
from serving.uploads import Problem, Upload
from zoo.card import ModelInfo
from zoo.ensemble import COMBINE, combine
from zoo.postprocess import interpret, top_classes
from zoo.preprocess import ImageError, ImageHeader, Preprocessing, load_image, probe
from zoo.preprocess.image import decode_bytes

log = logging.getLogger("serving")

# zoo.preprocess.ImageError.kind → HTTP status
IMAGE_ERROR_STATUS = {"empty": 400, "too_large": 413, "unsupported": 415, "corrupt": 422}
HEADER_WORK = 8 << 20  # what reading a request's headers may take (its files are in memory already)


class Backend(Protocol):
    """The inference side as the API layer sees it (the BentoML dependency, or in-process)."""

    async def describe(self) -> dict[str, Any]: ...

    async def stats(self) -> dict[str, Any]: ...

    async def predict(self, task: str, images: np.ndarray) -> np.ndarray: ...

    async def predict_members(self, images: np.ndarray) -> np.ndarray: ...


@dataclass
class Item:
    """One image of a request on its way: bytes → header → array, or why not."""

    index: int
    filename: str
    data: bytes | None = None
    header: ImageHeader | None = None
    array: np.ndarray | None = None
    status: int = 200
    error: str = ""

    def refuse(self, status: int, error: str) -> None:
        self.status, self.error, self.data = status, error, None


def image_error_status(err: ImageError) -> int:
    """HTTP status for a refusal of :mod:`zoo.preprocess`."""
    return IMAGE_ERROR_STATUS.get(err.kind, 422)


def check_header(item: Item, limits: Limits) -> None:
    """Format and size from the header (nothing decoded); refusals are recorded on the item."""
    if item.data is None:
        return
    if len(item.data) == 0:
        item.refuse(400, "empty file")
        return
    try:
        item.header = probe(item.data, max_pixels=limits.max_image_pixels)
    except ImageError as e:
        item.refuse(image_error_status(e), str(e))


def check_headers(items: list[Item], limits: Limits, abandoned: threading.Event) -> None:
    """Every item's header (at most ``max_images`` of them, each read in bounded time)."""
    for it in items:
        if abandoned.is_set():
            return
        check_header(it, limits)


def decode_item(item: Item, prep: Preprocessing, max_pixels: int, abandoned: threading.Event) -> None:
    """Decode one image whose header passed; the bytes are dropped afterwards."""
    if item.header is None or item.data is None:
        return
    try:
        item.array = load_image(AbandonableBytes(item.data, abandoned), prep, max_pixels=max_pixels)
    except ImageError as e:
        item.refuse(image_error_status(e), str(e))
    except Abandoned:  # nobody waits for this answer any more
        item.refuse(503, "abandoned: the request was cancelled")
    item.data = None


def request_pixels(items: list[Item], limits: Limits) -> int:
    """The request's pixels from the headers; 413 for the whole request above its budget."""
    sized = [it.header for it in items if it.header is not None]
    total = sum(h.pixels for h in sized)
    if total > limits.max_request_pixels:
        raise Problem(413, f"the {len(sized)} images of this request hold {total:,} pixels in all, more than the "
                           f"{limits.max_request_pixels:,} pixel limit per request: send fewer or smaller images")
    return total


def _refused(it: Item, kind: type[ImageResult] = ImageResult) -> ImageResult:
    return kind(index=it.index, filename=it.filename, status=it.status, error=it.error)


def _overall(items: list[Item]) -> tuple[int, str | None]:
    """200 when any image was answered; else the items' common status (400 when they differ)."""
    if any(it.array is not None for it in items):
        return 200, None
    statuses = {it.status for it in items}
    return (statuses.pop() if len(statuses) == 1 else 400), "; ".join(f"{it.filename}: {it.error}" for it in items)


def _stack(items: list[Item]) -> np.ndarray:
    arrays = [it.array for it in items if it.array is not None]
    return arrays[0][None] if len(arrays) == 1 else np.stack(arrays)


def _extras(pred: Any, n: int) -> dict[str, Any]:
    """Calibration and out-of-distribution fields of image ``n``, where the answer carries them."""
    out: dict[str, Any] = {}
    if getattr(pred, "calibrated", None) is not None:
        out["calibrated"] = bool(pred.calibrated)
    for name, cast in (("ood_score", float), ("in_distribution", bool)):
        values = getattr(pred, name, None)
        if values is not None:
            out[name] = cast(values[n])
    return out


def _scores(probs: np.ndarray, labels: list[str], k: int) -> list[ClassScore]:
    return [ClassScore.model_validate(c) for c in top_classes(probs, labels, k)]


def _log_table(table: dict[str, Any]) -> None:
    for task, info in table["tasks"].items():
        if info["status"] == "ok":
            log.info("/%s: %s (%s) on %s", task, info["id"], info["arch"], info["provider"])
        else:
            log.warning("/%s answers 503: %s", task, info["message"])
    ens = table["ensemble"]
    if ens["status"] == "ok":
        log.info("/%s: %s on %s", ENSEMBLE_ROUTE, ", ".join(m["id"] for m in ens["members"]),
                 ens["members"][0]["provider"])
    else:
        log.warning("/%s answers 503: %s", ENSEMBLE_ROUTE, ens["message"])


class Frontend:
    """Request handling shared by every endpoint; ``backend`` does the inference."""

    def __init__(self, backend: Backend, limits: Limits, top_k: int, pool: DecodePool | None = None,
                 max_batch: int = 64, refuse_ood: bool = False) -> None:
        self.backend = backend
        self.refuse_ood = refuse_ood
        self.limits = limits
        self.top_k = top_k
        self.pool = pool or DecodePool(threads=2, memory_bytes=512 << 20, queue_s=20)
        self.max_batch = max_batch
        self.requests: Counter[str] = Counter()
        self._table: dict[str, Any] | None = None
        self._infos: dict[str, tuple[Preprocessing, ModelInfo | None]] = {}
        self._lock = asyncio.Lock()
        self._batchers: dict[str, Coalescer] = {}

    async def table(self) -> dict[str, Any]:
        """The inference worker's description of the served models (fetched once); 503 while it
        cannot be reached."""
        if self._table is None:
            async with self._lock:
                if self._table is None:
                    table = await self._infer(self.backend.describe())
                    _log_table(table)
                    self._table = table
        return self._table

    def _model(self, name: str, info: dict[str, Any]) -> tuple[Preprocessing, ModelInfo | None]:
        """Preprocessing and card of a served model, parsed once."""
        if name not in self._infos:
            card = info.get("model_info")
            self._infos[name] = (Preprocessing.from_dict(info["preprocessing"]),
                                 ModelInfo.model_validate(card) if card else None)
        return self._infos[name]

    def _batcher(self, name: str, call: Callable[[np.ndarray], Awaitable[np.ndarray]]) -> Coalescer:
        if name not in self._batchers:
            self._batchers[name] = Coalescer(call, self.max_batch)
        return self._batchers[name]

    async def decode(self, uploads: list[Upload], prep: Preprocessing) -> list[Item]:
        """Headers first (limits, admission), then the images, concurrently under the decode pool's
        limits (a cancelled request stops there: :mod:`serving.decoding`)."""
        items = [Item(u.index, u.filename, u.data, status=u.status, error=u.error) for u in uploads]
        abandoned = threading.Event()
        await self.pool.run(check_headers, items, self.limits, abandoned, work=HEADER_WORK, abandoned=abandoned)
        request_pixels(items, self.limits)
        todo = [(it, decode_bytes(it.header, prep.image_size)) for it in items if it.header is not None]
        with self.pool.admit(sum(work for _, work in todo)) as admitted:

            async def one(it: Item, work: int) -> None:
                await self.pool.run(decode_item, it, prep, self.limits.max_image_pixels, abandoned, work=work,
                                    abandoned=abandoned)
                admitted.done(work)

            await asyncio.gather(*(one(it, work) for it, work in todo))
        return items

    async def _infer(self, call: Awaitable[Any]) -> Any:
        """The inference worker's answer, or 503 when it cannot give one."""
        import aiohttp
        from bentoml.exceptions import BentoMLException

        try:
            return await call
        except (BentoMLException, aiohttp.ClientError, OSError, asyncio.TimeoutError) as e:
            log.warning("inference failed: %s", e)
            raise Problem(503, f"inference backend unavailable: {str(e)[:200]}") from None

    async def classify(self, task: str, uploads: list[Upload], top_k: int | None) -> tuple[int, Any]:
        """Status and answer of ``POST /<task>``."""
        info = (await self.table())["tasks"].get(task)
        if info is None:
            return 404, ErrorAnswer(error=f"unknown task {task!r}", task=task)
        if info["status"] != "ok":  # read nothing: the task cannot answer whatever was sent
            return 503, ErrorAnswer(error=info["message"], task=task)
        self.requests[task] += 1
        prep, card = self._model(task, info)
        items = await self.decode(uploads, prep)
        good = [it for it in items if it.array is not None]
        results: dict[int, ImageResult] = {it.index: _refused(it) for it in items if it.array is None}
        ref = ModelRef(id=info["id"], weights_sha256=info["weights_sha256"])
        if good:
            batcher = self._batcher(task, lambda x: self.backend.predict(task, x))
            logits, ood = unpack(await self._infer(batcher(_stack(good))), info.get("has_ood", False))
            pred = interpret(logits, card, ood)
            for n, it in enumerate(good):
                if self._refused_as_ood(it, pred, n, card):
                    results[it.index] = _refused(it)
                    continue
                results[it.index] = ImageResult(index=it.index, filename=it.filename, model=ref,
                                                top=_scores(pred.probs[n], info["labels"], top_k or self.top_k),
                                                **_extras(pred, n))
        status, error = _overall(items)
        model = ServedModelRef(id=info["id"], weights_sha256=info["weights_sha256"], arch=info["arch"],
                               provider=info["provider"])
        return status, TaskAnswer(task=task, model=model, results=[results[i] for i in sorted(results)], error=error)

    async def ensemble(self, uploads: list[Upload], top_k: int | None) -> tuple[int, Any]:
        """Status and answer of ``POST /pathology_ensemble``."""
        info = (await self.table())["ensemble"]
        if info["status"] != "ok":
            return 503, ErrorAnswer(error=info["message"], task=ENSEMBLE_ROUTE)
        self.requests[ENSEMBLE_ROUTE] += 1
        prep, _ = self._model(ENSEMBLE_ROUTE, info)
        items = await self.decode(uploads, prep)
        good = [it for it in items if it.array is not None]
        results: dict[int, ImageResult] = {it.index: _refused(it, EnsembleImageResult) for it in items
                                           if it.array is None}
        members = [ModelRef(id=m["id"], weights_sha256=m["weights_sha256"]) for m in info["members"]]
        if good:
            batcher = self._batcher(ENSEMBLE_ROUTE, self.backend.predict_members)
            packed = np.asarray(await self._infer(batcher(_stack(good))), dtype=np.float32)  # (N, M, K'[+1])
            logits, ood = unpack(packed.transpose(1, 0, 2), info.get("has_ood", False))
            cards = [self._model(f"{ENSEMBLE_ROUTE}:{m['id']}", m)[1] for m in info["members"]]
            out = combine(logits, cards if all(cards) else None, list(ood) if ood is not None else None)
            for n, it in enumerate(good):
                if self._refused_as_ood(it, out, n, None):
                    results[it.index] = _refused(it, EnsembleImageResult)
                    continue
                results[it.index] = self._ensemble_result(it, out, n, members, info["labels"], top_k or self.top_k)
        status, error = _overall(items)
        model = EnsembleModel(ensemble=members, arch=info["arch"], combine=COMBINE)
        return status, EnsembleAnswer(task=ENSEMBLE_ROUTE, model=model, error=error,
                                      results=[results[i] for i in sorted(results)])

    def _refused_as_ood(self, it: Item, pred: Any, n: int, card: ModelInfo | None) -> bool:
        """With ``refuse_ood``, an image flagged out of distribution is refused (422), not answered."""
        if not self.refuse_ood or pred.in_distribution is None or bool(pred.in_distribution[n]):
            return False
        threshold = f"{card.ood.threshold:.3f}" if card is not None and card.ood is not None else "0 (ensemble margin)"
        it.refuse(422, f"refused: the image looks unlike the model's training images (out-of-distribution score "
                       f"{float(pred.ood_score[n]):.3f} above {threshold}); this service answers no such image")
        it.array = None
        return True

    @staticmethod
    def _ensemble_result(it: Item, out: Any, n: int, members: list[ModelRef], labels: list[str],
                         k: int) -> EnsembleImageResult:
        votes = []
        for j, m in enumerate(members):
            c = int(out.member_classes[n, j])
            votes.append(MemberVote(id=m.id, weights_sha256=m.weights_sha256, class_=c, label=labels[c],
                                    prob=float(out.member_probs[n, j, c])))
        return EnsembleImageResult(
            index=it.index, filename=it.filename, top=_scores(out.probs[n], labels, k),
            probs=[float(v) for v in out.probs[n]], logits=[float(v) for v in out.logits[n]],
            agreement=float(out.agreement[n]), members=votes, **_extras(out, n))

    async def models(self) -> ModelsAnswer:
        table = await self.table()
        hidden = {"model_info"}
        models = [{k: v for k, v in m.items() if k not in hidden} for m in table["tasks"].values()]
        ensemble = {**table["ensemble"],
                    "members": [{k: v for k, v in m.items() if k not in hidden} for m in table["ensemble"]["members"]]}
        return ModelsAnswer.model_validate({"models": models, "ensemble": ensemble, "config": table["config"]})

    async def stats(self) -> StatsAnswer:
        batches = await self._infer(self.backend.stats())
        return StatsAnswer.model_validate({"batches": batches, "requests": dict(self.requests)})
