"""``zoo tune``: an Optuna study over the search space a recipe writes in its ``tune:`` section.

Each trial sets the sampled values at their recipe paths (:func:`zoo.recipe.apply_overrides`, typed values) and trains
that recipe with the engine (:func:`zoo.train.train`). After every epoch the engine's validation
metric goes to Optuna (``trial.report``) and the study's pruner may stop the trial there
(``optuna.TrialPruned`` raised from the ``on_epoch`` callback). A finished trial's value is the
validation metric of the epoch the engine selected: model selection on validation only (the
engine evaluates each bundle on the test split once, which the search never reads).

Where things live (``store``: ``$MEDZOO_HOME`` or ``--store``)::

    <store>/studies/<study>.journal      the default storage (an Optuna journal file)
    <store>/studies/<study>/trials/<n>/  trial n's run directory and bundle while it trains
    <store>/studies/<study>/lock         serialises keeping / removing bundles between workers
    <store>/bundles/<id>                 the study's best bundle; its card's ``tuning`` names the
                                         study, the storage, the trial and the chosen values

Only the best is kept: when a trial ends, a trial that is now the study's best moves its bundle into
the store (the card gains ``tuning``, ``README.md`` is rewritten) and the study's previous best
bundle in that store is removed; any other trial's folder (pruned, failed or beaten: run directory,
snapshots, bundle) is removed. Several workers (``zoo tune`` processes, on one or several machines)
share a study through ``--storage`` (an RDB URL, or a journal file on a shared filesystem) and the
same study name; each keeps the best bundle in its own store, and when its run ends a store whose
bundle is no longer the study's best drops it, so the best bundle lives in the store of the machine
that trained it (``zoo tune --json`` says which).

Workers started together on a new storage do not race to create it: on an SQLite file they take
turns (a lock file beside the database, ``<db>.lock``) creating its tables and the study; on a
server RDB (PostgreSQL, MySQL) a worker that lost the race to create a table, a version row or the
study's attributes tries again a few times (:func:`_retry_creation`). Journals (a file, Redis) need
neither: Optuna creates a study there by appending to the log, and the first entry wins.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import random
import re
import shutil
import socket
import sys
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import optuna
from optuna.trial import FrozenTrial, TrialState

from zoo.card import Card, TrackingInfo, Tuning, read_card, update_card
from zoo.errors import RecipeError, UserError
from zoo.io import file_lock, pid_alive
from zoo.modelcard import write_model_card
from zoo.names import resolve_name, short_name
from zoo.recipe import PrunerCfg, Recipe, TuneCfg, TuneParam, apply_overrides
from zoo.store import bundles_dir, home, list_bundles
from zoo.train import train
from zoo.train.loop import EpochCallback
from zoo.train.tracking import (
    NoTracker,
    Parent,
    RunSpec,
    Tracker,
    backend_of,
    dataset_label,
    open_tracker,
    params_of,
    tracked,
)

log = logging.getLogger(__name__)

ATTR_IDENTITY = "medzoo.identity"  # study user attribute: what the study tunes (recipe, space, metric)
ATTR_TRACKING = "medzoo.tracking"  # study user attribute: the study's tracked run (zoo.card.TrackingInfo JSON)
SQLITE_HEADER = b"SQLite format 3\x00"
CREATE_TRIES = 6  # an RDB (a server one above all): tries at creating the tables and the study before giving up
T = TypeVar("T")


class TrialFailure(RuntimeError):
    """A trial that failed for its own reasons (out of memory, a diverged run …): recorded as FAIL,
    the study goes on. User errors (a missing dataset, a bad recipe) stop the worker instead."""


def studies_dir(store: Path | None = None) -> Path:
    return (store or home()) / "studies"


def safe_name(name: str) -> str:
    """A study name as a file name."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "study"


def default_study_name(dataset: str, arch: str) -> str:
    """``<dataset>-<arch>`` (``organamnist-mlp``), the study ``zoo tune DATASET ARCH`` joins by default."""
    try:
        data = short_name(resolve_name(dataset))
    except UserError:
        data = Path(dataset).name or dataset
    return f"{data}-{arch}"


