"""The public HTTP layer: uploads → per-request decoding → uint8 batches → JSON answers.

Every request is read and decoded here, in the API worker (``zoo.preprocess.load_image`` in a
thread), so only well-formed ``uint8 (N, C, H, W)`` arrays reach the batchable inference
methods: a bad upload fails alone, before batching, and never takes a batch with it.

Status codes of refused inputs: 400 malformed request or empty file, 413 file or request too
large (also decompression bombs and images above ``zoo.preprocess.MAX_PIXELS``), 415 not a
PNG/JPEG/TIFF/BMP file or an image mode that cannot be converted, 422 a corrupt or truncated
image. In a request with several images each item answers for itself; the request fails (with
the items' status) only when none of its images could be used.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

import anyio
import numpy as np
from starlette.applications import Starlette
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.types import Message, Receive

from serving.config import ENSEMBLE_ROUTE, Limits
from zoo.ensemble import COMBINE, combine
from zoo.postprocess import to_probs, top_classes
from zoo.preprocess import ImageError, Preprocessing, load_image

log = logging.getLogger("serving")

# The formats the service takes, by their leading bytes (checked before Pillow sees the data).
SIGNATURES: tuple[tuple[bytes, str], ...] = (
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"\xff\xd8\xff", "JPEG"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"II+\x00", "TIFF"),
    (b"MM\x00+", "TIFF"),
    (b"BM", "BMP"),
)
FORMATS = "PNG, JPEG, TIFF or BMP"
IMAGE_FIELDS = ("images", "image", "file", "files")
OPTION_FIELDS = ("top_k",)


def _finite(obj: Any) -> Any:
    """NaN / inf (an AUC undefined on a split, say) become null: JSON has no NaN."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


class JSON(JSONResponse):
    """JSONResponse that writes non-finite floats as null instead of failing."""

    def render(self, content: Any) -> bytes:
        return super().render(_finite(content))


