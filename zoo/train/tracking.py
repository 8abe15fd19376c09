"""Experiment tracking of training runs: MLflow, TensorBoard, or none (``zoo train --track``).

A run logs the resolved recipe as parameters, every epoch's row (losses, validation metrics,
learning rate) at step = epoch, and when its bundle is written the final validation / test,
calibration, conformal and out-of-distribution figures, and the bundle's ``card.json``,
``README.md``, ``curves.png``, ``confusion.png`` and ``reliability.png`` as artifacts; the card
records where (:class:`zoo.card.TrackingInfo`: backend, run id, experiment, URI).

The tracker is the recipe's ``train.track``, else ``$MEDZOO_TRACK`` (:func:`zoo.settings.tracking_settings`),
else none. MLflow logs to ``$MLFLOW_TRACKING_URI``, by default to a local store under
``$MEDZOO_HOME/mlruns`` (``mlflow.db``, an SQLite database: MLflow 3 refuses its old file store
unless told otherwise, and ``artifacts/``), in the experiment ``$MLFLOW_EXPERIMENT_NAME`` or
``medzoo-<dataset>``. TensorBoard writes event files under ``$MEDZOO_HOME/tensorboard/<run>``
(``torch.utils.tensorboard``). Both are optional: MLflow and TensorBoard are imported only when
asked for, and a missing one is a :class:`~zoo.errors.UsageError` with the ``pip install`` line.

Resuming (``--resume``) continues the same run: its id is kept in the run directory
(``tracking.json``), epochs the tracker missed are logged from the snapshot's history.
Under torchrun only rank 0 logs. ``zoo tune`` logs each trial as a child run of the study's run,
and a seed ensemble its members as children of the ensemble's run (:class:`Parent`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

from zoo._version import __version__
from zoo.card import CARD, README, Card, TrackingInfo, read_card, update_card
from zoo.errors import UsageError, UserError
from zoo.io import write_json
from zoo.names import resolve_name
from zoo.settings import TrackingSettings, tracking_settings
from zoo.store import home

log = logging.getLogger(__name__)

Status = Literal["FINISHED", "FAILED", "KILLED"]
STATE = "tracking.json"  # in the run directory: the run a --resume continues
ARTIFACTS = (CARD, README, "curves.png", "confusion.png", "reliability.png")
MLFLOW_DIR = "mlruns"
TENSORBOARD_DIR = "tensorboard"
_MAX_PARAM = 6000  # MLflow's limit on a parameter's value (characters)
_BATCH = 100  # MLflow's limit on parameters per log_batch call


def install_hint(backend: str) -> str:
    """What to do when the tracker's package is missing."""
    package = "MLflow" if backend == "mlflow" else "TensorBoard"
    return f"--track {backend} needs {package}, which is not installed: pip install 'medzoo[{backend}]'"


@dataclass(frozen=True)
class Parent:
    """A run others are children of: a tuning study's (``zoo tune``) or a seed ensemble's. Its
    children log where it does (backend, URI, experiment), whatever ``store`` they train in."""

    backend: str
    run_id: str
    uri: str  # MLflow's tracking URI, or the parent's TensorBoard folder (children log below it)
    experiment_id: str | None = None
    child_name: str | None = None  # the next child's run name (a trial's "trial-3")

    @classmethod
    def of(cls, info: TrackingInfo | None) -> Parent | None:
        """The tracked run ``info`` names as a parent (None when untracked)."""
        return None if info is None else cls(info.backend, info.run_id, info.uri, info.experiment_id)


@dataclass
class RunSpec:
    """What opening a tracked run needs."""

    name: str  # the run's name (its run directory's)
    dataset: str
    store: Path | None = None  # medzoo home of the default locations (None: $MEDZOO_HOME)
    state: Path | None = None  # folder holding tracking.json (the run directory); None: never resumed
    resume: bool = False
    parent: Parent | None = None
    history: Sequence[Mapping[str, Any]] = ()  # epochs a resumed run has done (logged if missing)
    params: dict[str, str] = field(default_factory=dict)  # logged when the run is created
    previous: TrackingInfo | None = None  # a run to continue (a study's, from its attributes)
    tags: dict[str, str] = field(default_factory=dict)


class Tracker(Protocol):
    """One tracked run (or none)."""

    stopped: bool  # the caller stopped the run on purpose (an Optuna pruner): it ends KILLED

    @property
    def info(self) -> TrackingInfo | None: ...

    def log_params(self, params: Mapping[str, Any]) -> None: ...

    def log_epoch(self, row: Mapping[str, Any]) -> None: ...

    def log_summary(self, metrics: Mapping[str, float], step: int) -> None: ...

    def log_artifacts(self, files: Sequence[Path]) -> None: ...

    def end(self, status: Status) -> None: ...


