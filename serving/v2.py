"""The Open Inference Protocol v2 (KServe / Triton HTTP/REST) on the medzoo server, beside its own routes.

Routes (a Starlette app mounted on ``MedZoo`` by ``mount_asgi_app``; BentoML's ``PassiveMount`` hands
it only the paths its routes match, so the typed API and ``/ui`` are untouched)::

    GET  /v2                                     server metadata
    GET  /v2/health/live, /v2/health/ready       200 = true, 400 = false, empty body (the protocol)
    GET  /v2/models/{model}[/versions/{v}]       model metadata: inputs, outputs, labels, preprocessing
    GET  /v2/models/{model}[/versions/{v}]/ready
    POST /v2/models/{model}[/versions/{v}]/infer

A model is a configured task (its name, e.g. ``skin``) or ``pathology_ensemble``; a task's version
is its bundle id. An infer request sends exactly one input:

* ``images``: ``UINT8 [N, C, H, W]`` at the model's image size (the model's preprocessing is inside
  it, so these are the pixels as stored), checked against the model's preprocessing;
* ``image_files``: ``BYTES [N]``: encoded files (PNG, JPEG, TIFF, BMP, DICOM), decoded by the one
  preprocessing (:mod:`serving.decoding`); as JSON ``data``, each element base64-encoded.

Outputs (all unless the request names some): ``probabilities`` FP32 [N, K] (calibrated: exactly
what ``POST /<task>`` answers), ``logits`` FP32 [N, K'] (the model's raw outputs; the ensemble's are
the mean of its members' calibrated logits, as ``POST /pathology_ensemble`` answers), and, where the
card carries them, ``ood_score`` FP32 [N], ``in_distribution`` BOOL [N] and ``prediction_set``
BOOL [N, K] (class k is in image n's set; the level 1 − ``alpha`` in the answer's parameters; the
request parameter ``alpha`` sets it as ``?alpha=`` does).

Triton's binary tensor data extension (``tritonclient`` uses it by default) on input and output:
``Inference-Header-Content-Length`` gives the JSON header's length, ``binary_data_size`` each
binary input's bytes after it, ``binary_data`` / ``binary_data_output`` ask for binary outputs.

One pipeline: :class:`serving.uploads.UploadGuard` reads the body with the upload routes' byte limits
and body timeout (413 / 408 / 400); the uploads run through :meth:`serving.frontend.Frontend.run`
with a :class:`V2TaskRoute` or :class:`V2EnsembleRoute` (decode with its limits and admission,
coalesced batching, calibration, OOD, prediction sets, ``refuse_ood``, the observers). An answer is a
batch of tensors, so a request with a refused image fails as a whole with that image's status (no
per-image results as ``POST /<task>`` gives). Errors answer ``{"error": "..."}`` with a 4xx status
(503 while a model is missing or the server busy, as the other routes).

gRPC is not offered: BentoML serves gRPC only for the legacy ``bentoml.Service`` API, not for
``@bentoml.service`` classes (``serve-grpc`` refuses them: bentoml/BentoML#4634, #5607), so it would
be a second server (grpcio and the KServe protobuf stubs) in the API worker, outside BentoML's
process management, request timeout and upload limits.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import dataclasses
import hashlib
import struct
from collections.abc import Awaitable, Callable
from typing import Annotated, Any

import numpy as np
from pydantic import BaseModel, Field, ValidationError
from starlette.applications import Starlette
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route as HttpRoute

from serving.config import ENSEMBLE_ROUTE, Limits
from serving.events import RequestEvent, RequestMeta, publish
from serving.frontend import Answered, EnsembleRoute, Frontend, Route, TaskRoute, checked_alpha
from serving.outputs import read_record
from serving.schemas import ErrorAnswer, ServedEnsembleInfo, ServedModelInfo
from serving.uploads import STATE_KEY, ParsedRequest, Problem, Upload, megabytes
from zoo._version import __version__
from zoo.errors import describe_validation_error, unknown
from zoo.postprocess import Predictions, interpret
from zoo.preprocess import Preprocessing
from zoo.preprocess.image import FORMATS_TEXT

# What UploadGuard reads with the limits before the route sees it (serving.service passes it on).
INFER_PATH = r"/v2/models/[^/]+(?:/versions/[^/]+)?/infer"
HEADER_LENGTH = "inference-header-content-length"
# The JSON part of an infer request: its numbers become a Python list before the checks (pixels 0-255
# share cached ints; other numbers take ~36 bytes each), so large tensors go as binary data. 8 MiB holds
# 12 RGB 224 px images as JSON numbers: 0.44 s and 29 MB peak to parse, measured on a busy 2-core EPYC.
JSON_HEADER_BYTES = 8 << 20
IMAGES, FILES = "images", "image_files"
# Output name → the protocol's datatype, in the order an answer lists them.
OUTPUT_TYPES = {"probabilities": "FP32", "logits": "FP32", "ood_score": "FP32", "in_distribution": "BOOL",
                "prediction_set": "BOOL"}
EXTENSIONS = ["binary_tensor_data", "parameters"]
PLATFORM = "onnxruntime_onnx"  # Triton's name for what runs the models
Info = ServedModelInfo | ServedEnsembleInfo


# --------------------------------------------------------------------------- the protocol's JSON objects


class TensorMetadata(BaseModel):
    name: str
    datatype: str
    shape: list[int]


class ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str]


class ModelMetadata(BaseModel):
    name: str
    versions: list[str] | None = None
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]
    parameters: dict[str, Any] = Field(description="labels, preprocessing, model identity (a medzoo extension)")


class RequestInput(BaseModel):
    name: str
    shape: list[Annotated[int, Field(ge=0)]]
    datatype: str
    parameters: dict[str, Any] = {}
    data: list[Any] | None = None


class RequestOutput(BaseModel):
    name: str
    parameters: dict[str, Any] = {}


class InferRequest(BaseModel):
    id: str | None = None
    parameters: dict[str, Any] = {}
    inputs: list[RequestInput] = Field(min_length=1)
    outputs: list[RequestOutput] | None = None


class ResponseOutput(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    parameters: dict[str, Any] | None = None
    data: list[Any] | None = None


class InferResponse(BaseModel):
    model_name: str
    model_version: str | None = None
    id: str | None = None
    parameters: dict[str, Any] | None = None
    outputs: list[ResponseOutput]


class InferAnswer(BaseModel):
    """An infer request's answer as it goes on the wire: the JSON header, then the binary outputs."""

    response: InferResponse
    blobs: list[bytes] = []