def default_storage(study: str, store: Path | None = None) -> str:
    return str(studies_dir(store) / f"{safe_name(study)}.journal")


def shown_storage(url: str) -> str:
    """The storage as the card and the summary show it: a journal file's absolute path, or an URL
    with its password hidden."""
    if "://" not in url:
        return str(Path(url).expanduser().resolve())
    parts = urlsplit(url)
    if parts.password:
        netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
        return urlunsplit(parts._replace(netloc=netloc))
    return url


def open_storage(url: str) -> optuna.storages.BaseStorage:
    """An Optuna storage: an RDB URL (``postgresql://…``, ``mysql+pymysql://…``, ``sqlite:///…``;
    workers heartbeat, so the trial of a killed worker is marked failed and run again), a Redis
    journal (``redis://…``) or a journal file (any other value: a path). Safe when several workers
    create the same new storage at once (see the module docstring)."""
    with _creation_lock(url):
        return _retry_creation(url, lambda: _make_storage(url))


def _make_storage(url: str) -> optuna.storages.BaseStorage:
    """:func:`open_storage` without the lock and the retry; errors are the user's (:class:`UserError`),
    except a lost creation race (:func:`_creation_race`), raised as is for the retry."""
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend, JournalRedisBackend

    try:
        if "://" not in url:
            path = Path(url).expanduser()
            path.parent.mkdir(parents=True, exist_ok=True)
            if path.is_file() and _header(path) == SQLITE_HEADER:
                raise UserError(f"{path} is an SQLite database: pass --storage sqlite:///{path.resolve()}")
            return JournalStorage(JournalFileBackend(str(path)))
        if url.startswith("redis"):
            return JournalStorage(JournalRedisBackend(url))
        return _rdb(url)
    except (ImportError, ValueError, OSError) as e:  # a missing DB driver, a malformed URL, an unwritable path
        raise UserError(f"cannot open the Optuna storage {shown_storage(url)}: {e}") from None
    except Exception as e:  # SQLAlchemy's OperationalError and friends: a server that does not answer
        if type(e).__module__.startswith(("sqlalchemy", "redis")) and not _creation_race(e):
            raise UserError(f"cannot open the Optuna storage {shown_storage(url)}: {str(e).splitlines()[0]}") from None
        raise


def _sqlite_file(url: str) -> Path | None:
    """The database file of an ``sqlite:///`` URL; None for another storage or an in-memory database."""
    if not url.startswith("sqlite"):
        return None
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        db = make_url(url).database
    except ArgumentError:  # a malformed URL: opening it says so
        return None
    if not db or db == ":memory:" or db.startswith("file:"):
        return None
    return Path(db)


def _creation_lock(url: str) -> contextlib.ExitStack:
    """Held while a worker opens the storage and creates or joins the study: for an SQLite file, the
    lock file ``<db>.lock`` beside it, so that workers started together take turns creating its tables
    (SQLAlchemy's ``create_all`` checks, then creates: two at once fail with "table … already exists")."""
    stack = contextlib.ExitStack()
    db = _sqlite_file(url)
    if db is not None:
        try:
            stack.enter_context(file_lock(db.with_name(db.name + ".lock")))
        except OSError as e:
            raise UserError(f"cannot open the Optuna storage {shown_storage(url)}: {e}") from None
    return stack


def _creation_race(e: BaseException) -> bool:
    """Whether ``e`` is what a worker gets when another one created the same table, row or study
    attribute between its check and its write (an RDB, most of all a server one)."""
    from sqlalchemy import exc

    if isinstance(e, exc.IntegrityError):  # a unique row another worker inserted first (version, attribute)
        return True
    # CREATE TABLE / INDEX of one another worker made: OperationalError (SQLite, MySQL), ProgrammingError (PostgreSQL)
    return isinstance(e, (exc.OperationalError, exc.ProgrammingError)) and "already exists" in str(e).lower()


