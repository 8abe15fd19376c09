"""The card: what a checkpoint is, typed (pydantic), shared by bundles, exported files and the
service. No torch here.

* :class:`ModelInfo` — what every user of a model needs: id, architecture, labels, task, output
  count, :class:`~zoo.preprocess.Preprocessing`, weights sha256, and (when fitted) calibration and
  out-of-distribution statistics. Exported files carry it (:class:`ExportMeta`), the service
  answers with it.
* :class:`Card` — a bundle's ``card.json``: :class:`ModelInfo` plus the data (:class:`DatasetInfo`),
  the resolved recipe, metrics, the report's number, library versions, training facts, exports.

Loading validates (:func:`read_card`) and says in one line per mistake what is wrong. Keys this
version does not know are kept (``extra="allow"``), so a card written by a newer medzoo of the
same schema survives a round trip. The Markdown model card (``README.md``) is rendered from a
:class:`Card` by :mod:`zoo.modelcard`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from zoo._version import __version__
from zoo.errors import BundleError, describe_validation_error
from zoo.io import write_json
from zoo.preprocess.spec import Preprocessing

SCHEMA = 1
CARD = "card.json"
WEIGHTS = "model.safetensors"
RECIPE = "recipe.yaml"
README = "README.md"
ONNX_FILE = "model.onnx"
ONNX_FP16_FILE = "model.fp16.onnx"
TORCHSCRIPT_FILE = "model.torchscript.pt"
PT2_FILE = "model.pt2"  # torch.export's ExportedProgram (torch.export.save)
# Card.exports key → file name inside the bundle
EXPORT_FILES = {"onnx": ONNX_FILE, "onnx_fp16": ONNX_FP16_FILE, "torchscript": TORCHSCRIPT_FILE, "pt2": PT2_FILE}


class _Open(BaseModel):
    """Known fields typed; unknown ones kept (written by a newer medzoo of the same schema)."""

    model_config = ConfigDict(extra="allow", ser_json_inf_nan="constants")


class SplitMetrics(_Open):
    """ACC, macro-F1, AUC (as ``medmnist.Evaluator``), per-class recall, confusion of one split."""

    n: int
    acc: float
    macro_f1: float
    auc: float
    per_class_recall: dict[str, float] = {}
    confusion: list[list[int]] = []


class Metrics(_Open):
    """Validation and test metrics (absent for a bundle that was never evaluated)."""

    val: SplitMetrics | None = None
    test: SplitMetrics | None = None
    best_epoch: int = -1
    history: list[dict[str, int | float]] = []


class DatasetInfo(_Open):
    name: str  # canonical (zoo.names.resolve_name)
    task: str = "multi-class"
    labels: list[str] = []
    image_size: int = 28
    in_channels: int = 1
    checksum: str = ""  # sha256 of the source file(s) or arrays
    source: str = ""
    split: str = "official"
    sizes: dict[str, int] = {}


class Reported(_Open):
    """The source report's own number for this recipe, and the citation."""

    metric: str = ""
    value: float | None = None
    note: str = ""
    report: str = ""
    citation: str = ""


class TrainingInfo(_Open):
    time_s: float = 0.0
    epochs_run: int = 0
    device: str = "cpu"
    # what bit-identical reruns depend on besides seed, data and library versions
    device_name: str = ""  # the CPU model or GPU name
    threads: int = 0  # torch intra-op threads
    precision: str = "fp32"
    weights: str = "last"  # which weights the bundle holds: the raw network's, or an EMA / SWA average
    augment_family: str | None = None  # the recipe family (imaging modality) whose augmentation ran
    run: str = ""
    params: int = 0
    trainable_params: int = 0


class Tuning(_Open):
    """How ``zoo tune`` chose this bundle: its Optuna study, the storage that holds it, and the best
    trial (the one this bundle was trained by), selected on the validation metric."""

    study: str
    storage: str  # RDB URL (password hidden) or journal file path: `optuna-dashboard <storage>` opens it
    trial: int  # the trial's number in the study
    params: dict[str, Any]  # recipe path -> value chosen
    metric: str  # e.g. "val_acc": the validation metric of the selected epoch
    value: float
    direction: str = "maximize"
    sampler: str = ""
    pruner: str = ""
    trials: dict[str, int] = {}  # the study's trials by state (complete, pruned …) when a worker last finished
    host: str = ""  # the machine that trained it
    selected: str = ""  # ISO time it became the study's best