# --------------------------------------------------------------------------- models: lookup and metadata


def versions(info: Info) -> list[str] | None:
    """A task's one version is its bundle id; the ensemble has none."""
    return [info.id] if isinstance(info, ServedModelInfo) and info.id else None


def available_outputs(info: Info) -> list[str]:
    """The outputs a model answers: what :func:`zoo.postprocess.interpret` / :func:`zoo.ensemble.combine`
    fill from its card (an OOD detector in the model and its threshold; conformal scores)."""
    if isinstance(info, ServedEnsembleInfo):
        ood = info.has_ood and all(m.model_info is not None and m.model_info.ood is not None for m in info.members)
        sets = info.conformal is not None
    else:
        card = info.model_info
        ood = bool(info.has_ood) and card is not None and card.ood is not None
        sets = card is not None and card.conformal is not None
    return [name for name in OUTPUT_TYPES
            if name in ("probabilities", "logits") or (ood and name in ("ood_score", "in_distribution"))
            or (sets and name == "prediction_set")]


async def lookup(fe: Frontend, model: str, version: str | None) -> Info:
    """The served model of that name (and version): 404 for one this server does not have."""
    table = await fe.table()
    info: Info | None = table.ensemble if model == ENSEMBLE_ROUTE else table.tasks.get(model)
    if info is None:
        names = [*table.tasks, ENSEMBLE_ROUTE]
        raise Problem(404, str(unknown("model", model, names, hint="models: " + ", ".join(names))))
    if version is not None and version not in (versions(info) or []):
        served = ", ".join(versions(info) or []) or "no versioned model"
        raise Problem(404, f"model {model!r} has no version {version!r} (it serves {served})")
    return info