def _retry_creation(url: str, make: Callable[[], T]) -> T:
    """``make()``, tried again after a short random pause (up to :data:`CREATE_TRIES` tries) while it
    loses a creation race (:func:`_creation_race`) to another worker: the next try finds what the
    other created. Still losing after that: a :class:`UserError` that says so."""
    for attempt in range(1, CREATE_TRIES + 1):
        try:
            return make()
        except Exception as e:
            if not _creation_race(e):
                raise
            first = str(e).splitlines()[0]
            if attempt == CREATE_TRIES:
                raise UserError(f"cannot create the Optuna storage or study in {shown_storage(url)}: other workers "
                                f"were creating it at the same time, and it still failed after {CREATE_TRIES} "
                                f"tries ({first}); start this worker again") from e
            log.info("another worker is creating %s (%s): trying again", shown_storage(url), first)
            # random: workers that collided once do not collide again in step
            time.sleep(0.1 * 2**attempt * random.uniform(0.5, 1.5))
    raise AssertionError("unreachable")


def _rdb(url: str) -> optuna.storages.BaseStorage:
    """An RDB storage whose workers heartbeat every minute: a trial silent for 3 minutes (its worker
    was killed) is marked failed and queued once more for another worker."""
    from optuna.storages import RDBStorage

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        try:  # Optuna >= 4.9
            from optuna.storages import RetryHeartbeatStaleTrialCallback

            retry = {"heartbeat_stale_trial_callback": RetryHeartbeatStaleTrialCallback(max_retry=1)}
        except ImportError:
            from optuna.storages import RetryFailedTrialCallback

            retry = {"failed_trial_callback": RetryFailedTrialCallback(max_retry=1)}
        return RDBStorage(url, heartbeat_interval=60, grace_period=180, **retry)


def _header(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read(len(SQLITE_HEADER))


def make_sampler(cfg: TuneCfg, seed: int | None) -> optuna.samplers.BaseSampler:
    if cfg.sampler == "grid":
        space = {path: [_encode(v) for v in p.grid()] for path, p in cfg.params.items()}
        return optuna.samplers.GridSampler(space, seed=seed)
    if cfg.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed)


def make_pruner(cfg: PrunerCfg) -> optuna.pruners.BasePruner:
    if cfg.name == "median":
        return optuna.pruners.MedianPruner(cfg.n_startup_trials, cfg.n_warmup_steps)
    if cfg.name == "percentile":
        return optuna.pruners.PercentilePruner(cfg.percentile, cfg.n_startup_trials, cfg.n_warmup_steps)
    if cfg.name == "threshold":
        return optuna.pruners.ThresholdPruner(lower=cfg.lower, upper=cfg.upper, n_warmup_steps=cfg.n_warmup_steps)
    if cfg.name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=cfg.min_resource, reduction_factor=cfg.reduction_factor)
    return optuna.pruners.NopPruner()


def _encode(v: Any) -> Any:
    """A categorical choice as Optuna stores it: lists (layer widths) as their JSON text."""
    return json.dumps(v) if isinstance(v, list) else v


def suggest(trial: optuna.Trial, params: dict[str, TuneParam]) -> dict[str, Any]:
    """The trial's value for every recipe path of the search space."""
    values: dict[str, Any] = {}
    for path, p in params.items():
        if p.type == "float":
            assert p.low is not None and p.high is not None
            values[path] = trial.suggest_float(path, p.low, p.high, step=p.step, log=p.log)
        elif p.type == "int":
            values[path] = trial.suggest_int(path, int(p.low or 0), int(p.high or 0), step=int(p.step or 1), log=p.log)
        else:
            choices = p.choices or []
            picked = trial.suggest_categorical(path, [_encode(c) for c in choices])
            values[path] = next(c for c in choices if _encode(c) == picked)
    return values