class TrackingInfo(_Open):
    """Where the training run was tracked (``zoo train --track``): the experiment tracker's own
    names for it, so that ``mlflow.get_run(run_id)`` (or TensorBoard on ``uri``) finds it."""

    backend: Literal["mlflow", "tensorboard"]
    run_id: str  # MLflow's run id; TensorBoard: the run's folder name
    experiment_id: str | None = None  # MLflow only
    uri: str = ""  # MLflow's tracking URI, or TensorBoard's log folder of the run
    parent_run_id: str | None = None  # a tuning study's run (zoo tune) or a seed ensemble's


class ExportRecord(_Open):
    """One exported file: where, its sha256, and how its parity check went."""

    file: str
    sha256: str
    size: int
    opset: int | None = None
    precision: str = "fp32"
    provider: str = ""
    parity: dict[str, Any] = {}
    torch: str = ""
    exported: str = ""
    checked: str | None = None


class EnsembleMember(_Open):
    """One member of a seed ensemble: its own bundle, seed and validation metrics."""

    id: str
    arch: str
    seed: int | None = None
    best_epoch: int = -1
    val: SplitMetrics | None = None
    weights_sha256: str = ""


class EnsembleInfo(_Open):
    """How an ``ensemble`` bundle was formed (its network holds every member's)."""

    combine: str = "mean of logits"
    members: list[EnsembleMember] = Field(min_length=2)


class CalibrationInfo(_Open):
    """How logits become calibrated probabilities, chosen on the validation split by evidence.

    ``kind``: ``"temperature"`` (Guo et al. 2017: ``softmax(z / T)``, ``sigmoid(z / T)`` for a single
    logit), ``"dirichlet"`` (Kull et al. 2019: ``softmax(W · log p + b)`` with ``p`` the uncalibrated
    probabilities) or ``"none"`` (the network's own probabilities were the best). ``candidates``: each
    candidate's cross-validated NLL on validation, the chosen one the lowest. Cards written before
    the choice existed are temperature scaling.
    """

    method: str = "temperature scaling (Guo et al., ICML 2017), fitted on the validation split"
    kind: Literal["none", "temperature", "dirichlet"] = "temperature"
    temperature: float = Field(1.0, gt=0)
    weights: list[list[float]] | None = None  # dirichlet: W (K, K)
    bias: list[float] | None = None  # dirichlet: b (K,)
    candidates: dict[str, float] = {}  # kind -> cross-validated validation NLL
    choice: str = ""  # one sentence: why this kind
    # binary tasks: the P(class 1) threshold maximising Youden's J on validation (reported, not applied)
    threshold: float | None = None
    # {"val" | "test": {"before" | "after": {"ece", "brier", "nll"}}}
    metrics: dict[str, dict[str, dict[str, float]]] = {}


class ConformalInfo(_Open):
    """Split conformal prediction sets fitted on the validation split's calibrated probabilities.

    The set at level 1 − α holds every class whose conformal p-value ``(#{s_i ≥ s} + 1) / (n + 1)``
    is at least α, ``s_i`` the validation conformity scores (those of the same class when
    ``mondrian``); keeping the scores lets any α be asked for. ``score``: LAC (1 − p of the class),
    APS (probability mass down to the class) or RAPS (APS plus a penalty past rank ``raps_k``).
    """

    method: str = ""
    score: Literal["lac", "aps", "raps"] = "lac"
    raps_lambda: float = 0.0
    raps_k: int = 0
    mondrian: bool = False
    why: str = ""  # why class-conditional (Mondrian) or marginal
    alpha: float = Field(0.1, gt=0, lt=1)  # the default level of the answers
    scores: list[list[float]] = Field(min_length=1)  # sorted; one list per class when mondrian, else one
    # score name -> {"coverage", "mean_set_size"} at ``alpha``, cross-validated on validation
    candidates: dict[str, dict[str, float]] = {}
    # {"val" | "test": {"coverage", "mean_set_size", ...}} at ``alpha``
    metrics: dict[str, dict[str, float]] = {}
    # the validation logits and labels (an ensemble of bundles fits its own sets from its members')
    validation_file: str = "validation.safetensors"
    validation_sha256: str = ""