def ready_info(info: Info) -> Info:
    """``info`` when its model can answer; else 503 with what to do (as ``POST /<task>`` answers)."""
    if info.status != "ok" or info.preprocessing is None or info.labels is None:
        raise Problem(503, info.message or f"{info.task} has no model")
    return info


def model_metadata(model: str, info: Info) -> ModelMetadata:
    prep, labels = info.preprocessing, info.labels
    assert prep is not None and labels is not None  # ready_info checked them
    k = len(labels)
    width = -1  # the ensemble's: K, or 1 when every member keeps a single logit
    if isinstance(info, ServedModelInfo):
        width = info.num_outputs or k
    shapes = {"probabilities": [-1, k], "logits": [-1, width], "ood_score": [-1], "in_distribution": [-1],
              "prediction_set": [-1, k]}
    params: dict[str, Any] = {"labels": labels, "preprocessing": dataclasses.asdict(prep), "formats": FORMATS_TEXT,
                              "inputs": f"exactly one: {IMAGES} (uint8 at the model's image size) or {FILES}"}
    if isinstance(info, ServedModelInfo):
        card = info.model_info
        params.update(bundle_id=info.id, weights_sha256=info.weights_sha256, arch=info.arch,
                      calibrated=card is not None and card.calibration is not None)
        conformal = card.conformal if card is not None else None
    else:
        params.update(arch=info.arch, members=[m.id for m in info.members])
        conformal = info.conformal
    if conformal is not None:
        params["alpha"] = conformal.alpha
    return ModelMetadata(
        name=model, versions=versions(info), platform=PLATFORM,
        inputs=[TensorMetadata(name=IMAGES, datatype="UINT8",
                               shape=[-1, prep.in_channels, prep.image_size, prep.image_size]),
                TensorMetadata(name=FILES, datatype="BYTES", shape=[-1])],
        outputs=[TensorMetadata(name=n, datatype=OUTPUT_TYPES[n], shape=shapes[n]) for n in available_outputs(info)],
        parameters=params)


# --------------------------------------------------------------------------- reading an infer request


def split_body(body: bytes, header_length: str | None) -> tuple[InferRequest, bytes]:
    """The JSON request and the binary tensor data after it; 400 for a malformed one."""
    n = len(body)
    if header_length is not None:
        text = header_length.strip()
        if not (text.isascii() and text.isdigit()) or int(text) > len(body):
            raise Problem(400, f"Inference-Header-Content-Length {header_length[:40]!r} is not a length within the "
                               f"{len(body)}-byte body")
        n = int(text)
    if n > JSON_HEADER_BYTES:
        raise Problem(413, f"the JSON part of the request is larger than {megabytes(JSON_HEADER_BYTES)}: send large "
                           "tensors as binary data (binary tensor data extension, tritonclient's default)")
    try:
        return InferRequest.model_validate_json(body[:n]), body[n:]
    except ValidationError as e:
        lines = describe_validation_error(e, InferRequest).splitlines()
        raise Problem(400, "malformed inference request: " + "; ".join(lines)) from None


def binary_parts(inputs: list[RequestInput], rest: bytes) -> list[bytes | None]:
    """Each input's binary data (None: given as JSON ``data``), in input order."""
    parts: list[bytes | None] = []
    offset = 0
    for inp in inputs:
        size = inp.parameters.get("binary_data_size")
        if size is None:
            if inp.data is None:
                raise Problem(400, f"input {inp.name!r} has neither data nor parameters.binary_data_size")
            parts.append(None)
            continue
        if isinstance(size, bool) or not isinstance(size, int) or size < 0 or offset + size > len(rest):
            raise Problem(400, f"input {inp.name!r}: binary_data_size {size!r} does not fit the {len(rest)} bytes "
                               "after the JSON header")
        parts.append(rest[offset:offset + size])
        offset += size
    if offset != len(rest):
        raise Problem(400, f"{len(rest) - offset} bytes after the JSON header belong to no input "
                           "(binary_data_size, Inference-Header-Content-Length)")
    return parts