class Problem(Exception):
    """A request refused as a whole: HTTP status and a message for the user."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class Backend(Protocol):
    """The inference side as the API layer sees it (the BentoML dependency, or in-process)."""

    async def describe(self) -> dict[str, Any]: ...

    async def stats(self) -> dict[str, Any]: ...

    async def predict(self, task: str, images: np.ndarray) -> np.ndarray: ...

    async def predict_members(self, images: np.ndarray) -> np.ndarray: ...


@dataclass
class Upload:
    """One uploaded file (or a refusal found before decoding)."""

    index: int
    filename: str
    data: bytes | None = None
    status: int = 200
    error: str = ""


@dataclass
class Item:
    """One image of a request after decoding."""

    index: int
    filename: str
    array: np.ndarray | None = None
    status: int = 200
    error: str = ""


# zoo.preprocess.ImageError.kind → HTTP status
IMAGE_ERROR_STATUS = {"empty": 400, "too_large": 413, "unsupported": 415, "corrupt": 422}


def image_error_status(err: ImageError) -> int:
    """HTTP status for a refusal of ``zoo.preprocess.load_image``."""
    return IMAGE_ERROR_STATUS.get(err.kind, 422)


def sniff_format(data: bytes) -> str | None:
    """PNG / JPEG / TIFF / BMP from the leading bytes, else None."""
    return next((name for sig, name in SIGNATURES if data.startswith(sig)), None)


def decode_one(upload: Upload, prep: Preprocessing) -> Item:
    """Decode one upload with the documented rules, or say why not."""
    item = Item(upload.index, upload.filename)
    if upload.data is None:
        item.status, item.error = upload.status, upload.error
        return item
    if len(upload.data) == 0:
        item.status, item.error = 400, "empty file"
        return item
    if sniff_format(upload.data) is None:
        item.status, item.error = 415, f"not a {FORMATS} file"
        return item
    try:
        item.array = load_image(upload.data, prep)
    except ImageError as e:
        item.status, item.error = image_error_status(e), str(e)
    return item


def decode_all(uploads: list[Upload], prep: Preprocessing) -> list[Item]:
    return [decode_one(u, prep) for u in uploads]


class _BodyTooLarge(MultiPartException):
    """Raised from inside the body stream when a request passes its size limit."""


def _limited(receive: Receive, limit: int, state: dict[str, bool]) -> Receive:
    """A ``receive`` that stops a request body at ``limit`` bytes."""
    seen = 0

    async def inner() -> Message:
        nonlocal seen
        message = await receive()
        if message["type"] == "http.request":
            seen += len(message.get("body", b""))
            if seen > limit:
                state["too_large"] = True
                raise _BodyTooLarge(f"request body larger than {limit / 2**20:g} MB")
        return message

    return inner


def _too_large(limits: Limits) -> Problem:
    return Problem(413, f"request larger than the {limits.max_request_bytes / 2**20:g} MB limit")


async def read_uploads(request: Request, limits: Limits) -> tuple[list[Upload], dict[str, str]]:
    """The files of a multipart request (any field name), or a raw image body; plus options."""
    length = request.headers.get("content-length")
    if length is not None:
        try:
            if int(length) > limits.max_request_bytes:
                raise _too_large(limits)
        except ValueError:
            raise Problem(400, "invalid Content-Length header") from None
    state = {"too_large": False}
    req = Request(request.scope, _limited(request.receive, limits.max_request_bytes, state))
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    options: dict[str, str] = {}
    uploads: list[Upload] = []
    if ctype == "multipart/form-data":
        try:
            form = await req.form(max_files=limits.max_images, max_fields=len(OPTION_FIELDS) + 8,
                                  max_part_size=64 * 1024)
        except (HTTPException, MultiPartException) as e:
            if state["too_large"]:
                raise _too_large(limits) from None
            detail = str(getattr(e, "detail", "") or getattr(e, "message", "") or e)
            if detail.startswith("Too many files"):
                raise Problem(413, f"more than {limits.max_images} images in one request") from None
            raise Problem(400, f"malformed multipart body: {detail}") from None
        except (KeyError, ValueError, UnicodeDecodeError) as e:
            raise Problem(400, f"malformed multipart body: {type(e).__name__} {e}") from None
        except ClientDisconnect:
            raise Problem(400, "the client disconnected before the upload was complete") from None
        try:
            for name, value in form.multi_items():
                if isinstance(value, UploadFile):
                    up = Upload(len(uploads), value.filename or name)
                    size = value.size if value.size is not None else 0
                    if size > limits.max_file_bytes:
                        up.status, up.error = 413, (f"file of {size / 2**20:.1f} MB is larger than the "
                                                    f"{limits.max_file_bytes / 2**20:g} MB limit")
                    else:
                        up.data = await value.read()
                    uploads.append(up)
                elif name in OPTION_FIELDS:
                    options[name] = value
                elif name in IMAGE_FIELDS:
                    uploads.append(Upload(len(uploads), name, status=400,
                                          error=f"field {name!r} holds text, not an uploaded file"))
                else:
                    raise Problem(400, f"unexpected form field {name!r}: send image files and optionally top_k")
        finally:
            await form.close()
    elif ctype.startswith("image/") or ctype == "application/octet-stream":
        try:
            data = await req.body()
        except _BodyTooLarge:
            raise _too_large(limits) from None
        except ClientDisconnect:
            raise Problem(400, "the client disconnected before the upload was complete") from None
        if len(data) > limits.max_file_bytes:
            uploads.append(Upload(0, "body", status=413, error=(
                f"file of {len(data) / 2**20:.1f} MB is larger than the {limits.max_file_bytes / 2**20:g} MB limit")))
        else:
            uploads.append(Upload(0, "body", data=data))
    else:
        raise Problem(415, f"send multipart/form-data with {FORMATS} files (field 'images'), "
                           "or one raw image body with Content-Type image/*")
    if not uploads:
        raise Problem(400, "no image in the request: attach one or more files (multipart field 'images')")
    return uploads, options


def parse_top_k(request: Request, options: dict[str, str], default: int) -> int:
    raw = options.get("top_k", request.query_params.get("top_k"))
    if raw is None or raw == "":
        return default
    try:
        k = int(raw)
    except ValueError:
        raise Problem(400, f"top_k must be a positive integer, not {raw!r}") from None
    if k < 1:
        raise Problem(400, f"top_k must be a positive integer, not {raw!r}")
    return k


def _stack(items: list[Item]) -> np.ndarray:
    """The decoded images of ``items`` as one uint8 batch (N, C, H, W)."""
    return np.stack([it.array for it in items if it.array is not None])


def _error_item(it: Item) -> dict[str, Any]:
    return {"index": it.index, "filename": it.filename, "status": it.status, "error": it.error}


def _overall_status(items: list[Item]) -> int:
    """200 when any image was answered; else the items' common status (400 when they differ)."""
    if any(it.array is not None for it in items):
        return 200
    statuses = {it.status for it in items}
    return statuses.pop() if len(statuses) == 1 else 400


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

    def __init__(self, backend: Backend, limits: Limits, top_k: int) -> None:
        self.backend = backend
        self.limits = limits
        self.top_k = top_k
        self._table: dict[str, Any] | None = None
        self._lock = asyncio.Lock()
        self.requests: Counter[str] = Counter()

    async def table(self) -> dict[str, Any]:
        """The inference worker's description of the served models (fetched once)."""
        if self._table is None:
            async with self._lock:
                if self._table is None:
                    self._table = await self.backend.describe()
                    _log_table(self._table)
        return self._table

    async def _decode(self, request: Request, prep_dict: dict[str, Any]) -> tuple[list[Item], int]:
        uploads, options = await read_uploads(request, self.limits)
        k = parse_top_k(request, options, self.top_k)
        items = await anyio.to_thread.run_sync(decode_all, uploads, Preprocessing.from_dict(prep_dict))
        return items, k

    async def classify(self, request: Request, task: str) -> JSON:
        info = (await self.table())["tasks"].get(task)
        if info is None:
            return JSON({"error": f"unknown task {task!r}"}, status_code=404)
        if info["status"] != "ok":
            # Read nothing: the task cannot answer whatever was sent.
            return JSON({"task": task, "error": info["message"]}, status_code=503)
        self.requests[task] += 1
        items, k = await self._decode(request, info["preprocessing"])
        good = [it for it in items if it.array is not None]
        results: dict[int, dict[str, Any]] = {it.index: _error_item(it) for it in items if it.array is None}
        model = {"id": info["id"], "weights_sha256": info["weights_sha256"]}
        if good:
            logits = await self._infer(self.backend.predict(task, _stack(good)))
            probs = to_probs(logits)
            for it, p in zip(good, probs, strict=True):
                results[it.index] = {"index": it.index, "filename": it.filename,
                                     "top": top_classes(p, info["labels"], k), "model": model}
        body: dict[str, Any] = {"task": task, "model": {**model, "arch": info["arch"], "provider": info["provider"]},
                                "results": [results[i] for i in sorted(results)]}
        status = _overall_status(items)
        if status != 200:
            body["error"] = "; ".join(f"{it.filename}: {it.error}" for it in items)
        return JSON(body, status_code=status)

    async def ensemble(self, request: Request) -> JSON:
        info = (await self.table())["ensemble"]
        if info["status"] != "ok":
            return JSON({"task": ENSEMBLE_ROUTE, "error": info["message"]}, status_code=503)
        self.requests[ENSEMBLE_ROUTE] += 1
        items, k = await self._decode(request, info["preprocessing"])
        good = [it for it in items if it.array is not None]
        results: dict[int, dict[str, Any]] = {it.index: _error_item(it) for it in items if it.array is None}
        members = info["members"]
        labels: list[str] = info["labels"]
        if good:
            member_logits = await self._infer(self.backend.predict_members(_stack(good)))  # (N, M, K)
            out = combine(member_logits.transpose(1, 0, 2))
            for n, it in enumerate(good):
                results[it.index] = {
                    "index": it.index,
                    "filename": it.filename,
                    "top": top_classes(out.probs[n], labels, k),
                    "probs": [float(v) for v in out.probs[n]],
                    "logits": [float(v) for v in out.logits[n]],
                    "agreement": float(out.agreement[n]),
                    "members": [
                        {"id": m["id"], "weights_sha256": m["weights_sha256"], "class": int(out.member_classes[n, j]),
                         "label": labels[int(out.member_classes[n, j])],
                         "prob": float(out.member_probs[n, j, out.member_classes[n, j]])}
                        for j, m in enumerate(members)
                    ],
                }
        body: dict[str, Any] = {
            "task": ENSEMBLE_ROUTE,
            "model": {"ensemble": [{"id": m["id"], "weights_sha256": m["weights_sha256"]} for m in members],
                      "arch": info["arch"], "combine": COMBINE},
            "results": [results[i] for i in sorted(results)],
        }
        status = _overall_status(items)
        if status != 200:
            body["error"] = "; ".join(f"{it.filename}: {it.error}" for it in items)
        return JSON(body, status_code=status)

    async def _infer(self, call: Awaitable[np.ndarray]) -> np.ndarray:
        import aiohttp
        from bentoml.exceptions import BentoMLException

        try:
            out = await call
        except (BentoMLException, aiohttp.ClientError, OSError) as e:
            log.warning("inference failed: %s", e)
            raise Problem(503, f"inference backend unavailable: {str(e)[:200]}") from None
        return np.asarray(out, dtype=np.float32)

    async def models(self, _: Request) -> JSON:
        table = await self.table()
        return JSON({"models": list(table["tasks"].values()), "ensemble": table["ensemble"],
                             "config": table["config"]})

    async def stats(self, _: Request) -> JSON:
        batches = await self.backend.stats()
        return JSON({"batches": batches, "requests": dict(self.requests)})