class NoTracker:
    """Tracking off (and every rank but 0 under torchrun)."""

    stopped = False

    @property
    def info(self) -> TrackingInfo | None:
        return None

    def log_params(self, params: Mapping[str, Any]) -> None:
        pass

    def log_epoch(self, row: Mapping[str, Any]) -> None:
        pass

    def log_summary(self, metrics: Mapping[str, float], step: int) -> None:
        pass

    def log_artifacts(self, files: Sequence[Path]) -> None:
        pass

    def end(self, status: Status) -> None:
        pass


def _numbers(row: Mapping[str, Any]) -> dict[str, float]:
    """The numeric entries of a row (``epoch`` excepted), as floats (NaN kept: an undefined AUC)."""
    return {k: float(v) for k, v in row.items()
            if k != "epoch" and isinstance(v, (int, float)) and not isinstance(v, bool)}


class MlflowTracker(NoTracker):
    """One MLflow run, written through ``MlflowClient`` (no process-wide active run, so that a
    study's run and its trials' runs never get mixed up)."""

    def __init__(self, client: Any, run_id: str, experiment_id: str, uri: str, parent: str | None) -> None:
        self.client, self.run_id, self.experiment_id, self.uri, self.parent = client, run_id, experiment_id, uri, parent
        self.stopped = False

    @property
    def info(self) -> TrackingInfo:
        return TrackingInfo(backend="mlflow", run_id=self.run_id, experiment_id=self.experiment_id,
                            uri=self.uri, parent_run_id=self.parent)

    def log_params(self, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:_MAX_PARAM]) for k, v in params.items()]
        for i in range(0, len(items), _BATCH):
            self.client.log_batch(self.run_id, params=items[i : i + _BATCH])

    def _metrics(self, values: Mapping[str, float], step: int) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in values.items()])

    def log_epoch(self, row: Mapping[str, Any]) -> None:
        self._metrics(_numbers(row), int(row["epoch"]))

    def log_summary(self, metrics: Mapping[str, float], step: int) -> None:
        self._metrics(metrics, step)

    def log_artifacts(self, files: Sequence[Path]) -> None:
        for f in files:
            self.client.log_artifact(self.run_id, str(f))

    def catch_up(self, history: Sequence[Mapping[str, Any]]) -> None:
        """A resumed run: log the epochs of the snapshot the run does not hold yet (killed between
        the snapshot and the logging)."""
        if not history:
            return
        key = next(k for k in _numbers(history[0]))
        logged = {m.step for m in self.client.get_metric_history(self.run_id, key)}
        for row in history:
            if int(row["epoch"]) not in logged:
                self.log_epoch(row)

    def end(self, status: Status) -> None:
        self.client.set_terminated(self.run_id, status)


class TensorboardTracker(NoTracker):
    """TensorBoard event files of one run (``torch.utils.tensorboard.SummaryWriter``)."""

    def __init__(self, logdir: Path, name: str, parent: str | None, rewrite: bool) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # torch raises it when the tensorboard package is missing
            raise UsageError(install_hint("tensorboard")) from None
        # ``rewrite``: a resumed training run writes its history again from epoch 1; purge_step hides
        # the events the killed process wrote at those steps, so each epoch shows once
        self.writer = SummaryWriter(str(logdir), purge_step=1 if rewrite else None)
        self.logdir, self.name, self.parent = logdir, name, parent
        self.stopped = False

    @property
    def info(self) -> TrackingInfo:
        return TrackingInfo(backend="tensorboard", run_id=self.name, uri=str(self.logdir), parent_run_id=self.parent)

    def log_params(self, params: Mapping[str, Any]) -> None:
        # Markdown: a table of the recipe's fields (TensorBoard's hparams need the final metrics up front)
        rows = "\n".join(f"| {k} | {str(v)[:200]} |" for k, v in params.items())
        self.writer.add_text("recipe", f"| field | value |\n|---|---|\n{rows}", 0)

    def log_epoch(self, row: Mapping[str, Any]) -> None:
        for k, v in _numbers(row).items():
            self.writer.add_scalar(f"epoch/{k}", v, int(row["epoch"]))
        self.writer.flush()

    def catch_up(self, history: Sequence[Mapping[str, Any]]) -> None:
        for row in history:
            self.log_epoch(row)

    def log_summary(self, metrics: Mapping[str, float], step: int) -> None:
        for k, v in metrics.items():
            self.writer.add_scalar(f"final/{k}", v, step)

    def log_artifacts(self, files: Sequence[Path]) -> None:
        import numpy as np
        from PIL import Image

        for f in files:
            if f.suffix == ".png":
                with Image.open(f) as im:
                    self.writer.add_image(f.stem, np.asarray(im.convert("RGB")), 0, dataformats="HWC")
            else:  # the card (JSON) and the Markdown model card, as text
                text = f.read_text(encoding="utf-8")
                self.writer.add_text(f.name, text if f.suffix == ".md" else f"```\n{text}\n```", 0)
        self.writer.flush()

    def end(self, status: Status) -> None:
        self.writer.add_text("status", status, 0)
        self.writer.close()