def _count(n: int, limits: Limits) -> None:
    if n < 1:
        raise Problem(400, "no image in the request: the input's first dimension is 0")
    if n > limits.max_images:
        raise Problem(413, f"more than {limits.max_images} images in one request")


def tensor_uploads(inp: RequestInput, raw: bytes | None, prep: Preprocessing, limits: Limits,
                   meta: RequestMeta) -> list[Upload]:
    """``images``: uint8 (N, C, H, W) at the model's image size, each image an upload already decoded."""
    expected = [prep.in_channels, prep.image_size, prep.image_size]
    if inp.datatype != "UINT8":
        raise Problem(400, f"input {IMAGES!r} takes UINT8 pixels as stored (the model's preprocessing is inside "
                           f"it), not {inp.datatype}; send encoded files in {FILES!r}")
    if len(inp.shape) != 4 or inp.shape[1:] != expected:
        dims = ", ".join(map(str, expected))
        raise Problem(400, f"input {IMAGES!r} has shape {inp.shape}; this model takes [N, {dims}] (uint8 N x C x H x W "
                           "at its image size)")
    _count(inp.shape[0], limits)
    size = int(np.prod(inp.shape))
    if raw is not None:
        if len(raw) != size:
            raise Problem(400, f"input {IMAGES!r}: {len(raw)} bytes of binary data for shape {inp.shape} "
                               f"({size} bytes)")
        arr = np.frombuffer(raw, dtype=np.uint8).reshape(inp.shape)
    else:
        arr = _json_uint8(inp.data, inp.shape, size)
    return [Upload(i, f"{IMAGES}[{i}]", array=arr[i], sha256=hashlib.sha256(arr[i].tobytes()).hexdigest(), meta=meta)
            for i in range(len(arr))]


def _json_uint8(data: Any, shape: list[int], size: int) -> np.ndarray:
    try:
        arr = np.asarray(data)
    except (ValueError, OverflowError):  # ragged nesting
        arr = np.asarray([], dtype=object)
    if arr.dtype.kind not in "iu" or arr.size != size or (size and (arr.min() < 0 or arr.max() > 255)):
        raise Problem(400, f"input {IMAGES!r}: data must hold {size} integers from 0 to 255 for shape {shape} "
                           "(row-major, flat or nested)")
    return arr.astype(np.uint8).reshape(shape)


def _bytes_elements(raw: bytes) -> list[bytes]:
    """A BYTES tensor's binary form: each element a 4-byte little-endian length, then its bytes."""
    items, offset = [], 0
    while offset < len(raw):
        if offset + 4 > len(raw):
            raise Problem(400, f"input {FILES!r}: binary data ends inside an element's length")
        (n,) = struct.unpack_from("<I", raw, offset)
        offset += 4
        if offset + n > len(raw):
            raise Problem(400, f"input {FILES!r}: element {len(items)} of {n} bytes runs past the binary data")
        items.append(raw[offset:offset + n])
        offset += n
    return items


def _base64_elements(data: list[Any]) -> list[bytes]:
    flat = [x for row in data for x in (row if isinstance(row, list) else [row])]
    try:
        if not all(isinstance(x, str) for x in flat):
            raise ValueError
        return [base64.b64decode(x, validate=True) for x in flat]
    except (ValueError, binascii.Error):
        raise Problem(400, f"input {FILES!r}: as JSON, each element is an image file encoded in base64 "
                           "(or send it as binary data)") from None


def file_uploads(inp: RequestInput, raw: bytes | None, limits: Limits, meta: RequestMeta) -> list[Upload]:
    """``image_files``: one encoded image file per element, decoded by the pipeline."""
    if inp.datatype != "BYTES":
        raise Problem(400, f"input {FILES!r} takes BYTES (encoded {FORMATS_TEXT} files), not {inp.datatype}")
    if not (len(inp.shape) == 1 or (len(inp.shape) == 2 and inp.shape[1] == 1)):
        raise Problem(400, f"input {FILES!r} has shape {inp.shape}; it takes [N] (or [N, 1]) files")
    _count(inp.shape[0], limits)
    items = _bytes_elements(raw) if raw is not None else _base64_elements(inp.data or [])
    if len(items) != inp.shape[0]:
        raise Problem(400, f"input {FILES!r} has shape {inp.shape} but holds {len(items)} files")
    uploads = []
    for i, data in enumerate(items):
        up = Upload(i, f"{FILES}[{i}]", meta=meta)
        if len(data) > limits.max_file_bytes:  # as a multipart file over the limit (serving.uploads)
            up.status, up.error = 413, (f"file of {megabytes(len(data))} is larger than the "
                                        f"{megabytes(limits.max_file_bytes)} limit")
        else:
            up.data = data
        uploads.append(up)
    return uploads


