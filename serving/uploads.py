"""Reading uploads before BentoML does: byte limits, a body timeout, multipart or a raw image body.

BentoML 1.4 (checked in 1.4.39) parses a typed endpoint's multipart body itself
(``_bentoml_impl.serde.MultipartSerde``): a text value in a file field is taken for a URL and
downloaded by the server, the form is read without any size limit, and a malformed form or a
failed download ends in a 500 (``api_endpoint_wrapper`` turns every exception that is not a
``BentoMLException`` or a pydantic ``ValidationError`` into one). :class:`UploadGuard`, an ASGI
middleware added with ``Service.add_asgi_middleware``, therefore reads the body of the prediction
routes first:

* ``Content-Length`` above ``max_request_bytes`` → 413 before a byte is read; a body that grows
  past it while streaming → 413;
* no body data for ``body_timeout_s`` → 408 (a stalled upload is the client's fault, not a 504);
* multipart (starlette's parser, with limits on files, fields and text-part size): every part
  with a filename is an image, whatever its field name; the text fields taken are the options
  ``top_k``, ``target``, ``alpha``, ``preview`` and ``output`` (each also a query parameter; ``output``
  also from ``Accept: application/dicom``, :func:`parse_accept`); a text value
  where a file is expected is refused, never fetched; malformed → 400, an ``alpha`` that is not a
  level (a number strictly between 0 and 1) → 422;
* ``image/*``, ``application/dicom`` or ``application/octet-stream``: the body is one image;
* anything else → 415.

The Open Inference Protocol's infer routes (``body_routes``, :mod:`serving.v2`) get their whole body
read with the same byte limits and body timeout (any content type; the route parses it).

The result (:class:`ParsedRequest`) goes to the endpoint through the ASGI scope
(``scope["state"][STATE_KEY]``); :class:`serving.schemas.ImagesInput` picks it up there. It also
lets ``GET /models`` and ``GET /stats`` through to their (POST) typed endpoints.
"""

from __future__ import annotations

import re
from collections.abc import AsyncGenerator, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import numpy as np
from python_multipart.multipart import parse_options_header
from starlette.datastructures import Headers, UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serving.config import Limits
from serving.events import RequestEvent, RequestMeta, publish, with_request_id
from zoo.io import display_name
from zoo.postprocess import check_alpha
from zoo.preprocess import ImageHeader

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

STATE_KEY = "medzoo.request"
# target: the class an explanation explains (/<task>/explain); alpha: the prediction sets' level 1 − alpha;
# preview: answer each image's decoded input as a small PNG (what the model saw, e.g. of a DICOM file)
# output: json (default) or dicom-sr (a DICOM Structured Report per DICOM image: serving.sr)
OPTION_FIELDS = ("top_k", "target", "alpha", "preview", "output")
OUTPUTS = ("json", "dicom-sr")
RAW_TYPES = ("application/octet-stream", "application/dicom")
MAX_FIELDS = 10  # text fields in a form: the options, with room for a client's repeats, and no more
TEXT_PART_BYTES = 64 * 1024  # a text form field (top_k) is short; a longer one is a file sent as text