# ---------------------------------------------------------------------------------------------
# opening a run


def dataset_label(dataset: str) -> str:
    """A recipe's dataset as experiments are named after it: the MedMNIST flag, or a folder's name."""
    try:
        return resolve_name(dataset)
    except UserError:  # an image folder
        return Path(dataset).name or dataset


def backend_of(track: str | None, settings: TrackingSettings | None = None) -> str:
    """The tracker a run uses: the recipe's ``train.track``, else ``$MEDZOO_TRACK``, else none."""
    return track or (settings or tracking_settings()).track or "none"


def require(backend: str) -> None:
    """Fail early (before any data is loaded) when the tracker's package is missing."""
    try:
        if backend == "mlflow":
            import mlflow  # noqa: F401
        elif backend == "tensorboard":
            import tensorboard  # noqa: F401
    except ImportError:
        raise UsageError(install_hint(backend)) from None


def _mlflow_client(uri: str) -> Any:
    require("mlflow")
    if logging.getLogger().getEffectiveLevel() > logging.INFO:  # MLflow's database set-up chatter: with -v only
        for name in ("alembic", "mlflow.store.db.utils"):
            logging.getLogger(name).setLevel(logging.WARNING)
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def mlflow_location(settings: TrackingSettings, store: Path | None) -> tuple[str, str | None]:
    """``(tracking URI, artifact location for new experiments)``: ``$MLFLOW_TRACKING_URI`` (its
    server decides where artifacts go), else the local store under ``<store>/mlruns``."""
    if settings.mlflow_uri:
        return settings.mlflow_uri, None
    root = (store or home()).expanduser().resolve() / MLFLOW_DIR
    root.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{root / 'mlflow.db'}", (root / "artifacts").as_uri()


def _experiment(client: Any, name: str, artifacts: str | None) -> str:
    """The id of the experiment ``name``, created when missing (another process may create it first)."""
    from mlflow.exceptions import MlflowException

    found = client.get_experiment_by_name(name)
    if found is not None:
        return str(found.experiment_id)
    try:
        return str(client.create_experiment(name, artifact_location=artifacts))
    except MlflowException:
        found = client.get_experiment_by_name(name)
        if found is None:
            raise
        return str(found.experiment_id)


def _saved(spec: RunSpec, backend: str, uri: str) -> str | None:
    """The run id to continue: ``spec.previous``, or a resumed run's from ``tracking.json``; only
    when it was tracked with the same backend at the same place."""
    prev = spec.previous
    if prev is None and spec.resume and spec.state is not None and (spec.state / STATE).is_file():
        try:
            prev = TrackingInfo.model_validate_json((spec.state / STATE).read_text(encoding="utf-8"))
        except (OSError, ValueError):  # pydantic's ValidationError is a ValueError
            return None
    if prev is None or prev.backend != backend or prev.uri != uri:
        return None
    return prev.run_id


def _open_mlflow(spec: RunSpec, settings: TrackingSettings) -> MlflowTracker:
    p = spec.parent
    uri, artifacts = (p.uri, None) if p is not None else mlflow_location(settings, spec.store)
    client = _mlflow_client(uri)
    experiment = p.experiment_id if p is not None and p.experiment_id else _experiment(
        client, settings.experiment or f"medzoo-{spec.dataset}", artifacts)
    run_id = _saved(spec, "mlflow", uri)
    if run_id is not None:
        from mlflow.exceptions import MlflowException

        try:
            client.update_run(run_id, status="RUNNING")
            tracker = MlflowTracker(client, run_id, experiment, uri, p.run_id if p else None)
            tracker.catch_up(spec.history)
            return tracker
        except MlflowException as e:  # the run was deleted: a new one
            log.warning("cannot continue MLflow run %s (%s): starting a new one", run_id, str(e).splitlines()[0])
    tags = {**spec.tags, "medzoo.version": __version__}
    if p is not None:
        tags["mlflow.parentRunId"] = p.run_id  # MLflow's own nesting tag: the UI shows it as a child
    run = client.create_run(experiment, run_name=(p.child_name if p and p.child_name else spec.name), tags=tags)
    tracker = MlflowTracker(client, run.info.run_id, experiment, uri, p.run_id if p else None)
    tracker.log_params(spec.params)
    tracker.catch_up(spec.history)
    return tracker


