"""What the HTTP endpoints take and answer, as pydantic models (the OpenAPI schema at ``/docs.json``
and the ``/schema.json`` that ``bentoml.SyncHTTPClient`` reads are generated from them).

Requests: :class:`ImagesInput` — one or more image files (multipart; the ``images`` field as
BentoML's clients send it, any other file field name too, or one raw image body) and ``top_k``.
Its :meth:`ImagesInput.from_http_request` takes the uploads that :class:`serving.uploads.UploadGuard`
already read, with the limits checked, instead of BentoML's own multipart parsing (see there why).

Answers: :class:`TaskAnswer` (``/<task>``), :class:`EnsembleAnswer` (``/pathology_ensemble``),
:class:`ModelsAnswer` (``/models``), :class:`StatsAnswer` (``/stats``); a refused request answers
:class:`ErrorAnswer` with its 4xx / 503 status. Fields that are None are left out of the JSON
(``calibrated``, ``ood_score`` and ``in_distribution`` appear once the card carries a calibration
or an out-of-distribution detector; ``error`` only on refused images).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import bentoml
from pydantic import BaseModel, ConfigDict, Field

from serving.uploads import STATE_KEY, ParsedRequest
from zoo.preprocess.image import FORMATS_TEXT


def _parsed(request: Any) -> ParsedRequest:
    """What :class:`~serving.uploads.UploadGuard` parsed from this request (in the ASGI scope)."""
    parsed = request.scope.get("state", {}).get(STATE_KEY)
    if not isinstance(parsed, ParsedRequest):
        raise RuntimeError(f"{request.url.path}: UploadGuard did not read this request (middleware missing)")
    return parsed


class ImagesInput(bentoml.IODescriptor):
    """One or more image files and how many classes to answer per image."""

    images: list[Path] = Field(
        description=f"{FORMATS_TEXT} files, one per part (multipart/form-data; field name 'images' or any other). "
                    "A single image may also be sent as the raw body (Content-Type image/*, application/dicom "
                    "or application/octet-stream).",
    )
    top_k: int | None = Field(
        None, ge=1, description="classes per image, most probable first (default: the server's top_k); "
                                "also accepted as the query parameter ?top_k=")

    @classmethod
    async def from_http_request(cls, request: Any, serde: Any) -> ImagesInput:
        """The uploads :class:`~serving.uploads.UploadGuard` read (BentoML's own parsing is bypassed)."""
        parsed = _parsed(request)
        return cls.model_construct(images=parsed.uploads, top_k=parsed.top_k)


class ExplainInput(ImagesInput):
    """Images to explain, the class to explain (default: each image's predicted class) and top_k."""

    target: str | None = Field(None, description="class index or label whose evidence the heat map shows "
                                                 "(default: the predicted class); also ?target=")

    @classmethod
    async def from_http_request(cls, request: Any, serde: Any) -> ExplainInput:
        parsed = _parsed(request)
        return cls.model_construct(images=parsed.uploads, top_k=parsed.top_k, target=parsed.target)


class _Out(BaseModel):
    model_config = ConfigDict(populate_by_name=True, serialize_by_alias=True)


class _Answer(_Out, bentoml.IODescriptor):
    """An endpoint's answer (a BentoML IO descriptor, so that its schema keeps its own name)."""


class ClassScore(_Out):
    class_: int = Field(alias="class", description="class index (the model's output order)")
    label: str
    prob: float = Field(description="probability (softmax; sigmoid for a single-logit head)")


class ModelRef(_Out):
    id: str = Field(description="bundle id")
    weights_sha256: str


class ImageResult(_Out):
    """The answer for one uploaded image (or why it was refused)."""

    index: int = Field(description="position of the file in the request")
    filename: str
    status: int = Field(200, description="200, or the HTTP status of this image's refusal (400, 413, 415, 422)")
    error: str | None = Field(None, description="why this image was refused")
    top: list[ClassScore] | None = Field(None, description="the top_k classes, most probable first")
    calibrated: bool | None = Field(None, description="whether the probabilities are calibrated")
    ood_score: float | None = Field(None, description="higher = less like the training images")
    in_distribution: bool | None = None
    model: ModelRef | None = None


class ServedModelRef(ModelRef):
    arch: str
    provider: str = Field(description="ONNX Runtime execution provider")


class TaskAnswer(_Answer):
    task: str
    model: ServedModelRef
    results: list[ImageResult] = Field(description="one per uploaded file, in upload order")
    error: str | None = Field(None, description="set when no image of the request could be used")


class MemberVote(_Out):
    id: str
    weights_sha256: str
    class_: int = Field(alias="class")
    label: str
    prob: float


class EnsembleImageResult(ImageResult):
    probs: list[float] | None = None
    logits: list[float] | None = Field(None, description="the mean of the members' logits")
    agreement: float | None = Field(None, description="fraction of members whose own class is the ensemble's")
    members: list[MemberVote] | None = None


class EnsembleModel(_Out):
    ensemble: list[ModelRef]
    arch: str
    combine: str


class EnsembleAnswer(_Answer):
    task: str
    model: EnsembleModel
    results: list[EnsembleImageResult]
    error: str | None = None


class ErrorAnswer(_Out):
    """A refused request (4xx) or a task without a model (503)."""

    error: str
    task: str | None = None
    results: list[ImageResult] | None = None


class ServedModelInfo(_Out):
    """A served task as ``/models`` lists it: its card, or why it has no model."""

    model_config = ConfigDict(extra="allow")
    task: str
    status: str = Field(description="'ok', or 'missing' (the endpoint answers 503 with `message`)")
    message: str | None = None
    id: str | None = None
    arch: str | None = None
    dataset: str | None = None
    labels: list[str] | None = None
    provider: str | None = None
    weights_sha256: str | None = None
    preprocessing: dict[str, Any] | None = None
    metrics: dict[str, Any] | None = None


class EnsembleInfo(_Out):
    model_config = ConfigDict(extra="allow")
    task: str
    status: str
    arch: str
    members: list[ServedModelInfo]
    message: str = ""


class ModelsAnswer(_Answer):
    models: list[ServedModelInfo]
    ensemble: EnsembleInfo
    config: dict[str, Any] = Field(description="the serving configuration in effect")


class BatchSizes(_Out):
    calls: int
    images: int
    max: int
    mean: float
    sizes: dict[str, int] = Field(description="images per model call → number of calls")


class StatsAnswer(_Answer):
    batches: dict[str, BatchSizes] = Field(description="per model: the batch sizes it ran")
    requests: dict[str, int] = Field(description="requests answered per route by this API worker")