class RobustnessRow(_Open):
    """One corruption at one severity applied to the test split (``zoo eval --corruptions``)."""

    corruption: str
    severity: int
    acc: float
    auc: float
    balanced_error: float
    ood_flagged: float | None = None  # share flagged out-of-distribution
    coverage: float | None = None  # conformal coverage at the card's alpha
    mean_set_size: float | None = None


class RobustnessInfo(_Open):
    """Robustness to acquisition artefacts (MedMNIST-C, Di Salvo et al. 2024) on the test split."""

    source: str = ""  # which corruption set (the medmnistc registry of a dataset, or the generic set)
    baseline: str = ""  # what BE / rBE are relative to
    resolution: str = ""  # at which size the corruptions were applied
    alpha: float | None = None  # the level of the prediction sets measured
    threshold: float | None = None  # binary tasks: P(class 1) above it predicts class 1 (balanced error)
    threshold_source: str = ""  # where the threshold comes from (the card's calibration, or 0.5)
    seed: int = 0  # the corruptions' random draws
    images: int = 0  # test images corrupted (all, or a seeded sample)
    clean: dict[str, float | None] = {}  # the same metrics on the uncorrupted test split
    rows: list[RobustnessRow] = []
    be: dict[str, float] = {}  # corruption -> balanced error relative to the baseline's
    rbe: dict[str, float] = {}  # corruption -> relative balanced error
    summary: dict[str, float] = {}  # mean BE / rBE and the like


class OODInfo(_Open):
    """The out-of-distribution detector: its score is an output of the exported model."""

    method: str = ""
    layers: list[str] = []
    threshold: float  # scores above it are flagged (fitted so that ~95 % of validation images pass)
    target_tpr: float = 0.95
    # {"val_flagged", "test_flagged"}: fractions of in-distribution images flagged
    rates: dict[str, float] = {}
    stats_file: str = "ood.safetensors"
    stats_sha256: str = ""


class DriftReference(_Open):
    """What the service's drift tests compare its recent answers with: the validation split's answers
    under the served rule (:func:`zoo.postprocess.interpret` with the card's calibration and detector).
    The OOD scores are all kept, sorted: the two-sample Kolmogorov-Smirnov test needs the sample itself
    (quantiles would change its p-value), and they are as many as the conformal scores already kept."""

    method: str = "validation split, answered by the served rule (calibrated argmax; OOD score and threshold)"
    images: int = Field(ge=1)  # validation images
    class_proportions: list[float] = Field(min_length=2)  # share of validation images predicted as each class
    ood_scores: list[float] | None = None  # sorted validation OOD scores (None: no detector)
    ood_rate: float | None = None  # share of validation images flagged out of distribution


class ModelInfo(_Open):
    """What every user of a model needs; carried by bundles, exported files and the service."""

    id: str
    arch: str
    model_kwargs: dict[str, Any] = {}
    task: Literal["multi-class", "binary-class"]
    labels: list[str] = Field(min_length=2)
    num_outputs: int = Field(ge=1)
    preprocessing: Preprocessing
    weights_sha256: str
    # Test-time augmentation inside the model (mean of logits over these flips): ``full_model``
    # builds it, so every export, the service and scoring apply it. Empty: none.
    tta: list[Literal["hflip", "vflip"]] = []
    calibration: CalibrationInfo | None = None
    ood: OODInfo | None = None
    conformal: ConformalInfo | None = None

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    def identity(self) -> dict[str, str]:
        """``{"id", "weights_sha256"}``: how answers name the model that gave them."""
        return {"id": self.id, "weights_sha256": self.weights_sha256}


class ExportMeta(ModelInfo):
    """The card subset every exported file carries: enough to serve it without its bundle."""

    format: str
    dataset: str | None = None
    input: dict[str, Any] = {}
    output: dict[str, Any] = {}
    medzoo: str = ""