def identity(recipe: Recipe) -> str:
    """What a study tunes, as stable text: the recipe without its search space (digest), the space,
    the metric and the direction. Workers joining a study must bring the same."""
    assert recipe.tune is not None
    base = recipe.model_dump(mode="json", exclude={"tune": True, "train": {"track"}})  # tracking is no part of it
    return json.dumps({"recipe": recipe.name, "dataset": recipe.dataset, "arch": recipe.arch,
                       "base_sha256": hashlib.sha256(json.dumps(base, sort_keys=True).encode()).hexdigest(),
                       "space": recipe.tune.model_dump(mode="json")["params"], "metric": recipe.tune_metric,
                       "direction": recipe.tune_direction}, sort_keys=True)


def open_study(recipe: Recipe, study_name: str, storage: str, seed: int | None = None) -> optuna.Study:
    """Create the study or join it (``load_if_exists``); a study made for another recipe, search
    space or metric is refused. Safe when several workers start it at once (:func:`open_storage`)."""
    tune_cfg = recipe.tune
    if tune_cfg is None:
        raise RecipeError(f"recipe {recipe.name} has no tune: section (the search space); add one, "
                          "or pass --recipe FILE with it (see docs)")

    def attempt() -> optuna.Study:
        study = optuna.create_study(study_name=study_name, storage=_make_storage(storage),
                                    sampler=make_sampler(tune_cfg, seed), pruner=make_pruner(tune_cfg.pruner),
                                    direction=recipe.tune_direction, load_if_exists=True)
        _claim(study, recipe, storage)
        return study

    with _creation_lock(storage):
        return _retry_creation(storage, attempt)


def _claim(study: optuna.Study, recipe: Recipe, storage: str) -> None:
    """Mark a new study as tuning this recipe (:func:`identity`), or refuse one that tunes another."""
    mine = identity(recipe)
    theirs = study.user_attrs.get(ATTR_IDENTITY)
    if theirs is None:
        # on a server RDB a worker writing it at the same moment makes this an IntegrityError (retried);
        # a journal keeps the last write: read back what the study holds
        study.set_user_attr(ATTR_IDENTITY, mine)
        theirs = study.user_attrs.get(ATTR_IDENTITY)
    if theirs != mine:
        old = json.loads(theirs)
        diff = [k for k, v in json.loads(mine).items() if old.get(k) != v]
        raise RecipeError(f"study {study.study_name!r} in {shown_storage(storage)} tunes recipe {old.get('recipe')} "
                          f"with another {', '.join(diff)}; give another --study, or the same recipe and space")


@dataclass
class TuneSummary:
    """What a ``zoo tune`` worker did and where the study stands (``--json`` prints :meth:`to_dict`)."""

    study: str
    storage: str
    metric: str
    direction: str
    trials: dict[str, int]  # the study's trials by state
    ran: list[int]  # trial numbers this worker ran
    best: dict[str, Any] | None  # number, value, params, bundle, host, here (the bundle is in this store)

    def to_dict(self) -> dict[str, Any]:
        return {"study": self.study, "storage": self.storage, "metric": self.metric, "direction": self.direction,
                "trials": self.trials, "ran": self.ran, "best": self.best,
                "dashboard": f"optuna-dashboard {self.storage}"}

    def describe(self) -> str:
        counts = ", ".join(f"{n} {s}" for s, n in self.trials.items())
        lines = [f"study {self.study} ({counts}); this worker ran {len(self.ran)} trial(s)"]
        if self.best is None:
            lines.append("no trial has finished yet: no bundle")
        else:
            b = self.best
            where = b["bundle"] if b["here"] else f"{b['bundle']} on {b['host']}"
            lines.append(f"best: trial {b['number']}, {self.metric} {b['value']:.4f} with {b['params']}")
            lines.append(f"bundle: {where}")
        lines.append(f"open the study: optuna-dashboard {self.storage}")
        return "\n".join(lines)


