"""Serving configuration: which bundle serves which task, batching and upload limits.

Sources, later ones winning: built-in defaults, the YAML file named by ``MEDZOO_SERVE_CONFIG``
(or ``zoo serve --config``), then environment variables.

YAML layout (every key optional)::

    skin: dermamnist-simplecnn-…          # a bundle id in the store, or a bundle directory
    organ: /path/to/bundle
    pathology: null                       # null / absent: the best pathology bundle of the store
    breast: breastmnist-simplecnn-…       # any other key is an extra task served at /breast
    ensemble:
      members: [id-1, id-2]               # default: every pathology bundle with arch ``arch``
      arch: resnet152
    top_k: 3
    max_batch_size: 64
    max_latency_ms: 60000                 # a request queued longer is shed with 503
    max_file_mb: 20
    max_request_mb: 100
    max_images: 64
    api_workers: 1                        # processes decoding requests (the API layer)
    access_log: true                      # BentoML's per-request access log lines
    ort_threads: null                     # ONNX Runtime intra-op threads (null: its default)

Environment: ``MEDZOO_SERVE_<TASK>`` (e.g. ``MEDZOO_SERVE_SKIN``) sets a task's bundle,
``MEDZOO_ENSEMBLE_MEMBERS`` (comma-separated) and ``MEDZOO_ENSEMBLE_ARCH`` the ensemble,
``MEDZOO_TOP_K``, ``MEDZOO_MAX_BATCH_SIZE``, ``MEDZOO_MAX_LATENCY_MS``, ``MEDZOO_MAX_FILE_MB``,
``MEDZOO_MAX_REQUEST_MB``, ``MEDZOO_MAX_IMAGES``, ``MEDZOO_API_WORKERS``, ``MEDZOO_ACCESS_LOG``, ``MEDZOO_ORT_THREADS`` the
settings, ``MEDZOO_HOME`` the store and
``MEDZOO_SERVE_SOURCE`` (``auto``, ``store`` or ``bento``) where the bundles are read from.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from zoo.store import (
    TASKS,
    best_bundle,
    bundles_dir,
    home,
    list_bundles,
    resolve_bundle,
)

log = logging.getLogger("serving")

CONFIG_ENV = "MEDZOO_SERVE_CONFIG"
ENSEMBLE_TASK = "pathology"  # the ensemble averages pathology models (report 001)
ENSEMBLE_ROUTE = "pathology_ensemble"
DEFAULT_ENSEMBLE_ARCH = "resnet152"
BENTO_MODEL_NAME = "medzoo-serving"  # the BentoML model that carries the bundles into a Bento
MANIFEST = "serving.json"  # inside that model: task → bundle directory, ensemble members

# Routes that a task may not take (BentoML's own and the service's).
RESERVED_ROUTES = frozenset(
    {"models", "stats", "readyz", "livez", "healthz", "metrics", "docs", "docs.json", "schema.json",
     "static_content", "assets", ENSEMBLE_ROUTE, "ensemble", "describe", "config", "source",
     "to_async", "to_sync", "bento_service", "table"}
)
SETTINGS = ("top_k", "max_batch_size", "max_latency_ms", "max_file_mb", "max_request_mb", "max_images",
            "api_workers", "access_log", "ort_threads")
TASK_NAME = re.compile(r"^[a-z][a-z0-9_]{0,39}$")


class ConfigError(ValueError):
    """A serving configuration that cannot be used; the message says what to change."""


@dataclass(frozen=True)
class Limits:
    """Upload limits, checked before anything is decoded."""

    max_file_bytes: int = 20 * 2**20
    max_request_bytes: int = 100 * 2**20
    max_images: int = 64


@dataclass(frozen=True)
class ServeConfig:
    """Everything the service reads at start-up."""

    tasks: dict[str, str | None]  # task → bundle ref (id or path); None: best of the store
    ensemble_members: tuple[str, ...] | None = None  # None: every pathology bundle of ``ensemble_arch``
    ensemble_arch: str = DEFAULT_ENSEMBLE_ARCH
    top_k: int = 3
    max_batch_size: int = 64
    max_latency_ms: int = 60_000  # BentoML sheds (503) requests whose estimated wait exceeds it
    limits: Limits = field(default_factory=Limits)
    api_workers: int = 1
    access_log: bool = True
    ort_threads: int | None = None  # None: ONNX Runtime's default (one per physical core)
    store: Path | None = None  # None: $MEDZOO_HOME
    source: str = "store"  # "store" (the medzoo store) or "bento" (the BentoML model store)
    bento_dir: Path | None = None  # the BentoML model directory when source == "bento"

    @property
    def task_names(self) -> tuple[str, ...]:
        return tuple(self.tasks)

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly view, shown by ``/models``."""
        return {
            "tasks": dict(self.tasks),
            "ensemble": {"members": list(self.ensemble_members) if self.ensemble_members is not None else None,
                         "arch": self.ensemble_arch},
            "top_k": self.top_k,
            "max_batch_size": self.max_batch_size,
            "max_latency_ms": self.max_latency_ms,
            "max_file_mb": self.limits.max_file_bytes / 2**20,
            "max_request_mb": self.limits.max_request_bytes / 2**20,
            "max_images": self.limits.max_images,
            "api_workers": self.api_workers,
            "access_log": self.access_log,
            "ort_threads": self.ort_threads,
            "store": str(self.store or home()),
            "source": self.source,
        }


