"""Serving configuration: which bundle serves which task, batching and upload limits.

Sources, later ones winning: built-in defaults, the YAML file named by ``MEDZOO_SERVE_CONFIG``
(or ``zoo serve --config``), then environment variables. Every setting is a field of
:class:`ServeConfig` (its ``description`` is what the README's table shows); tasks have their own
section, and any other top-level key is refused with the closest names, so that a mistyped setting
never becomes a task.

YAML layout (every key optional)::

    tasks:                                # task: bundle; each task is served at POST /<task>
      breast: breastmnist-simplecnn-…     # a bundle id in the store, or a bundle directory
      chest: null                         # null: the store's best bundle of the task's dataset
    skin: dermamnist-simplecnn-…          # skin, organ, pathology (always served) may stay at the top level
    organ: /path/to/bundle
    pathology: null                       # null / absent: the best pathology bundle of the store
    ensemble:
      members: [id-1, id-2]               # default: every pathology bundle with arch ``arch``
      arch: resnet152
    store: null                           # the bundle store (null: $MEDZOO_HOME)
    top_k: 3
    max_batch_size: 64
    max_latency_ms: 60000                 # a request queued longer is shed with 503
    max_file_mb: 20                       # one uploaded file
    max_request_mb: 100                   # one request body
    max_images: 64                        # files in one request
    max_image_megapixels: 64              # one image, read from its header before decoding
    max_request_megapixels: 256           # all the images of one request, idem
    body_timeout_s: 10                    # an upload pausing longer is answered 408
    request_timeout_s: 60                 # a request taking longer is stopped (504), decoding included
    idle_timeout_s: 5                     # a connection without a request in progress for this long is closed
    max_connections: 4096                 # open connections per API worker: the oldest idle one is dropped, else 503
    shutdown_grace_s: 20                  # SIGTERM: requests in flight get this long to finish
    decode_threads: 2                     # images decoded at once per API worker
    decode_memory_mb: 512                 # memory the images being decoded may take per API worker (estimated
                                          # from their headers; one image alone may take up to it)
    decode_queue_s: null                  # a request is admitted only if the decoding already admitted and its own
                                          # are due to finish within this many seconds (measured rate), else 503;
                                          # null: a third of request_timeout_s
    refuse_ood: false                     # true: an image flagged out of distribution is answered 422, not classified
    api_workers: 1                        # processes decoding requests (the API layer)
    access_log: true                      # BentoML's per-request access log lines
    drift_window: 500                     # the last images per task whose class mix and OOD scores GET /drift tests
    ort_threads: null                     # ONNX Runtime intra-op threads (null: its default)
    ort_spinning: false                   # idle ONNX Runtime threads spin (they share the CPU with the API workers)
    audit_log: null                       # a folder: one JSON line per answered or refused image (`zoo audit`);
                                          # null: no audit trail
    audit_max_mb: 100                     # an audit file reaching this size is closed; the next lines go to a new one
    audit_flush_s: 1                      # the audit file is fsynced this often (what a machine crash may lose)

Environment: ``MEDZOO_<SETTING>`` for each setting (``MEDZOO_TOP_K``, ``MEDZOO_MAX_FILE_MB``, …);
``MEDZOO_SERVE_<TASK>`` sets a task's bundle, and adds the task when the file has none of that
name (``MEDZOO_SERVE_BREAST=ID`` serves ``/breast``); ``MEDZOO_ENSEMBLE_MEMBERS`` (comma-separated)
and ``MEDZOO_ENSEMBLE_ARCH`` the ensemble; ``MEDZOO_HOME`` the store; ``MEDZOO_SERVE_SOURCE``
(``auto``, ``store`` or ``bento``) where the bundles are read from.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from zoo.ensemble import choose_members
from zoo.errors import (
    BundleError,
    ConfigError,
    EnsembleError,
    UnknownNameError,
    describe_validation_error,
    did_you_mean,
)
from zoo.names import TASKS
from zoo.store import best_bundle, bundles_dir, home, resolve_bundle

log = logging.getLogger("serving")

CONFIG_ENV = "MEDZOO_SERVE_CONFIG"
SOURCE_ENV = "MEDZOO_SERVE_SOURCE"
TASK_ENV_PREFIX = "MEDZOO_SERVE_"
ENSEMBLE_TASK = "pathology"  # the ensemble averages pathology models (report 001)
ENSEMBLE_ROUTE = "pathology_ensemble"
DEFAULT_ENSEMBLE_ARCH = "resnet152"
BENTO_MODEL_NAME = "medzoo-serving"  # the BentoML model that carries the bundles into a Bento
MANIFEST = "serving.json"  # inside that model: task → bundle directory, ensemble members

# Routes that a task may not take (BentoML's own and the service's).
RESERVED_ROUTES = frozenset(
    {"models", "stats", "readyz", "livez", "healthz", "metrics", "docs", "docs.json", "schema.json",
     "static_content", "assets", ENSEMBLE_ROUTE, "ensemble", "describe", "config", "source",
     "to_async", "to_sync", "bento_service", "table", "ui", "explain", "frontend", "inference",
     "v2", "drift"}
)
SHORTHAND_TASKS = tuple(TASKS)  # skin, organ, pathology may also be written at the top level (skin: ID)
SECTIONS = ("tasks", "ensemble")  # the top-level keys that are not settings
SET_BY_LOAD = ("source", "bento_dir")  # where the bundles come from: load_config says, not the file
TASK_NAME = re.compile(r"^[a-z][a-z0-9_]{0,39}$")


@dataclass(frozen=True)
class Limits:
    """What one request may hold and take, checked before anything is decoded."""

    max_file_bytes: int = 20 * 2**20
    max_request_bytes: int = 100 * 2**20
    max_images: int = 64
    max_image_pixels: int = 64_000_000
    max_request_pixels: int = 256_000_000
    body_timeout_s: float = 10.0


def check_task_name(name: str) -> str:
    if not TASK_NAME.match(name) or name in RESERVED_ROUTES:
        raise ValueError(
            f"{name!r} cannot be a task name: use lower-case letters, digits and '_' "
            f"and none of {', '.join(sorted(RESERVED_ROUTES))}"
        )
    return name


class EnsembleConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    members: tuple[str, ...] | None = None  # None: every pathology bundle of ``arch``
    arch: str = DEFAULT_ENSEMBLE_ARCH


class _TaskEnvSource(PydanticBaseSettingsSource):
    """``MEDZOO_SERVE_<TASK>`` (a task's bundle; a task the file does not name is added),
    ``MEDZOO_ENSEMBLE_MEMBERS`` (comma-separated) and ``MEDZOO_ENSEMBLE_ARCH``: environment keys that
    are not settings (pydantic-settings reads ``MEDZOO_<SETTING>`` itself)."""

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:  # pragma: no cover - unused
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        tasks = {k[len(TASK_ENV_PREFIX):].lower(): v for k, v in os.environ.items()
                 if k.startswith(TASK_ENV_PREFIX) and k not in (CONFIG_ENV, SOURCE_ENV) and v}
        if tasks:
            out["tasks"] = tasks
        ensemble: dict[str, Any] = {}
        if os.environ.get("MEDZOO_ENSEMBLE_MEMBERS"):
            ensemble["members"] = [m.strip() for m in os.environ["MEDZOO_ENSEMBLE_MEMBERS"].split(",") if m.strip()]
        if os.environ.get("MEDZOO_ENSEMBLE_ARCH"):
            ensemble["arch"] = os.environ["MEDZOO_ENSEMBLE_ARCH"].strip()
        if ensemble:
            out["ensemble"] = ensemble
        return out


class ServeConfig(BaseSettings):
    """Everything the service reads at start-up (pydantic-settings: environment over file over defaults)."""

    model_config = SettingsConfigDict(env_prefix="MEDZOO_", extra="forbid", frozen=True)

    # The settings are these fields (in this order, README table and module docstring alike); each
    # description is what the README's configuration table shows. tasks and ensemble are sections.
    tasks: dict[str, str | None] = Field(
        default_factory=lambda: {t: None for t in TASKS},
        description="bundle id or directory per task (null: the store's best bundle of the task's dataset); each "
                    "task is served at `POST /<task>`; `skin`, `organ` and `pathology` always are, and may also be "
                    "given at the top level (`skin: ID`)")
    ensemble: EnsembleConfig = Field(
        EnsembleConfig(), description="`members`: bundle ids or directories (null: every pathology bundle of "
                                      "`arch`), and `arch`")
    store: Path | None = Field(None, exclude=True, description="the bundle store (null: `$MEDZOO_HOME`)")
    top_k: int = Field(3, ge=1, description="classes per image when the request does not say")
    max_batch_size: int = Field(64, ge=2,  # BentoML's adaptive batching needs room
                                description="adaptive batching: the most images in one ONNX Runtime call")
    max_latency_ms: int = Field(60_000, ge=1, description="adaptive batching: a request whose estimated wait is "
                                                          "longer is shed with 503")
    max_file_mb: float = Field(20, gt=0, description="one uploaded file, in MiB (413 above)")
    max_request_mb: float = Field(100, gt=0, description="one request body, in MiB (413 above)")
    max_images: int = Field(64, ge=1, description="files in one request (413 above)")
    max_image_megapixels: float = Field(64, gt=0, description="one image, read from its header before decoding "
                                                              "(413 above)")
    max_request_megapixels: float = Field(256, gt=0, description="all the images of one request, read from their "
                                                                 "headers (413 above)")
    body_timeout_s: float = Field(10, gt=0, description="an upload that stalls longer is answered 408")
    request_timeout_s: float = Field(60, gt=0, description="a request taking longer, decoding included, is stopped "
                                                           "and answered 504")
    idle_timeout_s: float = Field(5, gt=0, description=(  # header / keep-alive timeout (serving.connections)
        "a connection with no request in progress (nothing sent yet, headers incomplete, idle keep-alive) is "
        "closed after this long"))
    max_connections: int = Field(4096, ge=1, description=(
        "open connections per API worker (capped by its file-descriptor limit less 256; the soft limit is raised "
        "as needed, up to the hard limit): at the limit the oldest idle connection is closed for a new one, and "
        "when none is idle the new one gets 503"))
    shutdown_grace_s: float = Field(20, gt=0, description=(  # the SIGTERM drain (serving.launch)
        "SIGTERM / SIGINT to `zoo serve`: new connections are refused at once, requests in flight get this long "
        "to finish; the server is killed 5 s later if still running"))
    decode_threads: int = Field(2, ge=1, description="images decoded at once per API worker")
    decode_memory_mb: float = Field(512, gt=0, description=(  # serving.decoding
        "memory the images being decoded may hold per API worker, estimated from their headers (one image alone "
        "may take it all)"))
    decode_queue_s: float | None = Field(None, gt=0, description=(  # admission (serving.decoding)
        "admission: a request whose decoding would not finish within this (after what is admitted, at the rate "
        "measured) gets 503 with `Retry-After`; below `request_timeout_s` (null: a third of it)"))
    refuse_ood: bool = Field(False, description="an image flagged out of distribution is answered 422 instead of "
                                                "classified")
    api_workers: int = Field(1, ge=1, description="processes reading and decoding requests (the API layer)")
    access_log: bool = Field(True, description="BentoML's per-request access log lines")
    drift_window: int = Field(500, ge=1, description=(  # serving.drift: one window per task, in the inference worker
        "the last images per task whose predicted-class mix and out-of-distribution scores `GET /drift` and the "
        "`medzoo_drift_p_value` gauge test against the validation split"))
    ort_threads: int | None = Field(None, ge=1, description="ONNX Runtime intra-op threads per model (null: its "
                                                            "default, one per physical core)")
    ort_spinning: bool = Field(False, description="idle ONNX Runtime threads spin-wait (they share the CPU with the "
                                                  "API workers)")
    audit_log: Path | None = Field(None, description=(  # serving.audit; read by zoo.audit (`zoo audit DIR`)
        "a folder for the audit trail: one JSON line per answered or refused image (time, request id, client, "
        "file name and sha256, task, model, answer, status; never the image), one file per API worker; a "
        "relative path is taken from the config file's folder (null: no trail)"))
    audit_max_mb: float = Field(100, gt=0, description="an audit file reaching this size is closed and the next "
                                                       "lines go to a new one (files in use are never renamed)")
    audit_flush_s: float = Field(1, gt=0, description=(
        "each audit line is written at once and the file fsynced this often: a killed server loses at most the "
        "lines of the moment, a machine crash at most this interval"))
    source: str = Field("store", exclude=True)  # "store" or "bento" (set by load_config)
    bento_dir: Path | None = Field(None, exclude=True)

    @classmethod
    def settings_customise_sources(
        cls, settings_cls: type[BaseSettings], init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource, dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # first wins: the environment, then the file layer passed as init values, then defaults
        return env_settings, _TaskEnvSource(settings_cls), init_settings

    @model_validator(mode="before")
    @classmethod
    def _default_tasks(cls, data: Any) -> Any:
        """Every default task is served (the store's best bundle unless configured)."""
        if isinstance(data, dict) and isinstance(data.get("tasks", {}), dict):
            return {**data, "tasks": {**{t: None for t in TASKS}, **data.get("tasks", {})}}
        return data

    @field_validator("tasks")
    @classmethod
    def _check_tasks(cls, tasks: dict[str, str | None]) -> dict[str, str | None]:
        for name in tasks:
            check_task_name(name)
        return tasks

    @model_validator(mode="after")
    def _admission_within_the_time_limit(self) -> ServeConfig:
        if self.decode_queue_s is not None and self.decode_queue_s >= self.request_timeout_s:
            raise ValueError(f"decode_queue_s ({self.decode_queue_s:g}) must be below request_timeout_s "
                             f"({self.request_timeout_s:g}): what is admitted must be able to finish in time")
        return self

    @field_validator("store", "audit_log", mode="before")
    @classmethod
    def _expand(cls, v: Any) -> Any:
        return Path(str(v)).expanduser() if v else None

    @property
    def task_names(self) -> tuple[str, ...]:
        return tuple(self.tasks)

    @property
    def ensemble_members(self) -> tuple[str, ...] | None:
        return self.ensemble.members

    @property
    def ensemble_arch(self) -> str:
        return self.ensemble.arch

    @property
    def admission_s(self) -> float:
        """How soon an admitted request's decoding must be due to finish (``decode_queue_s``)."""
        return self.decode_queue_s if self.decode_queue_s is not None else self.request_timeout_s / 3

    @property
    def limits(self) -> Limits:
        return Limits(
            max_file_bytes=int(self.max_file_mb * 2**20), max_request_bytes=int(self.max_request_mb * 2**20),
            max_images=self.max_images, max_image_pixels=int(self.max_image_megapixels * 1e6),
            max_request_pixels=int(self.max_request_megapixels * 1e6), body_timeout_s=self.body_timeout_s,
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly view, shown by ``/models``."""
        out = self.model_dump(mode="json")
        out["ensemble"] = {"members": list(self.ensemble.members) if self.ensemble.members is not None else None,
                           "arch": self.ensemble.arch}
        return {**out, "store": str(self.store or home()), "source": self.source}


# The settings: every field but the sections and what load_config sets. Each is a top-level key of the
# file and a MEDZOO_<SETTING> variable; no other list of them exists (tests/test_config.py checks the
# README, the docstring above and serving/package.py against it).
SETTINGS: tuple[str, ...] = tuple(n for n in ServeConfig.model_fields if n not in (*SECTIONS, *SET_BY_LOAD))


def read_yaml(path: str | Path) -> dict[str, Any]:
    """The YAML config file as a mapping (an empty file is an empty mapping)."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise ConfigError(f"serving config {p} does not exist")
    try:
        raw = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"serving config {p} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"serving config {p} must be a mapping of settings (and tasks:)")
    return {str(k): v for k, v in raw.items()}


def in_bento() -> bool:
    """True when this code runs from inside a built Bento (``<bento>/src/serving/config.py``)."""
    return (Path(__file__).resolve().parents[2] / "bento.yaml").is_file()


def bento_model_tag() -> str:
    """The ``medzoo-serving`` tag this Bento was built with (``:latest`` outside a Bento)."""
    bento_yaml = Path(__file__).resolve().parents[2] / "bento.yaml"
    if bento_yaml.is_file():
        info = yaml.safe_load(bento_yaml.read_text()) or {}
        for m in info.get("models", []):
            tag = str(m.get("tag", "")) if isinstance(m, dict) else str(m)
            if tag.split(":")[0] == BENTO_MODEL_NAME:
                return tag
    return f"{BENTO_MODEL_NAME}:latest"


def bento_model_dir() -> Path:
    """Directory of the ``medzoo-serving`` model in the active BentoML model store."""
    import bentoml
    from bentoml.exceptions import NotFound

    tag = bento_model_tag()
    try:
        return Path(bentoml.models.get(tag).path)
    except NotFound:
        raise ConfigError(
            f"the BentoML model {tag} is not in the model store; package one with `zoo serve --package`"
        ) from None


def _bento_layer(bento_dir: Path) -> dict[str, Any]:
    """What a packaged Bento serves: the manifest's tasks, ensemble and settings."""
    manifest = json.loads((bento_dir / MANIFEST).read_text())
    return {
        "tasks": {t: str(bento_dir / rel) if rel else None for t, rel in manifest["tasks"].items()},
        "ensemble": {"members": [str(bento_dir / rel) for rel in manifest["ensemble"]],
                     "arch": manifest.get("ensemble_arch", DEFAULT_ENSEMBLE_ARCH)},
        **manifest.get("settings", {}),
    }


def _file_layer(raw: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """The file's keys with the shorthand tasks moved under ``tasks``, and one line per mistake: a key
    that is neither a section, a shorthand task nor a setting, a task given both ways."""
    allowed = (*SECTIONS, *SHORTHAND_TASKS, *SETTINGS)
    problems = []
    for key in raw:
        if key not in allowed:
            hint = did_you_mean(key, allowed).removeprefix("; ")
            problems.append(f"{key}: unknown setting" + (f" ({hint})" if hint else ""))
    if problems:  # the mistake this layout prevents: an extra task written at the top level
        problems[-1] += "; extra tasks go under 'tasks:'"
    layer = {k: v for k, v in raw.items() if k in allowed and k not in SHORTHAND_TASKS}
    tasks = raw.get("tasks") or {}
    if isinstance(tasks, dict):  # else pydantic says what is wrong with it
        problems += [f"{t}: given twice, at the top level and under 'tasks:'"
                     for t in SHORTHAND_TASKS if t in raw and t in tasks]
        tasks = {**{t: raw[t] for t in SHORTHAND_TASKS if t in raw}, **tasks}
    return {**layer, "tasks": tasks}, problems


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``over``'s keys over ``base``'s; tasks are merged task by task (a file naming one task keeps the rest)."""
    out = {**base, **over}
    if isinstance(base.get("tasks"), dict) and isinstance(over.get("tasks"), dict):
        out["tasks"] = {**base["tasks"], **over["tasks"]}
    return out


def _source() -> str:
    """Where the bundles are read from: ``store`` or ``bento`` (``$MEDZOO_SERVE_SOURCE``, default auto)."""
    source = os.environ.get(SOURCE_ENV, "auto").strip().lower()
    if source not in ("auto", "store", "bento"):
        raise ConfigError(f"{SOURCE_ENV} must be auto, store or bento, not {source!r}")
    if source == "auto":
        source = "bento" if in_bento() else "store"
    return source


def load_config(path: str | Path | None = None) -> ServeConfig:
    """Defaults, then the YAML file (``path`` or ``$MEDZOO_SERVE_CONFIG``), then ``MEDZOO_*``
    environment variables; a mistake is a :class:`ConfigError`, one line with every mistake."""
    source = _source()
    bento_dir = bento_model_dir() if source == "bento" else None
    layer = _bento_layer(bento_dir) if bento_dir is not None else {}
    problems: list[str] = []
    cfg_path = path or os.environ.get(CONFIG_ENV)
    if cfg_path:
        file_layer, problems = _file_layer(read_yaml(cfg_path))
        if isinstance(file_layer.get("audit_log"), str):  # relative: beside the config file, whatever the cwd
            folder = Path(cfg_path).expanduser().resolve().parent
            file_layer["audit_log"] = str(folder / Path(file_layer["audit_log"]).expanduser())
        layer = _merge(layer, file_layer)
    cfg: ServeConfig | None = None
    try:
        cfg = ServeConfig(**layer, source=source, bento_dir=bento_dir)
    except ValidationError as e:
        problems += describe_validation_error(e, ServeConfig).splitlines()
    if cfg is None or problems:
        where = f"serving config {cfg_path}" if cfg_path else "serving config"
        raise ConfigError(f"{where}: " + "; ".join(problems))
    return cfg


@dataclass(frozen=True)
class Resolved:
    """Where one task's (or ensemble member's) bundle is, or why there is none."""

    task: str
    path: Path | None
    message: str = ""


def train_hint(task: str) -> str:
    """What to run to get a servable bundle for a task."""
    dataset = TASKS.get(task, task)
    hint = f"train one with `zoo train {task} simplecnn` and export it with `zoo export BUNDLE` (dataset {dataset})"
    return hint + (", or let `zoo serve` build a default one" if task in TASKS else "")


def ensemble_hint(arch: str) -> str:
    return (
        f"train two with `zoo train path {arch} --seed 1` and `zoo train path {arch} --seed 2`, "
        "then `zoo export` each"
    )


def resolve_task(cfg: ServeConfig, task: str) -> Resolved:
    """The bundle directory serving ``task`` (configured, else the store's best), or why not."""
    ref = cfg.tasks[task]
    if ref is None:
        try:
            best = best_bundle(task, cfg.store)
        except UnknownNameError:  # an extra task whose name is not a dataset
            return Resolved(task, None,
                            f"task {task!r} has no bundle configured: set it under tasks: in the serving config "
                            f"({task}: BUNDLE) or in MEDZOO_SERVE_{task.upper()}")
        if best is None:
            where = bundles_dir(cfg.store)
            return Resolved(task, None, f"no {TASKS.get(task, task)} bundle in {where}: {train_hint(task)}")
        return Resolved(task, best)
    try:
        return Resolved(task, resolve_bundle(ref, cfg.store))
    except BundleError as e:
        return Resolved(task, None, f"{e}; {train_hint(task)}")


def resolve_ensemble(cfg: ServeConfig) -> tuple[list[Resolved], str]:
    """Ensemble members (configured, else every pathology bundle of the ensemble arch, chosen by
    :func:`zoo.ensemble.choose_members`) and the problems met."""
    problems: list[str] = []
    out: list[Resolved] = []
    if cfg.ensemble_members is not None:
        for ref in cfg.ensemble_members:
            try:
                out.append(Resolved(ENSEMBLE_ROUTE, resolve_bundle(ref, cfg.store)))
            except BundleError as e:
                problems.append(str(e))
        return out, "; ".join(problems)
    try:
        paths = choose_members(ENSEMBLE_TASK, cfg.store, arch=cfg.ensemble_arch)
    except (EnsembleError, BundleError) as e:
        return [], str(e)
    return [Resolved(ENSEMBLE_ROUTE, p) for p in paths], ""