def read_uploads(req: InferRequest, rest: bytes, prep: Preprocessing, limits: Limits,
                 meta: RequestMeta) -> list[Upload]:
    """The request's one input as uploads for the pipeline."""
    parts = binary_parts(req.inputs, rest)
    if len(req.inputs) != 1 or req.inputs[0].name not in (IMAGES, FILES):
        names = [i.name for i in req.inputs]
        raise Problem(400, f"send exactly one input, {IMAGES!r} (UINT8 [N, C, H, W]) or {FILES!r} (BYTES [N]), "
                           f"not {names}")
    inp = req.inputs[0]
    if inp.name == IMAGES:
        return tensor_uploads(inp, parts[0], prep, limits, meta)
    return file_uploads(inp, parts[0], limits, meta)


def _flag(value: Any, name: str) -> bool:
    if not isinstance(value, bool):
        raise Problem(400, f"parameter {name!r} must be true or false, not {value!r}")
    return value


def wanted_outputs(req: InferRequest, available: list[str]) -> list[tuple[str, bool]]:
    """The outputs to answer and whether each goes as binary data (``binary_data`` per output,
    ``binary_data_output`` for the request, else JSON)."""
    default = _flag(req.parameters.get("binary_data_output", False), "binary_data_output")
    if req.outputs is None:
        return [(name, default) for name in available]
    wanted = []
    for out in req.outputs:
        if out.name not in available:
            raise Problem(400, str(unknown("output", out.name, available, hint="outputs: " + ", ".join(available))))
        for key in ("classification", "shared_memory_region"):
            if key in out.parameters:
                raise Problem(400, f"output {out.name!r}: parameter {key!r} is not supported by this server")
        wanted.append((out.name, _flag(out.parameters.get("binary_data", default), "binary_data")))
    return wanted


# --------------------------------------------------------------------------- the routes through Frontend.run


def route_name(model: str) -> str:
    """The route of a v2 infer request in its events and ``/stats`` (as UploadGuard names a refused one)."""
    return f"v2/models/{model}/infer"


def encode(name: str, array: np.ndarray, binary: bool) -> tuple[ResponseOutput, bytes | None]:
    """One output tensor: JSON data, or its binary data (little-endian, row-major; BOOL one byte)."""
    datatype = OUTPUT_TYPES[name]
    arr = np.ascontiguousarray(array, dtype=np.dtype("<f4") if datatype == "FP32" else np.bool_)
    if binary:
        blob = arr.tobytes()
        return ResponseOutput(name=name, shape=list(arr.shape), datatype=datatype,
                              parameters={"binary_data_size": len(blob)}), blob
    return ResponseOutput(name=name, shape=list(arr.shape), datatype=datatype, data=arr.reshape(-1).tolist()), None