@dataclass
class Tuner:
    """One worker of a study: the objective, and the bookkeeping that keeps only the best bundle."""

    recipe: Recipe
    study: optuna.Study
    storage: str  # as shown (password hidden)
    store: Path | None = None
    data_root: str | Path | None = None
    device: str | None = None
    download: bool = True
    progress: bool = True
    ran: list[int] = field(default_factory=list)
    parent: Parent | None = None  # the study's tracked run: each trial is a child run of it

    def child(self, number: int) -> Parent | None:
        return replace(self.parent, child_name=f"trial-{number}") if self.parent is not None else None

    @property
    def metric(self) -> str:
        return self.recipe.tune_metric

    @property
    def root(self) -> Path:
        return studies_dir(self.store) / safe_name(self.study.study_name)

    def scratch(self, number: int) -> Path:
        return self.root / "trials" / str(number)

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Workers sharing this store take turns keeping and removing bundles (:func:`zoo.io.file_lock`)."""
        with file_lock(self.root / "lock"):
            yield

    def on_epoch(self, trial: optuna.Trial) -> EpochCallback:
        """The engine's per-epoch hook: report the validation metric; prune when the pruner says so."""

        def report(row: dict[str, Any]) -> None:
            value = float(row[f"val_{self.metric}"])
            trial.report(value, int(row["epoch"]))
            if trial.should_prune():
                raise optuna.TrialPruned(f"pruned at epoch {row['epoch']} (val_{self.metric} {value:.4f})")

        return report

    def objective(self, trial: optuna.Trial) -> float:
        self.ran.append(trial.number)
        assert self.recipe.tune is not None
        values = suggest(trial, self.recipe.tune.params)
        trial.set_user_attr("values", values)
        trial.set_user_attr("host", socket.gethostname())
        trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
        scratch = self.scratch(trial.number)
        try:
            recipe = apply_overrides(self.recipe, values, parse_text=False)
            result = train(recipe, data_root=self.data_root, store=scratch, device=self.device,
                           download=self.download, progress=False, on_epoch=self.on_epoch(trial),
                           parent=self.child(trial.number))
        except BaseException as e:
            shutil.rmtree(scratch, ignore_errors=True)
            if isinstance(e, Exception) and not isinstance(e, (UserError, optuna.TrialPruned)):
                # this trial's own failure (out of memory, a diverged run): recorded, the study goes on
                raise TrialFailure(f"trial {trial.number} failed: {type(e).__name__}: {e}") from e
            raise
        trial.set_user_attr("bundle", str(result.bundle))
        trial.set_user_attr("best_epoch", result.card.metrics.best_epoch)
        return selected_value(result.card, self.metric)

    def after_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        """Keep the trial's bundle if it is now the study's best; remove what it leaves otherwise."""
        with self.lock():
            best = _best(study)
            if trial.state == TrialState.COMPLETE and best is not None and best.number == trial.number:
                self.promote(study, trial)
            shutil.rmtree(self.scratch(trial.number), ignore_errors=True)
        if self.progress:
            print(_trial_line(trial, best, self.metric), file=sys.stderr)

    def promote(self, study: optuna.Study, trial: FrozenTrial) -> Path:
        """Move a trial's bundle into the store, record the tuning in its card, drop the study's other.
        Called under :meth:`lock`; a trial another worker of this store promoted already is left as is."""
        src = Path(trial.user_attrs["bundle"])
        done = [p for p, c in self.kept() if c.tuning is not None and c.tuning.trial == trial.number]
        if done and not src.is_dir():  # a worker's finish() promoted it between this trial's end and now
            return done[0]
        dst = bundles_dir(self.store) / src.name
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(src), str(dst))
        tuning = Tuning(study=study.study_name, storage=self.storage, trial=trial.number,
                        params=trial.user_attrs.get("values", trial.params), metric=f"val_{self.metric}",
                        value=float(trial.value or 0.0), direction=self.recipe.tune_direction,
                        sampler=type(study.sampler).__name__, pruner=type(study.pruner).__name__,
                        trials=_counts(study), host=str(trial.user_attrs.get("host", "")),
                        selected=datetime.now(timezone.utc).isoformat(timespec="seconds"))
        update_card(dst, tuning=tuning)
        write_model_card(dst)
        for path, _ in self.kept():
            if path != dst:
                shutil.rmtree(path, ignore_errors=True)
        log.info("trial %d is the best of %s: %s", trial.number, study.study_name, dst)
        return dst

    def kept(self) -> list[tuple[Path, Card]]:
        """This store's bundles of this study (at most one outside a promotion)."""
        mine = (self.study.study_name, self.storage)
        return [(p, c) for p, c in list_bundles(self.store)
                if c.tuning is not None and (c.tuning.study, c.tuning.storage) == mine]

    def finish(self) -> TuneSummary:
        """At the end of a worker's run: keep this store's bundle only if it is the study's best
        (promoting the best trial's bundle if a killed worker left it unpromoted here), and remove
        the folders of trials that no longer run (left by killed workers)."""
        with self.lock():
            best = _best(self.study)
            here = None
            for path, card in self.kept():
                if best is not None and card.tuning is not None and card.tuning.trial == best.number:
                    here = path
                else:
                    shutil.rmtree(path, ignore_errors=True)
            left = best.user_attrs.get("bundle") if best is not None else None
            if best is not None and here is None and left and Path(left).is_dir():
                here = self.promote(self.study, best)
            if here is not None:  # the card counts the study's trials as they stand now
                card = update_card(here, tuning={**_plain_tuning(here), "trials": _counts(self.study)})
                write_model_card(here)
                log.info("%s: %s", here, card.tuning)
            self._sweep()
        return self.summary(best, here)

    def _sweep(self) -> None:
        """Remove the trial folders killed workers left: pruned and failed trials, and completed ones
        whose worker process (on this host) is gone. A live worker's completed trial is its own to
        handle: it may be between the trial's end and its promotion."""
        trials = {t.number: t for t in self.study.get_trials(deepcopy=False)}
        folder = self.root / "trials"
        for d in folder.iterdir() if folder.is_dir() else ():
            t = trials.get(int(d.name)) if d.name.isdigit() else None
            if t is None:
                continue
            if t.state in (TrialState.PRUNED, TrialState.FAIL) or (
                    t.state == TrialState.COMPLETE and not _worker_alive(str(t.user_attrs.get("worker", "")))):
                shutil.rmtree(d, ignore_errors=True)

    def summary(self, best: FrozenTrial | None, here: Path | None) -> TuneSummary:
        info = None
        if best is not None:
            info = {"number": best.number, "value": best.value, "params": best.user_attrs.get("values", best.params),
                    "bundle": str(here) if here else best.user_attrs.get("bundle"),
                    "host": best.user_attrs.get("host"), "here": here is not None}
        return TuneSummary(self.study.study_name, self.storage, f"val_{self.metric}", self.recipe.tune_direction,
                           _counts(self.study), list(self.ran), info)