class Problem(Exception):
    """A request refused as a whole: HTTP status and a message for the user."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}  # e.g. Retry-After with a 503


@dataclass
class Upload:
    """One uploaded image on its way through a request: bytes → header → array, or why it was refused
    (``status`` ≠ 200, ``error``; its bytes and array then dropped)."""

    index: int
    filename: str
    data: bytes | None = None
    status: int = 200
    error: str = ""
    header: ImageHeader | None = None  # read before decoding (serving.frontend)
    array: np.ndarray | None = None  # uint8 (C, H, W) once decoded
    sha256: str | None = None  # of ``data``, taken with the header (serving.decoding), kept after the bytes go
    kind: str = ""  # why refused, one word (serving.events.REFUSAL_KINDS by status unless the refusal names one)
    meta: RequestMeta = field(default_factory=RequestMeta)  # the request it came in (serving.events)
    dicom: Dataset | None = None  # with output=dicom-sr: its DICOM header, no pixel data (serving.decoding)

    def refuse(self, status: int, error: str, kind: str = "") -> None:
        self.status, self.error, self.data, self.array = status, error, None, None
        self.kind = kind


@dataclass
class ParsedRequest:
    uploads: list[Upload] = field(default_factory=list)
    top_k: int | None = None
    target: str | None = None
    alpha: float | None = None
    preview: bool = False
    output: str | None = None  # None: not asked (JSON)
    body: bytes = b""  # a body route's whole body (serving.v2 parses it)
    meta: RequestMeta = field(default_factory=RequestMeta)


def megabytes(n: float) -> str:
    return f"{n / 2**20:.3g} MB"


def too_large_request(limits: Limits) -> Problem:
    return Problem(413, f"request larger than the {megabytes(limits.max_request_bytes)} limit")


def parse_alpha(raw: str | None) -> float | None:
    """``alpha`` (the prediction sets are at level 1 − alpha) from a form field or the query string;
    422 unless it is a number strictly between 0 and 1 (:func:`zoo.postprocess.check_alpha`)."""
    if raw is None or raw.strip() in ("", "null"):
        return None
    try:
        return check_alpha(raw.strip().strip('"')[:40])  # NaN and inf fail its range check
    except ValueError as e:
        raise Problem(422, str(e)) from None


def parse_flag(name: str, raw: str | None) -> bool:
    """A yes/no option (``preview``): true / false, 1 / 0, yes / no, on / off (JSON-encoded or not)."""
    text = (raw or "").strip().strip('"').lower()
    if text in ("", "null", "false", "0", "no", "off"):
        return False
    if text in ("true", "1", "yes", "on"):
        return True
    raise Problem(400, f"{name} must be true or false, not {(raw or '')[:40]!r}")


def parse_top_k(raw: str | None) -> int | None:
    """``top_k`` from a form field (BentoML's clients send it JSON-encoded) or the query string."""
    if raw is None or raw.strip() in ("", "null"):
        return None
    digits = raw.strip().strip('"')
    # ASCII digits only: int() also takes "٣", "+3" and "1_0"
    if not (digits.isascii() and digits.isdigit()) or int(digits) < 1:
        raise Problem(400, f"top_k must be a positive integer, not {raw!r}")
    return int(digits)


async def body_stream(receive: Receive, limits: Limits) -> AsyncGenerator[bytes, None]:
    """The request body chunk by chunk: 413 past ``max_request_bytes``, 408 when the client
    sends nothing for ``body_timeout_s``, 400 when it goes away."""
    seen = 0
    while True:
        with anyio.move_on_after(limits.body_timeout_s) as scope:
            message = await receive()
        if scope.cancelled_caught:
            raise Problem(408, f"the upload stalled: no data for {limits.body_timeout_s:g} s")
        if message["type"] == "http.disconnect":
            raise Problem(400, "the client disconnected before the upload was complete")
        chunk = message.get("body", b"")
        seen += len(chunk)
        if seen > limits.max_request_bytes:
            raise too_large_request(limits)
        if chunk:
            yield chunk
        if not message.get("more_body", False):
            return


def upload_filename(value: UploadFile) -> str | None:
    """An uploaded file's name by the one rule of :func:`zoo.io.display_name` (UTF-8, other bytes
    as ``\\xNN``), read from the part's raw header: starlette falls back to latin-1 for a name that
    is not UTF-8, and that text cannot be told apart from a UTF-8 name."""
    disposition = next((v for k, v in value.headers.raw if k == b"content-disposition"), None)
    raw = parse_options_header(disposition)[1].get(b"filename") if disposition else None
    return display_name(raw) if raw is not None else value.filename


def _file_upload(index: int, name: str, value: UploadFile, limits: Limits) -> Upload:
    up = Upload(index, upload_filename(value) or name)
    size = value.size or 0
    if size > limits.max_file_bytes:
        up.status = 413
        up.error = f"file of {megabytes(size)} is larger than the {megabytes(limits.max_file_bytes)} limit"
    else:
        value.file.seek(0)
        up.data = value.file.read()
    return up


def _text_upload(index: int, name: str, value: str) -> Upload:
    shown = value[:60] + ("…" if len(value) > 60 else "")
    return Upload(index, name, status=400, error=(
        f"field {name!r} holds text ({shown!r}), not a file: upload the image itself (this service fetches no URLs)"))


def as_uploads(images: list[Any], max_file_bytes: int) -> list[Upload]:
    """An endpoint's ``images``: what UploadGuard read (over HTTP), or paths / bytes (in-process calls)."""
    out: list[Upload] = []
    for i, img in enumerate(images):
        if isinstance(img, Upload):
            out.append(img)
        elif isinstance(img, (bytes, bytearray, memoryview)):
            out.append(Upload(i, f"image-{i}", data=bytes(img)))
        else:
            path = Path(img)
            size = path.stat().st_size
            if size > max_file_bytes:
                out.append(Upload(i, path.name, status=413, error=(
                    f"file of {megabytes(size)} is larger than the {megabytes(max_file_bytes)} limit")))
            else:
                out.append(Upload(i, path.name, data=path.read_bytes()))
    return out


def collect(items: Iterable[tuple[str, str | UploadFile]], limits: Limits) -> ParsedRequest:
    """Uploads and options from parsed form items (files under any field name)."""
    out = ParsedRequest()
    for name, value in items:
        if isinstance(value, UploadFile):
            out.uploads.append(_file_upload(len(out.uploads), name, value, limits))
        elif name == "top_k":
            out.top_k = parse_top_k(value)
        elif name == "target":
            out.target = parse_target(value)
        elif name == "alpha":
            out.alpha = parse_alpha(value)
        elif name == "preview":
            out.preview = parse_flag(name, value)
        elif name == "output":
            out.output = parse_output(value)
        elif name == "images":
            out.uploads.append(_text_upload(len(out.uploads), name, value))
        else:
            raise Problem(400, f"unexpected form field {name!r}: send image files and optionally top_k, alpha, "
                               "preview, output (and target)")
    return out


def _multipart_problem(e: MultiPartException, limits: Limits) -> Problem:
    msg = e.message
    if msg.startswith("Too many files"):
        return Problem(413, f"more than {limits.max_images} images in one request")
    if msg.startswith("Part exceeded"):
        return Problem(400, f"a text form field is longer than {TEXT_PART_BYTES // 1024} KB: send images as files "
                            "(curl -F images=@file.png)")
    return Problem(400, f"malformed multipart body: {msg}")


async def read_multipart(headers: Headers, receive: Receive, limits: Limits) -> ParsedRequest:
    parser = MultiPartParser(headers, body_stream(receive, limits), max_files=limits.max_images,
                             max_fields=MAX_FIELDS, max_part_size=TEXT_PART_BYTES)
    try:
        form = await parser.parse()
    except MultiPartException as e:
        raise _multipart_problem(e, limits) from None
    except (KeyError, ValueError, UnicodeDecodeError) as e:  # python-multipart on odd headers
        raise Problem(400, f"malformed multipart body: {type(e).__name__} {e}") from None
    try:
        return collect(form.multi_items(), limits)
    finally:
        await form.close()


async def read_raw(receive: Receive, limits: Limits) -> ParsedRequest:
    data = b"".join([chunk async for chunk in body_stream(receive, limits)])
    if len(data) > limits.max_file_bytes:
        return ParsedRequest([Upload(0, "body", status=413, error=(
            f"file of {megabytes(len(data))} is larger than the {megabytes(limits.max_file_bytes)} limit"))])
    return ParsedRequest([Upload(0, "body", data=data)])


def check_length(headers: Headers, limits: Limits) -> None:
    """413 for a ``Content-Length`` above ``max_request_bytes``, before a byte is read."""
    length = headers.get("content-length")
    if length is not None:
        if not (length.strip().isascii() and length.strip().isdigit()):
            raise Problem(400, "invalid Content-Length header")
        if int(length) > limits.max_request_bytes:
            raise too_large_request(limits)


async def read_body(scope: Scope, receive: Receive, limits: Limits) -> ParsedRequest:
    """A body route's whole body (any content type), read with the same limits as the uploads."""
    check_length(Headers(scope=scope), limits)
    return ParsedRequest(body=b"".join([chunk async for chunk in body_stream(receive, limits)]))


async def read_request(scope: Scope, receive: Receive, limits: Limits) -> ParsedRequest:
    """The uploads and ``top_k`` of one prediction request, or :class:`Problem`."""
    headers = Headers(scope=scope)
    check_length(headers, limits)
    ctype = headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype == "multipart/form-data":
        parsed = await read_multipart(headers, receive, limits)
    elif ctype.startswith("image/") or ctype in RAW_TYPES:
        parsed = await read_raw(receive, limits)
    else:
        raise Problem(415, "send multipart/form-data with image files (field 'images'), "
                           "or one raw image body with Content-Type image/* or application/dicom")
    _query_options(scope, parsed)
    if parsed.output is None and parse_accept(headers.get("accept", "")):
        parsed.output = "dicom-sr"
    if not parsed.uploads:
        raise Problem(400, "no image in the request: attach one or more files (multipart field 'images')")
    return parsed


def _query(scope: Scope, name: str) -> str | None:
    from urllib.parse import parse_qs

    values = parse_qs(scope.get("query_string", b"").decode("latin-1")).get(name)
    return values[-1] if values else None


def _query_options(scope: Scope, parsed: ParsedRequest) -> None:
    """The options given as query parameters, where the form did not give them."""
    raw_k, raw_target, raw_alpha, raw_preview, raw_output = (_query(scope, name) for name in OPTION_FIELDS)
    if parsed.top_k is None and raw_k is not None:
        parsed.top_k = parse_top_k(raw_k)
    if parsed.target is None and raw_target:
        parsed.target = parse_target(raw_target)
    if parsed.alpha is None and raw_alpha is not None:
        parsed.alpha = parse_alpha(raw_alpha)
    if not parsed.preview and raw_preview is not None:
        parsed.preview = parse_flag("preview", raw_preview)
    if parsed.output is None and raw_output is not None:
        parsed.output = parse_output(raw_output)


def parse_output(raw: str | None) -> str | None:
    """``output``: ``json`` or ``dicom-sr`` (400 for anything else)."""
    text = (raw or "").strip().strip('"').lower()
    if text in ("", "null"):
        return None
    if text not in OUTPUTS:
        raise Problem(400, f"output must be one of {', '.join(OUTPUTS)}, not {(raw or '')[:40]!r}")
    return text


def parse_accept(accept: str) -> bool:
    """Whether an ``Accept`` header prefers DICOM (``application/dicom``, or DICOMweb's ``multipart/related;
    type="application/dicom"``) to JSON and anything else (highest q, first listed on a tie)."""
    best, best_q = False, 0.0
    for part in accept.split(","):
        media, params = parse_options_header(part.strip())
        try:
            weight = float(params.get(b"q", b"1"))
        except ValueError:
            weight = 0.0
        dicom = media == b"application/dicom" or (
            media == b"multipart/related" and params.get(b"type", b"").strip(b'"').lower() == b"application/dicom")
        if weight > best_q:
            best, best_q = dicom, weight
    return best


def parse_target(raw: str) -> str | None:
    """``target`` as sent: plain text, or JSON-encoded by BentoML's clients (``"benign"``, ``3``)."""
    import json

    try:
        value = json.loads(raw)
    except ValueError:
        value = raw
    return None if value is None or value == "" else str(value)


def _replay_empty(receive: Receive) -> Receive:
    """The body is consumed: the app gets an empty one, then the client's later messages (disconnect)."""
    sent = False

    async def inner() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": b"", "more_body": False}
        return await receive()

    return inner


class UploadGuard:
    """ASGI middleware: reads the prediction routes' uploads with the limits (module docstring)."""

    def __init__(self, app: ASGIApp, upload_routes: Iterable[str], get_routes: Iterable[str], limits: Limits,
                 body_routes: str | None = None) -> None:
        self.app = app
        self.upload_routes = frozenset(upload_routes)
        self.get_routes = frozenset(get_routes)
        self.limits = limits
        # POST routes whose whole body is read with the limits and parsed by the route (serving.v2)
        self.body_routes = re.compile(body_routes) if body_routes else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path, method = scope["path"], scope["method"]
        if path in self.get_routes:
            # Typed endpoints without input: BentoML parses a multipart body anyway (and fails with a
            # 500) and ignores other bodies; only no body or a JSON object (BentoML's clients) goes on.
            headers = Headers(scope=scope)
            has_body = headers.get("content-length", "0").strip() != "0" or "transfer-encoding" in headers
            json_body = headers.get("content-type", "").split(";")[0].strip().lower() == "application/json"
            if method not in ("GET", "POST"):
                status, message, extra = 405, f"{path} answers GET and POST, not {method}", {"allow": "GET, POST"}
            elif has_body and not json_body:
                status, message, extra = 400, f"{path} takes no request body (or a JSON object)", {}
            else:
                await self.app({**scope, "method": "POST"}, receive, send)  # a typed endpoint is a POST
                return
            await JSONResponse({"error": message}, status_code=status, headers={"connection": "close", **extra})(
                scope, receive, send)
            return
        whole_body = method == "POST" and self.body_routes is not None and self.body_routes.fullmatch(path) is not None
        if method != "POST" or (path not in self.upload_routes and not whole_body):
            await self.app(scope, receive, send)
            return
        meta = RequestMeta.from_scope(scope)
        send = with_request_id(send, meta.request_id)
        try:
            parsed = await (read_body if whole_body else read_request)(scope, receive, self.limits)
        except Problem as p:
            publish(RequestEvent(meta=meta, route=path.strip("/"), status=p.status, error=p.message))
            # The body may be unread: the connection is closed after the answer.
            body = {"error": p.message, "task": path.strip("/")}
            await JSONResponse(body, status_code=p.status, headers={"connection": "close"})(scope, receive, send)
            return
        parsed.meta = meta
        for up in parsed.uploads:
            up.meta = meta
        scope.setdefault("state", {})[STATE_KEY] = parsed
        await self.app(scope, _replay_empty(receive), send)
