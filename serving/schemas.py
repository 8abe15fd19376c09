"""What the HTTP endpoints take and answer, as pydantic models (the OpenAPI schema at ``/docs.json``
and the ``/schema.json`` that ``bentoml.SyncHTTPClient`` reads are generated from them).

Requests: :class:`ImagesInput` — one or more image files (multipart; the ``images`` field as
BentoML's clients send it, any other file field name too, or one raw image body), ``top_k``,
``alpha`` (the level of the prediction sets) and ``preview``.
Its :meth:`ImagesInput.from_http_request` takes the uploads that :class:`serving.uploads.UploadGuard`
already read, with the limits checked, instead of BentoML's own multipart parsing (see there why).

Answers: :class:`TaskAnswer` (``/<task>``), :class:`EnsembleAnswer` (``/pathology_ensemble``),
:class:`ModelsAnswer` (``/models``), :class:`StatsAnswer` (``/stats``), :class:`DriftAnswer`
(``/drift``); a refused request answers :class:`ErrorAnswer` with its 4xx / 503 status. Fields
that are None are left out of the JSON
(``calibrated``, ``ood_score`` and ``in_distribution`` appear once the card carries a calibration
or an out-of-distribution detector, ``prediction_set`` and ``alpha`` once it carries conformal
scores; ``error`` only on refused images).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import bentoml
from pydantic import BaseModel, ConfigDict, Field

from serving.uploads import STATE_KEY, ParsedRequest
from zoo.card import ConformalInfo, ModelInfo
from zoo.preprocess import Preprocessing
from zoo.preprocess.image import FORMATS_TEXT


def _parsed(request: Any) -> ParsedRequest:
    """What :class:`~serving.uploads.UploadGuard` parsed from this request (in the ASGI scope)."""
    parsed = request.scope.get("state", {}).get(STATE_KEY)
    if not isinstance(parsed, ParsedRequest):
        raise RuntimeError(f"{request.url.path}: UploadGuard did not read this request (middleware missing)")
    return parsed


class _Uploads(bentoml.IODescriptor):
    """What every upload endpoint takes: the images, top_k and the level of the prediction sets."""

    images: list[Path] = Field(
        description=f"{FORMATS_TEXT} files, one per part (multipart/form-data; field name 'images' or any other). "
                    "A single image may also be sent as the raw body (Content-Type image/*, application/dicom "
                    "or application/octet-stream).",
    )
    top_k: int | None = Field(
        None, ge=1, description="classes per image, most probable first (default: the server's top_k); "
                                "also accepted as the query parameter ?top_k=")
    alpha: float | None = Field(
        None, gt=0, lt=1, description="the prediction sets' miss rate: each image's `prediction_set` holds the "
                                      "classes plausible at level 1 - alpha (default: the model card's, 0.1 = "
                                      "90 %); also ?alpha=. Not a number strictly between 0 and 1: 422")


class ImagesInput(_Uploads):
    """One or more image files, how many classes to answer per image, the level of the prediction
    sets, and whether to answer the decoded images."""

    preview: bool = Field(False, description="also answer each image as the model saw it (decoded, at the model's "
                                             "image size) as a base64 PNG in `preview_png`; also ?preview=true")
    output: str | None = Field(None, description="'json' (default) or 'dicom-sr': a DICOM Comprehensive SR per "
                                                 "DICOM image (application/dicom; several: multipart/related); also "
                                                 "?output= or Accept: application/dicom. A non-DICOM image: 406")

    @classmethod
    async def from_http_request(cls, request: Any, serde: Any) -> ImagesInput:
        """The uploads :class:`~serving.uploads.UploadGuard` read (BentoML's own parsing is bypassed)."""
        parsed = _parsed(request)
        return cls.model_construct(images=parsed.uploads, top_k=parsed.top_k, alpha=parsed.alpha,
                                   preview=parsed.preview, output=parsed.output)


class ExplainInput(_Uploads):
    """Images to explain, the class to explain (default: each image's predicted class), top_k and alpha."""

    target: str | None = Field(None, description="class index or label whose evidence the heat map shows "
                                                 "(default: the predicted class); also ?target=")

    @classmethod
    async def from_http_request(cls, request: Any, serde: Any) -> ExplainInput:
        parsed = _parsed(request)
        return cls.model_construct(images=parsed.uploads, top_k=parsed.top_k, alpha=parsed.alpha,
                                   target=parsed.target)


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


PREDICTION_SET = ("the classes plausible at level 1 - alpha, most probable first (split conformal prediction "
                  "on the validation split: the true class is in it for at least that share of images like it); "
                  "absent while the model card has no conformal scores (zoo calibrate)")
ALPHA = "the level of `prediction_set` is 1 - alpha"


class ImageResult(_Out):
    """The answer for one uploaded image (or why it was refused)."""

    index: int = Field(description="position of the file in the request")
    filename: str
    status: int = Field(200, description="200, or the HTTP status of this image's refusal (400, 406, 413, 415, 422)")
    error: str | None = Field(None, description="why this image was refused")
    top: list[ClassScore] | None = Field(None, description="the top_k classes, most probable first")
    calibrated: bool | None = Field(None, description="whether the probabilities are calibrated")
    ood_score: float | None = Field(None, description="higher = less like the training images")
    in_distribution: bool | None = None
    prediction_set: list[str] | None = Field(None, description=PREDICTION_SET)
    alpha: float | None = Field(None, description=ALPHA)
    preview_png: str | None = Field(None, description="with `preview`: base64 PNG of the image as the model saw it "
                                                      "(decoded, at its image size)")
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


class ExplainedItem(_Out):
    """One uploaded image: its classes and the overlay, or why it was refused (``status`` ≠ 200)."""

    index: int
    filename: str
    status: int = 200
    error: str = ""
    top: list[ClassScore] = []
    predicted: ClassScore | None = None
    explained: ClassScore | None = Field(None, description="the class the heat map explains")
    overlay_png: str | None = Field(None, description="base64 PNG: the heat map on the image, 224 px or more")
    in_distribution: bool | None = Field(None, description="false: unlike the training images (when the model "
                                                           "carries an out-of-distribution detector)")
    ood_score: float | None = None
    prediction_set: list[str] | None = Field(None, description=PREDICTION_SET)
    alpha: float | None = Field(None, description=ALPHA)


class ExplainAnswer(_Answer):
    """Classes and heat maps of the uploaded images."""

    task: str
    models: list[dict[str, str]] = []
    method: str | None = Field(None, description="grad-cam (convolutional networks) or saliency (MLPs)")
    layer: str | None = Field(None, description="the layer Grad-CAM reads (the model registry's cam_layer)")
    feature_size: list[int] | None = None
    note: str = ""
    results: list[ExplainedItem] = []
    error: str | None = None


class ErrorAnswer(_Out):
    """A refused request (4xx) or a task without a model (503)."""

    error: str
    task: str | None = None
    results: list[ImageResult] | None = None


class ServedModelInfo(_Out):
    """A served model as the inference worker describes it to the API worker (validated once, on
    arrival: :class:`ServedTable`), and as ``/models`` lists it (without ``model_info``): its card, or
    why the task has no model."""

    task: str
    status: str = Field(description="'ok', or 'missing' (the endpoint answers 503 with `message`)")
    message: str | None = None
    id: str | None = None
    arch: str | None = None
    dataset: str | None = None
    labels: list[str] | None = None
    num_outputs: int | None = None
    preprocessing: Preprocessing | None = None
    metrics: dict[str, Any] | None = None
    reported: dict[str, Any] | None = None
    weights_sha256: str | None = None
    created: str | None = None
    provider: str | None = None
    onnx: str | None = None
    path: str | None = None
    has_ood: bool | None = Field(None, description="the model returns an out-of-distribution score")
    model_info: ModelInfo | None = Field(None, description="what zoo.postprocess.interpret reads of the card "
                                                           "(calibration, OOD threshold); not listed by /models")

    @property
    def ref(self) -> ModelRef:
        return ModelRef(id=self.id or "", weights_sha256=self.weights_sha256 or "")

    def listed(self) -> ServedModelInfo:
        """As ``/models`` lists it: without the card part only the API worker needs."""
        return self.model_copy(update={"model_info": None})


class ServedEnsembleInfo(_Out):
    """The ensemble as the inference worker describes it (and ``/models`` lists it)."""

    task: str
    status: str
    arch: str
    members: list[ServedModelInfo]
    message: str = ""
    has_ood: bool = False
    labels: list[str] | None = None
    preprocessing: Preprocessing | None = None
    conformal: ConformalInfo | None = Field(None, description="the ensemble's prediction sets, fitted on its own "
                                                              "validation probabilities; not listed by /models")

    def listed(self) -> ServedEnsembleInfo:
        """As ``/models`` lists it: members without their card part, no conformal scores."""
        return self.model_copy(update={"members": [m.listed() for m in self.members], "conformal": None})


class ServedTable(_Out):
    """The inference worker's answer to ``describe()``: every served task, the ensemble, the config."""

    tasks: dict[str, ServedModelInfo]
    ensemble: ServedEnsembleInfo
    config: dict[str, Any]


class ExplainableRoute(_Out):
    """A route as the explanation worker describes it to the API worker: whether it explains, and
    what the API worker needs to check and decode uploads for it."""

    status: str
    message: str = ""
    ids: list[str] = []
    arch: str | None = None
    labels: list[str] | None = None
    preprocessing: Preprocessing | None = None
    method: str | None = None
    layer: str | None = None


class WorkerExplanation(_Out):
    """The explanation worker's answer for a batch: per image its classes and overlay (the fields of
    ``serving.explain_api.ExplainedItem``), or a user's mistake (``error``, ``status``)."""

    models: list[dict[str, str]] = []
    method: str | None = None
    layer: str | None = None
    feature_size: list[int] | None = None
    note: str = ""
    results: list[dict[str, Any]] = []
    error: str | None = None
    status: int | None = None


class ModelsAnswer(_Answer):
    models: list[ServedModelInfo]
    ensemble: ServedEnsembleInfo
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


class DriftTest(_Out):
    """One drift test of a window against the validation split (:mod:`serving.drift`)."""

    name: str = Field(description="chi-square (predicted-class mix) or kolmogorov-smirnov (OOD scores)")
    statistic: float
    p_value: float = Field(description="small: the window is unlike the validation split")
    dof: int | None = Field(None, description="chi-square: degrees of freedom (cells - 1)")
    pooled: list[str] = Field([], description="chi-square: classes pooled into one cell (expected < 5 times)")


class DriftClass(_Out):
    label: str
    images: int = Field(description="images of the window predicted as this class")
    share: float = Field(description="their share of the window")
    reference_share: float | None = Field(None, description="the share of validation images predicted as it")


class TaskDrift(_Out):
    """One task's window of recent answers against its model's validation split."""

    task: str
    model: str = Field(description="bundle id")
    status: str = Field(description="'ok', or 'no reference' (an old card: window only, no test)")
    message: str = ""
    window_size: int = Field(description="the most images the window holds (the drift_window setting)")
    images: int = Field(description="images in the window now")
    class_mix: list[DriftClass] = []
    class_test: DriftTest | None = Field(None, description="chi-square of the predicted-class counts")
    ood_test: DriftTest | None = Field(None, description="Kolmogorov-Smirnov of the OOD scores")
    ood_rate: float | None = Field(None, description="share of the window flagged out of distribution")
    reference_ood_rate: float | None = Field(None, description="share of validation images flagged")
    reference_images: int | None = Field(None, description="validation images of the reference")


class DriftAnswer(_Answer):
    """``/drift``: per served task, the window and its tests (the inference worker's one window per task)."""

    window_size: int
    tasks: dict[str, TaskDrift] = Field(description="served tasks (a task without a model has no window)")
