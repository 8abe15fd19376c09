"""What happened to each request, as typed events, for whoever watches the service.

:class:`serving.frontend.Frontend` publishes one :class:`RequestEvent` per request that reached
the pipeline (answered, partly refused or refused as a whole), and
:class:`serving.uploads.UploadGuard` one per request it refused before (400 / 408 / 413 / 415:
the images it never parsed are not in it). The observers (live metrics, drift windows, the audit
trail) subscribe in the API worker's process with :func:`subscribe`; they read these events only,
never the pipeline's own objects. An observer that fails is logged and never fails a request.
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Protocol

from pydantic import BaseModel

log = logging.getLogger("serving")

REQUEST_ID_HEADER = "x-request-id"
# The refusal kind an HTTP status stands for, when the refusal does not name a finer one.
REFUSAL_KINDS = {400: "malformed", 408: "timeout", 413: "too_large", 415: "unsupported", 422: "corrupt",
                 503: "busy", 504: "timeout"}


@dataclass(frozen=True)
class RequestMeta:
    """Who sent a request and when it arrived; the id is the client's ``X-Request-Id`` when it sent
    a usable one, else a new one (answered back in the same header)."""

    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    client: str | None = None
    received: float = field(default_factory=time.time)  # Unix time

    @classmethod
    def from_scope(cls, scope: dict[str, Any]) -> RequestMeta:
        """The meta of an ASGI request: the client's address and its ``X-Request-Id`` (printable
        ASCII, at most 128 characters; anything else is replaced by a new id)."""
        client = scope.get("client")
        given = next((v for k, v in scope.get("headers", []) if k.decode("latin-1").lower() == REQUEST_ID_HEADER), b"")
        text = given.decode("latin-1").strip()
        usable = 0 < len(text) <= 128 and text.isascii() and text.isprintable()
        return cls(request_id=text if usable else uuid.uuid4().hex, client=client[0] if client else None)


@dataclass(frozen=True)
class ServedModel:
    """A model that answered: its bundle id and the sha256 of its weights."""

    id: str
    weights_sha256: str


@dataclass(frozen=True)
class ImageEvent:
    """One uploaded image: its answer, or why it was refused."""

    index: int
    filename: str
    sha256: str | None  # of the uploaded bytes (None: they were not read, e.g. a file over the size limit)
    status: int  # 200 answered, else the refusal's HTTP status
    kind: str = ""  # why refused, one word (``too_large``, ``unsupported``, ``corrupt``, ``out_of_distribution`` …)
    error: str = ""
    top: tuple[tuple[str, float], ...] = ()  # (label, probability), most probable first
    prediction_set: tuple[str, ...] | None = None
    alpha: float | None = None
    ood_score: float | None = None
    in_distribution: bool | None = None

    @property
    def predicted(self) -> str | None:
        return self.top[0][0] if self.top else None


@dataclass(frozen=True)
class RequestEvent:
    """One request through the pipeline: route, models, timings and one :class:`ImageEvent` per image."""

    meta: RequestMeta
    route: str  # ``skin``, ``pathology_ensemble``, ``skin/explain`` …
    status: int  # the HTTP status answered
    images: tuple[ImageEvent, ...] = ()
    models: tuple[ServedModel, ...] = ()
    error: str = ""  # a request refused as a whole: why
    decode_s: float | None = None  # the decode step (headers and pixels) of the request's images
    infer_s: float | None = None  # the model call, batching wait included
    batch: int = 0  # images the request sent to the model(s)


def split_route(route: str) -> tuple[str, str]:
    """A route's task and endpoint: ``breast`` → (``breast``, ``classify``), ``breast/explain`` →
    (``breast``, ``explain``), ``v2/models/breast/infer`` → (``breast``, ``v2``)."""
    parts = route.split("/")
    if parts[0] == "v2" and len(parts) >= 3:
        return parts[2], "v2"
    if len(parts) == 2 and parts[1] == "explain":
        return parts[0], "explain"
    return parts[0], "classify" if len(parts) == 1 else "other"


def image_event(up: Any, result: BaseModel | None) -> ImageEvent:
    """The event of one upload (:class:`serving.uploads.Upload`) from its result in the answer."""
    top = tuple((c.label, float(c.prob)) for c in (getattr(result, "top", None) or ()))
    plausible = getattr(result, "prediction_set", None)
    answered = up.status == 200 and result is not None
    return ImageEvent(
        index=up.index, filename=up.filename, sha256=up.sha256, status=up.status, error=up.error,
        kind="" if up.status == 200 else (up.kind or REFUSAL_KINDS.get(up.status, "refused")),
        top=top if answered else (), prediction_set=tuple(plausible) if answered and plausible is not None else None,
        alpha=getattr(result, "alpha", None) if answered else None,
        ood_score=getattr(result, "ood_score", None) if answered else None,
        in_distribution=getattr(result, "in_distribution", None) if answered else None)


def with_request_id(send: Any, request_id: str) -> Any:
    """An ASGI ``send`` that adds ``X-Request-Id`` to the response's headers (what the audit trail
    files the request under)."""

    async def sending(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            headers = [h for h in message.get("headers", []) if h[0].lower() != REQUEST_ID_HEADER.encode()]
            message = {**message, "headers": [*headers, (REQUEST_ID_HEADER.encode(), request_id.encode("latin-1"))]}
        await send(message)

    return sending


class Observer(Protocol):
    """Watches the service: called once per request, on the API worker's event loop (keep it short;
    hand slow work to a thread)."""

    def observe(self, event: RequestEvent) -> None: ...


_OBSERVERS: list[Observer] = []


def subscribe(observer: Observer) -> None:
    """Send every following event of this process to ``observer``."""
    _OBSERVERS.append(observer)


def unsubscribe_all() -> None:
    """Forget every observer (tests that build several pipelines in one process)."""
    _OBSERVERS.clear()


def publish(event: RequestEvent) -> None:
    """Give ``event`` to every observer; one that raises is logged, the request is not affected."""
    for observer in list(_OBSERVERS):
        try:
            observer.observe(event)
        except Exception:  # an observer's bug must not fail or slow the answer; it is logged with its traceback
            log.exception("observer %s failed on a %s event", type(observer).__name__, event.route)