def _positive_int(name: str, value: Any) -> int:
    try:
        v = int(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be a positive integer, not {value!r}") from None
    if v < 1:
        raise ConfigError(f"{name} must be a positive integer, not {value!r}")
    return v


def _positive_float(name: str, value: Any) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be a positive number, not {value!r}") from None
    if not v > 0:
        raise ConfigError(f"{name} must be a positive number, not {value!r}")
    return v


def _flag(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{name} must be true or false, not {value!r}")


def check_task_name(name: str) -> str:
    if not TASK_NAME.match(name) or name in RESERVED_ROUTES:
        raise ConfigError(
            f"{name!r} cannot be a task name: use lower-case letters, digits and '_' "
            f"and none of {', '.join(sorted(RESERVED_ROUTES))}"
        )
    return name


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
        raise ConfigError(f"serving config {p} must be a mapping of task: bundle and settings")
    return raw


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


def load_config(
    path: str | Path | None = None, env: Mapping[str, str] | None = None
) -> ServeConfig:
    """Defaults, then the YAML file (``path`` or ``$MEDZOO_SERVE_CONFIG``), then the environment."""
    env = os.environ if env is None else env
    raw: dict[str, Any] = {}
    source = env.get("MEDZOO_SERVE_SOURCE", "auto").strip().lower()
    if source not in ("auto", "store", "bento"):
        raise ConfigError(f"MEDZOO_SERVE_SOURCE must be auto, store or bento, not {source!r}")
    if source == "auto":
        source = "bento" if in_bento() else "store"
    bento_dir = None
    if source == "bento":
        bento_dir = bento_model_dir()
        manifest = json.loads((bento_dir / MANIFEST).read_text())
        raw.update({t: str(bento_dir / rel) if rel else None for t, rel in manifest["tasks"].items()})
        raw["ensemble"] = {"members": [str(bento_dir / rel) for rel in manifest["ensemble"]],
                           "arch": manifest.get("ensemble_arch", DEFAULT_ENSEMBLE_ARCH)}
        raw.update(manifest.get("settings", {}))
    cfg_path = path or env.get(CONFIG_ENV)
    if cfg_path:
        raw.update(read_yaml(cfg_path))

    tasks: dict[str, str | None] = {t: None for t in TASKS}
    ensemble: dict[str, Any] = {}
    settings: dict[str, Any] = {}
    store: Path | None = None
    for key, value in raw.items():
        key = str(key)
        if key == "ensemble":
            if value is None:
                continue
            if not isinstance(value, dict) or set(value) - {"members", "arch"}:
                raise ConfigError("ensemble must be a mapping with 'members' (a list) and/or 'arch'")
            ensemble = dict(value)
        elif key in SETTINGS:
            settings[key] = value
        elif key == "store":
            store = Path(str(value)).expanduser() if value else None
        else:
            if value is not None and not isinstance(value, (str, Path)):
                raise ConfigError(f"task {key!r} must name one bundle (an id or a directory), not {value!r}")
            tasks[check_task_name(key)] = str(value) if value is not None else None
    for task in list(tasks):
        ref = env.get(f"MEDZOO_SERVE_{task.upper()}")
        if ref:
            tasks[task] = ref
    if env.get("MEDZOO_ENSEMBLE_MEMBERS"):
        ensemble["members"] = [m.strip() for m in env["MEDZOO_ENSEMBLE_MEMBERS"].split(",") if m.strip()]
    if env.get("MEDZOO_ENSEMBLE_ARCH"):
        ensemble["arch"] = env["MEDZOO_ENSEMBLE_ARCH"].strip()
    for key in SETTINGS:
        if env.get(f"MEDZOO_{key.upper()}"):
            settings[key] = env[f"MEDZOO_{key.upper()}"]
    members = ensemble.get("members")
    if members is not None and (not isinstance(members, list) or not all(isinstance(m, str) for m in members)):
        raise ConfigError("ensemble.members must be a list of bundle ids or directories")
    limits = Limits(
        max_file_bytes=int(_positive_float("max_file_mb", settings.get("max_file_mb", 20)) * 2**20),
        max_request_bytes=int(_positive_float("max_request_mb", settings.get("max_request_mb", 100)) * 2**20),
        max_images=_positive_int("max_images", settings.get("max_images", 64)),
    )
    max_batch = _positive_int("max_batch_size", settings.get("max_batch_size", 64))
    if max_batch < 2:
        raise ConfigError("max_batch_size must be at least 2 (BentoML's adaptive batching needs room)")
    return ServeConfig(
        tasks=tasks,
        ensemble_members=tuple(members) if members is not None else None,
        ensemble_arch=str(ensemble.get("arch") or DEFAULT_ENSEMBLE_ARCH),
        top_k=_positive_int("top_k", settings.get("top_k", 3)),
        max_batch_size=max_batch,
        max_latency_ms=_positive_int("max_latency_ms", settings.get("max_latency_ms", 60_000)),
        limits=limits,
        api_workers=_positive_int("api_workers", settings.get("api_workers", 1)),
        access_log=_flag("access_log", settings.get("access_log", True)),
        ort_threads=(_positive_int("ort_threads", settings["ort_threads"])
                     if settings.get("ort_threads") not in (None, "") else None),
        store=store,
        source=source,
        bento_dir=bento_dir,
    )


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
        except ValueError:  # an extra task whose name is not a dataset
            return Resolved(task, None, f"task {task!r} has no bundle configured: set {task}: BUNDLE in the serving config")
        if best is None:
            where = bundles_dir(cfg.store)
            return Resolved(task, None, f"no {TASKS.get(task, task)} bundle in {where}: {train_hint(task)}")
        return Resolved(task, best)
    from zoo.bundle import BundleError

    try:
        return Resolved(task, resolve_bundle(ref, cfg.store))
    except BundleError as e:
        return Resolved(task, None, f"{e}; {train_hint(task)}")


def resolve_ensemble(cfg: ServeConfig) -> tuple[list[Resolved], str]:
    """Ensemble members (configured, else every pathology bundle of the ensemble arch) and problems."""
    from zoo.bundle import BundleError
    from zoo.data import resolve_name

    problems: list[str] = []
    out: list[Resolved] = []
    if cfg.ensemble_members is not None:
        for ref in cfg.ensemble_members:
            try:
                out.append(Resolved(ENSEMBLE_ROUTE, resolve_bundle(ref, cfg.store)))
            except BundleError as e:
                problems.append(str(e))
    else:
        flag = resolve_name(TASKS[ENSEMBLE_TASK])
        out = [
            Resolved(ENSEMBLE_ROUTE, p)
            for p, card in list_bundles(cfg.store)
            if card.get("dataset", {}).get("name") == flag and card.get("arch") == cfg.ensemble_arch
        ]
    return out, "; ".join(problems)