def build_app(get_frontend: Callable[[], Frontend], tasks: tuple[str, ...]) -> Starlette:
    """The Starlette app mounted into the BentoML service: one POST route per task."""

    def guard(handler: Callable[[Frontend, Request], Awaitable[JSON]]) -> Callable[[Request], Awaitable[JSON]]:
        async def endpoint(request: Request) -> JSON:
            try:
                return await handler(get_frontend(), request)
            except Problem as p:
                return JSON({"error": p.message}, status_code=p.status)

        return endpoint

    def task_handler(task: str) -> Callable[[Frontend, Request], Awaitable[JSON]]:
        async def handler(fe: Frontend, request: Request) -> JSON:
            return await fe.classify(request, task)

        return handler

    async def ensemble(fe: Frontend, request: Request) -> JSON:
        return await fe.ensemble(request)

    async def models(fe: Frontend, request: Request) -> JSON:
        return await fe.models(request)

    async def stats(fe: Frontend, request: Request) -> JSON:
        return await fe.stats(request)

    routes = [Route(f"/{t}", guard(task_handler(t)), methods=["POST"], name=t) for t in tasks]
    routes += [
        Route(f"/{ENSEMBLE_ROUTE}", guard(ensemble), methods=["POST"], name=ENSEMBLE_ROUTE),
        Route("/models", guard(models), methods=["GET"], name="models"),
        Route("/stats", guard(stats), methods=["GET"], name="stats"),
    ]
    return Starlette(routes=routes)