def _worker_alive(worker: str) -> bool:
    """Whether the worker ``host:pid`` may still be running (True when it is on another host)."""
    host, _, pid = worker.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return True
    return pid_alive(int(pid))


def selected_value(card: Card, metric: str) -> float:
    """The validation ``metric`` of the epoch the engine selected (its history row)."""
    rows = [r for r in card.metrics.history if r.get("epoch") == card.metrics.best_epoch]
    if not rows:
        raise RuntimeError(f"{card.id}: no history row for its selected epoch {card.metrics.best_epoch}")
    return float(rows[0][f"val_{metric}"])


def _plain_tuning(bundle: Path) -> dict[str, Any]:
    card = read_card(bundle)
    assert card.tuning is not None
    return card.tuning.model_dump(mode="python")


def _best(study: optuna.Study) -> FrozenTrial | None:
    try:
        return study.best_trial
    except ValueError:  # no finished trial yet
        return None


def _counts(study: optuna.Study) -> dict[str, int]:
    return dict(Counter(t.state.name.lower() for t in study.get_trials(deepcopy=False)))


def _trial_line(trial: FrozenTrial, best: FrozenTrial | None, metric: str) -> str:
    values = trial.user_attrs.get("values", trial.params)
    if trial.state == TrialState.COMPLETE:
        mark = " (best so far)" if best is not None and best.number == trial.number else ""
        return f"trial {trial.number}: val_{metric} {trial.value:.4f}{mark} with {values}"
    if trial.state == TrialState.PRUNED:
        step = trial.last_step
        return f"trial {trial.number}: pruned at epoch {step} (val_{metric} {trial.intermediate_values.get(step)})"
    return f"trial {trial.number}: {trial.state.name.lower()} with {values}"