class V2Infer(Route):
    """What a v2 infer request changes in its model's route (a mixin before :class:`TaskRoute` or
    :class:`EnsembleRoute`): all of its images or none, and tensors for an answer."""

    model: str
    version: str | None
    request: InferRequest
    wanted: list[tuple[str, bool]]
    uploads: list[Upload]
    out: Predictions | None = None
    logits: np.ndarray | None = None

    def bind(self, model: str, version: str | None, request: InferRequest, wanted: list[tuple[str, bool]],
             uploads: list[Upload]) -> V2Infer:
        self.model, self.version, self.request, self.wanted, self.uploads = model, version, request, wanted, uploads
        self.name = route_name(model)
        return self

    def all_good(self) -> None:
        """A tensor answer has a row per image: one refused image refuses the request, before inference."""
        refused = [up for up in self.uploads if up.status != 200]
        if refused:
            statuses = {up.status for up in refused}
            raise Problem(statuses.pop() if len(statuses) == 1 else 400,
                          "; ".join(f"{up.filename}: {up.error}" for up in refused))

    def flagged(self, out: Any, n: int) -> str | None:
        reason = super().flagged(out, n)
        if reason:  # refuse_ood: the request fails as a whole, as for any refused image
            raise Problem(422, f"{self.uploads[n].filename}: {reason}")
        return None

    def answer(self, results: list[Any], error: str | None) -> BaseModel:
        if error is not None or self.out is None or self.logits is None:
            return ErrorAnswer(error=error or "no image could be used")
        out = self.out
        arrays = {"probabilities": out.probs, "logits": self.logits, "ood_score": out.ood_score,
                  "in_distribution": out.in_distribution, "prediction_set": out.sets}
        outputs, blobs = [], []
        for name, binary in self.wanted:
            array = arrays[name]
            assert array is not None, name  # available_outputs offers only what the card fills
            tensor, blob = encode(name, array, binary)
            outputs.append(tensor)
            if blob is not None:
                blobs.append(blob)
        params: dict[str, Any] = {"calibrated": out.calibrated}
        if out.alpha is not None:
            params["alpha"] = out.alpha
        return InferAnswer(response=InferResponse(model_name=self.model, model_version=self.version,
                                                  id=self.request.id, parameters=params, outputs=outputs), blobs=blobs)


class V2TaskRoute(V2Infer, TaskRoute):
    """``POST /v2/models/<task>/infer``: ``POST /<task>``'s route with tensors for an answer."""

    async def infer(self, batch: np.ndarray) -> Any:
        self.all_good()
        # TaskRoute.infer's steps (the task's coalescer, the one interpret), keeping the logits it drops
        task = self.info.task
        record = await self.fe.call(task, lambda x: self.fe.inference.predict(task, x), batch)
        self.logits, ood = read_record(record)
        self.out = interpret(self.logits, self.info.model_info, ood, self.alpha)
        return self.out


class V2EnsembleRoute(V2Infer, EnsembleRoute):
    """``POST /v2/models/pathology_ensemble/infer``: the ensemble's route with tensors for an answer."""

    async def infer(self, batch: np.ndarray) -> Any:
        self.all_good()
        out = await super().infer(batch)
        self.out, self.logits = out, out.logits
        return out


async def infer_route(fe: Frontend, model: str, version: str | None, parsed: ParsedRequest,
                      headers: Headers) -> tuple[V2Infer, list[Upload]]:
    """The route and uploads of one infer request, or why it cannot run (before any decoding)."""
    if headers.get("content-encoding", "identity").strip().lower() not in ("", "identity"):
        raise Problem(415, "compressed request bodies are not supported: send the body without Content-Encoding")
    info = ready_info(await lookup(fe, model, version))
    prep = info.preprocessing
    assert prep is not None

    def parse() -> tuple[InferRequest, list[Upload]]:
        request, rest = split_body(parsed.body, headers.get(HEADER_LENGTH))
        return request, read_uploads(request, rest, prep, fe.limits, parsed.meta)

    # in a thread: parsing megabytes of JSON numbers would hold up the other requests on the event loop
    request, uploads = await asyncio.to_thread(parse)
    wanted = wanted_outputs(request, available_outputs(info))
    alpha = checked_alpha(request.parameters.get("alpha"), model)
    route: V2Infer
    if isinstance(info, ServedEnsembleInfo):
        route = V2EnsembleRoute(fe, info, fe.top_k, alpha)
    else:
        route = V2TaskRoute(fe, info, fe.top_k, alpha)
    served = versions(info)  # the answer names the version that answered (a task's bundle id)
    return route.bind(model, served[0] if served else None, request, wanted, uploads), uploads


# --------------------------------------------------------------------------- HTTP