def _open_tensorboard(spec: RunSpec) -> TensorboardTracker:
    p = spec.parent
    require("tensorboard")
    name = p.child_name if p is not None and p.child_name else spec.name
    root = Path(p.uri) if p is not None else (spec.store or home()).expanduser().resolve() / TENSORBOARD_DIR
    resumed = _saved(spec, "tensorboard", str(root / name)) is not None
    tracker = TensorboardTracker(root / name, name, p.run_id if p else None, resumed and spec.state is not None)
    if not resumed:
        tracker.log_params(spec.params)
    tracker.catch_up(spec.history)
    return tracker


def open_tracker(backend: str, spec: RunSpec, settings: TrackingSettings | None = None) -> Tracker:
    """Open (or, resuming, continue) a tracked run; ``tracking.json`` in ``spec.state`` names it."""
    if spec.parent is not None:
        backend = spec.parent.backend  # a study's / ensemble's children log where it does
    if backend == "none":
        return NoTracker()
    settings = settings or tracking_settings()
    tracker: Tracker = _open_mlflow(spec, settings) if backend == "mlflow" else _open_tensorboard(spec)
    info = tracker.info
    if spec.state is not None and info is not None:
        write_json(spec.state / STATE, info.model_dump(mode="json"))
    return tracker


@contextlib.contextmanager
def tracked(tracker: Tracker) -> Iterator[Tracker]:
    """End the run when the block ends: FINISHED, KILLED (interrupted, or stopped on purpose by the
    caller: :attr:`Tracker.stopped`) or FAILED."""
    try:
        yield tracker
    except BaseException as e:
        tracker.end("KILLED" if tracker.stopped or isinstance(e, KeyboardInterrupt) else "FAILED")
        raise
    tracker.end("FINISHED")


# ---------------------------------------------------------------------------------------------
# what is logged


def params_of(recipe: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """The recipe as flat parameters: dotted paths → text (lists as JSON)."""
    out: dict[str, str] = {}
    for k, v in recipe.items():
        path = f"{prefix}{k}"
        if isinstance(v, Mapping) and v:
            out.update(params_of(v, f"{path}."))
        else:
            out[path] = json.dumps(v) if isinstance(v, (list, dict)) else str(v)
    return out


def summary_metrics(card: Card) -> dict[str, float]:
    """The final figures of a bundle: validation / test metrics of the selected weights, and the
    calibration, conformal and out-of-distribution figures :mod:`zoo.trust.fit` wrote."""
    out: dict[str, Any] = {"best_epoch": card.metrics.best_epoch, "train_time_s": card.training.time_s}
    for split, name in (("val", "selected_val"), ("test", "test")):
        m = getattr(card.metrics, split)
        if m is not None:
            out.update({f"{name}_{k}": getattr(m, k) for k in ("acc", "auc", "macro_f1")})
    if card.calibration is not None:
        for split, when in card.calibration.metrics.items():
            for stage, values in when.items():
                suffix = "" if stage == "after" else f"_{stage}"
                out.update({f"calibration_{split}_{k}{suffix}": v for k, v in values.items()})
        if card.calibration.threshold is not None:
            out["calibration_threshold"] = card.calibration.threshold
    if card.conformal is not None:
        for split, values in card.conformal.metrics.items():
            out.update({f"conformal_{split}_{k}": v for k, v in values.items()})
    if card.ood is not None:
        out.update({f"ood_{k}": v for k, v in card.ood.rates.items()})
        out["ood_threshold"] = card.ood.threshold
    return {k: float(v) for k, v in out.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isinf(v)}


def finish(tracker: Tracker, bundle: Path) -> Card:
    """A bundle is written: its run id into the card (first, so that the card logged holds it),
    then the final figures and the bundle's files to the run. Returns the card."""
    info = tracker.info
    if info is None:
        return read_card(bundle)
    card = update_card(bundle, tracking=info)
    tracker.log_summary(summary_metrics(card), max(card.training.epochs_run, 0))
    tracker.log_artifacts([bundle / f for f in ARTIFACTS if (bundle / f).is_file()])
    return card


__all__ = ["ARTIFACTS", "MlflowTracker", "NoTracker", "Parent", "RunSpec", "STATE", "TensorboardTracker", "Tracker",
           "backend_of", "dataset_label", "finish", "install_hint", "mlflow_location", "open_tracker", "params_of",
           "require", "summary_metrics", "tracked"]