def tune(
    recipe: Recipe,
    trials: int | None = 10,
    *,
    study: str | None = None,
    storage: str | None = None,
    store: Path | None = None,
    data_root: str | Path | None = None,
    device: str | None = None,
    download: bool = True,
    timeout: float | None = None,
    max_trials: int | None = None,
    seed: int | None = None,
    progress: bool = True,
) -> TuneSummary:
    """Run ``trials`` trials of the recipe's study (joining it if it exists) and keep the best bundle.

    ``study``: default ``<dataset>-<arch>``; ``storage``: default the journal file
    ``<store>/studies/<study>.journal``. ``max_trials``: stop once the study (all workers) holds
    that many finished trials; ``timeout``: seconds for this worker.
    """
    name = study or default_study_name(recipe.dataset, recipe.arch)
    url = storage or default_storage(name, store)
    opened = open_study(recipe, name, url, seed)
    tuner = Tuner(recipe, opened, shown_storage(url), store, data_root, device, download, progress)
    callbacks: list[Any] = [tuner.after_trial]
    if max_trials is not None:
        callbacks.append(optuna.study.MaxTrialsCallback(max_trials, states=(TrialState.COMPLETE, TrialState.PRUNED)))
    with tracked(study_tracker(recipe, opened, store)) as tracker:
        tuner.parent = Parent.of(tracker.info)
        opened.optimize(tuner.objective, n_trials=trials, timeout=timeout, catch=(TrialFailure,),
                        callbacks=callbacks, gc_after_trial=True)
        summary = tuner.finish()
        figures = {f"trials_{state}": float(n) for state, n in summary.trials.items()}
        if summary.best is not None:
            figures.update({f"best_{summary.metric}": float(summary.best["value"]),
                            "best_trial": float(summary.best["number"])})
        tracker.log_summary(figures, sum(summary.trials.values()))
    return summary


def study_tracker(recipe: Recipe, study: optuna.Study, store: Path | None = None) -> Tracker:
    """The study's tracked run (``train.track`` / ``$MEDZOO_TRACK``), its trials' parent: the one its
    attributes name when it was tracked the same way (every worker joins it), else a new one."""
    backend = backend_of(recipe.train.track)
    if backend == "none":
        return NoTracker()
    assert recipe.tune is not None
    raw = study.user_attrs.get(ATTR_TRACKING)
    try:
        previous = TrackingInfo.model_validate_json(raw) if isinstance(raw, str) else None
    except ValueError:  # written by another medzoo: a run of its own
        previous = None
    flag = dataset_label(recipe.dataset)
    params = params_of({"study": study.study_name, "recipe": recipe.name, "metric": f"val_{recipe.tune_metric}",
                        "direction": recipe.tune_direction, "tune": recipe.tune.model_dump(mode="json")})
    spec = RunSpec(name=safe_name(study.study_name), dataset=flag, store=store, previous=previous, params=params,
                   tags={"medzoo.study": study.study_name, "medzoo.recipe": recipe.name, "medzoo.arch": recipe.arch})
    tracker = open_tracker(backend, spec)
    if tracker.info is not None and tracker.info != previous:
        study.set_user_attr(ATTR_TRACKING, tracker.info.model_dump_json())
    return tracker


__all__ = ["TrialFailure", "TuneSummary", "Tuner", "default_storage", "default_study_name", "identity",
           "open_storage", "open_study", "selected_value", "shown_storage", "studies_dir", "study_tracker", "suggest",
           "tune"]