class Card(ModelInfo):
    """A bundle's ``card.json``."""

    model_config = ConfigDict(populate_by_name=True)

    schema_: int = Field(SCHEMA, alias="schema")
    dataset: DatasetInfo
    recipe: dict[str, Any] = {}
    metrics: Metrics = Metrics()
    reported: Reported = Reported()
    versions: dict[str, str] = {}
    training: TrainingInfo = TrainingInfo()
    ensemble: EnsembleInfo | None = None  # the members of an ``ensemble`` bundle
    created: str = ""
    exports: dict[str, ExportRecord] = {}
    tuning: Tuning | None = None  # set by `zoo tune` on the best trial's bundle
    robustness: RobustnessInfo | None = None  # set by `zoo eval --corruptions`
    # set by zoo.trust.fit; the service's drift tests (serving.drift). Not in exports: only the bundle serves it.
    drift: DriftReference | None = None
    tracking: TrackingInfo | None = None  # set by `zoo train --track mlflow|tensorboard`

    def to_json_dict(self) -> dict[str, Any]:
        """The JSON object written to ``card.json`` (NaN kept as in Python's json)."""
        return self.model_dump(mode="python", by_alias=True, exclude_none=False)

    def export_meta(self, fmt: str) -> ExportMeta:
        """The metadata an exported file of format ``fmt`` carries."""
        prep = self.preprocessing
        return ExportMeta(
            **{name: getattr(self, name) for name in ModelInfo.model_fields},
            format=fmt,
            dataset=self.dataset.name,
            input={"name": "images", "dtype": "uint8", "layout": "NCHW",
                   "shape": ["batch", prep.in_channels, prep.image_size, prep.image_size]},
            output={"name": "logits", "dtype": "float32", "shape": ["batch", self.num_outputs]},
            medzoo=__version__,
        )

    def validation_score(self) -> float:
        """Model selection uses validation only: best validation AUC, then ACC."""
        val = self.metrics.val
        if val is None:
            return float("-inf")
        auc = 0.0 if math.isnan(val.auc) else val.auc
        acc = 0.0 if math.isnan(val.acc) else val.acc
        return auc * 10 + acc


def parse_card(raw: Any, where: str | Path) -> Card:
    """Validate a card's JSON object; :class:`BundleError` with one line per mistake otherwise."""
    if not isinstance(raw, dict):
        raise BundleError(f"{where} is not a JSON object")
    if raw.get("schema") != SCHEMA:
        raise BundleError(f"{where} has card schema {raw.get('schema')!r}, expected {SCHEMA}")
    try:
        return Card.model_validate(raw)
    except ValidationError as e:
        lines = describe_validation_error(e, Card).splitlines()
        raise BundleError(f"{where} is not a valid card: " + "; ".join(lines)) from None


def read_card(path: str | Path) -> Card:
    """The validated card of a bundle directory."""
    p = Path(path)
    f = p / CARD
    if not f.is_file():
        raise BundleError(f"{p} is not a medzoo bundle (no {CARD})")
    try:
        raw = json.loads(f.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BundleError(f"{f} is not valid JSON: {e}") from None
    return parse_card(raw, f)


def write_card(path: str | Path, card: Card) -> None:
    """Write ``card.json`` atomically."""
    write_json(Path(path) / CARD, card.to_json_dict())


def update_card(path: str | Path, **fields: Any) -> Card:
    """Merge top-level fields into a bundle's card (export results, calibration …), validated."""
    card = read_card(path)
    raw = {**card.to_json_dict(), **{k: _plain(v) for k, v in fields.items()}}
    new = parse_card(raw, Path(path) / CARD)
    write_card(path, new)
    return new


def _plain(v: Any) -> Any:
    if isinstance(v, BaseModel):
        return v.model_dump(mode="python", by_alias=True)
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    return v


__all__ = ["CARD", "EXPORT_FILES", "ONNX_FILE", "ONNX_FP16_FILE", "PT2_FILE", "README", "RECIPE", "SCHEMA",
           "TORCHSCRIPT_FILE", "WEIGHTS", "CalibrationInfo", "Card", "ConformalInfo", "DatasetInfo", "DriftReference",
           "EnsembleInfo", "EnsembleMember", "ExportMeta", "ExportRecord", "Metrics", "ModelInfo", "OODInfo",
           "Reported", "RobustnessInfo", "RobustnessRow", "SplitMetrics", "TrackingInfo", "TrainingInfo", "Tuning",
           "parse_card", "read_card", "update_card", "write_card"]