def error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def reply(status: int, body: BaseModel) -> Response:
    """An infer answer on the wire: JSON alone, or JSON then the binary outputs (binary data extension)."""
    if not isinstance(body, InferAnswer):
        return error(status, getattr(body, "error", None) or "the request was refused")
    header = body.response.model_dump_json(exclude_none=True).encode()
    if not body.blobs:
        return Response(header, status_code=status, media_type="application/json")
    return Response(header + b"".join(body.blobs), status_code=status, media_type="application/octet-stream",
                    headers={"Inference-Header-Content-Length": str(len(header))})


def v2_app(frontend: Callable[[], Frontend]) -> Starlette:
    """The v2 routes, reaching the service's pipeline through ``frontend()`` (module docstring)."""

    async def answered(work: Awaitable[Response]) -> Response:
        try:
            return await work
        except Problem as p:
            return error(p.status, p.message, p.headers)

    async def server_metadata(request: Request) -> Response:
        return JSONResponse(ServerMetadata(name="medzoo", version=__version__, extensions=EXTENSIONS).model_dump())

    async def live(request: Request) -> Response:
        return Response(status_code=200)

    async def server_ready(request: Request) -> Response:
        """Ready once the inference worker has described its models (as ``/readyz``); a task
        configured without a bundle is not ready itself (its model ready says so)."""
        try:
            await frontend().table()
        except Problem:
            return Response(status_code=400)
        return Response(status_code=200)

    async def model_ready(request: Request) -> Response:
        async def check() -> Response:
            info = await lookup(frontend(), request.path_params["model"], request.path_params.get("version"))
            return Response(status_code=200 if info.status == "ok" else 400)

        return await answered(check())

    async def metadata(request: Request) -> Response:
        async def describe() -> Response:
            model = request.path_params["model"]
            info = ready_info(await lookup(frontend(), model, request.path_params.get("version")))
            return JSONResponse(model_metadata(model, info).model_dump(exclude_none=True))

        return await answered(describe())

    async def infer(request: Request) -> Response:
        return await run_infer(frontend(), request)

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)  # e.g. 405 for a GET of /infer
        return error(exc.status_code, exc.detail, dict(exc.headers or {}))

    model = "/v2/models/{model}"
    versioned = "/v2/models/{model}/versions/{version}"
    routes = [HttpRoute("/v2", server_metadata, methods=["GET"]),
              HttpRoute("/v2/health/live", live, methods=["GET"]),
              HttpRoute("/v2/health/ready", server_ready, methods=["GET"])]
    for prefix in (model, versioned):
        routes += [HttpRoute(prefix, metadata, methods=["GET"]),
                   HttpRoute(f"{prefix}/ready", model_ready, methods=["GET"]),
                   HttpRoute(f"{prefix}/infer", infer, methods=["POST"])]
    return Starlette(routes=routes, exception_handlers={HTTPException: http_error})


async def run_infer(fe: Frontend, request: Request) -> Response:
    """``POST /v2/models/{model}/infer``: the pipeline's status and answer on the wire."""
    parsed = request.scope.get("state", {}).get(STATE_KEY)
    if not isinstance(parsed, ParsedRequest):
        raise RuntimeError(f"{request.url.path}: UploadGuard did not read this request (middleware missing)")
    model, version = request.path_params["model"], request.path_params.get("version")
    try:
        route, uploads = await infer_route(fe, model, version, parsed, request.headers)
    except (Problem, Answered) as e:
        status, message = (e.status, e.message) if isinstance(e, Problem) else (e.status, getattr(e.body, "error", ""))
        publish(RequestEvent(meta=parsed.meta, route=route_name(model), status=status, error=message))
        return error(status, message, e.headers if isinstance(e, Problem) else None)
    try:
        status, body = await fe.run(route, uploads)
    except Problem as p:  # run published it
        return error(p.status, p.message, p.headers)
    except Answered as a:
        return reply(a.status, a.body)
    return reply(status, body)


__all__ = ["FILES", "IMAGES", "INFER_PATH", "InferRequest", "InferResponse", "ModelMetadata", "V2EnsembleRoute",
           "V2TaskRoute", "available_outputs", "model_metadata", "v2_app"]
