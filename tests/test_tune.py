"""``zoo tune``: Optuna studies over the recipes' search spaces (real BreastMNIST, a tiny MLP).

What is checked: every built-in search space samples into valid recipes, and those of reports 000,
001 and 002 hold the values the reports name; bad spaces are refused with the field named; two
``zoo tune`` workers started at once on one journal file share one study (each worker's trials in
it, diverging trials pruned from the engine's per-epoch validation loss), and the store keeps one
bundle, the best trial's, which loads and whose card names the study, the storage and the values;
``optuna.load_study`` and optuna-dashboard read the storage; an RDB (SQLite) storage works too.
Workers started at the same moment on a new storage (SQLite, with its lock or with the retry alone
as on a server RDB, and a journal file) all join one study, ``zoo tune`` processes included.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

optuna = pytest.importorskip("optuna")

from zoo.bundle import load_bundle  # noqa: E402
from zoo.card import read_card  # noqa: E402
from zoo.errors import RecipeError  # noqa: E402
from zoo.recipe import Recipe, all_recipes, apply_overrides, find_recipe, load_recipe_file  # noqa: E402
from zoo.store import list_bundles  # noqa: E402
from zoo.tune import Tuner, default_storage, open_study, shown_storage, suggest, tune  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RECIPE = {
    "name": "breast-mlp-tune", "dataset": "breast", "arch": "mlp", "report": "medmnist-v2",
    "citation": "a test recipe: a tiny MLP on the real BreastMNIST",
    "model": {"hidden": [32], "batchnorm": False, "dropout": 0.0},
    "train": {"epochs": 3, "batch_size": 64, "early_stopping": {"patience": None, "metric": "loss"}},
    "optimizer": {"name": "sgd", "lr": 0.01},
    "tune": {
        "metric": "loss",
        # a diverging trial (validation loss above 3 after any epoch, or NaN) is pruned
        "pruner": {"name": "threshold", "upper": 3.0, "n_warmup_steps": 0},
        "params": {"optimizer.lr": {"type": "float", "low": 1e-4, "high": 100.0, "log": True},
                   "train.epochs": {"type": "int", "low": 1, "high": 3}},
    },
}
# Enqueued so that the test knows what runs: two learn, two diverge (lr 50 and 80 with plain SGD).
ENQUEUED = [(0.01, 3), (50.0, 2), (0.003, 2), (80.0, 3)]


def _recipe_file(tmp_path: Path) -> Path:
    path = tmp_path / "breast-mlp-tune.yaml"
    path.write_text(yaml.safe_dump(RECIPE, sort_keys=False))
    return path


def test_every_search_space_samples_valid_recipes() -> None:
    tuned = [r for r in all_recipes() if r.tune is not None]
    assert len(tuned) >= 18
    for recipe in tuned:
        assert recipe.tune is not None
        study = optuna.create_study(direction=recipe.tune_direction)
        for _ in range(3):
            trial = study.ask()
            values = suggest(trial, recipe.tune.params)
            assert isinstance(apply_overrides(recipe, values, parse_text=False), Recipe)
            study.tell(trial, 0.5)


def test_the_reports_search_spaces() -> None:
    # report 002: Optuna over lr, epochs and patience (Figure 14c's best values inside the ranges)
    for r in all_recipes():
        if r.report == "002":
            assert r.tune is not None and r.tune.sampler == "tpe", r.name
            p = r.tune.params
            assert {"optimizer.lr", "train.epochs", "train.early_stopping.patience"} <= set(p), r.name
    l1l2 = find_recipe("organa", "mlp-l1l2").tune
    assert l1l2 is not None
    for path, best in {"optimizer.lr": 0.0892, "train.epochs": 90, "train.early_stopping.patience": 8,
                       "loss.l1": 0.000183, "loss.l2": 0.0015}.items():
        lo, hi = l1l2.params[path].bounds()
        assert lo <= best <= hi, path
    # report 001, Table 5: the SimpleCNN's lr / batch / epochs grid
    simple = find_recipe("mnist", "simplecnn").tune
    assert simple is not None and simple.sampler == "grid"
    assert simple.params["optimizer.lr"].grid() == [0.001, 0.01, 0.1]
    assert simple.params["train.batch_size"].grid() == [16, 32, 64]
    assert simple.params["train.epochs"].grid() == [5, 10, 15, 20]
    # report 000: a grid chosen by validation F1, hidden layers as categorical lists
    derma = find_recipe("derma", "mlp")
    assert derma.tune is not None and derma.tune.sampler == "grid" and derma.tune_metric == "macro_f1"
    assert derma.tune.params["optimizer.lr"].grid() == [0.1, 0.01, 0.001, 0.0001]
    assert [256, 128] in derma.tune.params["model.hidden"].grid()


@pytest.mark.parametrize("change, message", [
    ({"params": {"optimizer.lrr": {"type": "float", "low": 0.1, "high": 1}}}, "not a recipe field"),
    ({"params": {"optimizer.lr": {"type": "float", "low": -1, "high": 1}}}, "does not make a valid recipe"),
    ({"params": {"optimizer.name": {"type": "categorical", "choices": ["adam", "adamax"]}}}, "adamax"),
    ({"params": {"train.epochs": {"type": "int", "low": 5}}}, "low and high are required"),
    ({"params": {"optimizer.lr": {"type": "float", "low": 0.1, "high": 1}}, "sampler": "grid"}, "grid needs"),
    ({"metric": "loss", "direction": "maximize"}, "loss is minimised"),
])
def test_bad_search_spaces_are_refused(tmp_path: Path, change: dict[str, Any], message: str) -> None:
    raw = json.loads(json.dumps(RECIPE))
    raw["tune"].update(change)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(RecipeError, match=message):
        load_recipe_file(path)


def test_a_recipe_without_search_space_is_refused(tmp_path: Path) -> None:
    recipe = find_recipe("path", "alexnet")
    assert recipe.tune is None
    with pytest.raises(RecipeError, match="no tune: section"):
        open_study(recipe, "s", str(tmp_path / "s.journal"))


def _dashboard_trials(storage: str) -> list[tuple[int, str]]:
    """The trials optuna-dashboard shows for the storage's first study (its JSON API, over WSGI)."""
    import optuna_dashboard

    app = optuna_dashboard.wsgi(storage)
    got: dict[str, str] = {}

    def call(path: str) -> Any:
        env = {"REQUEST_METHOD": "GET", "PATH_INFO": path, "QUERY_STRING": "", "SERVER_NAME": "t",
               "SERVER_PORT": "80", "SERVER_PROTOCOL": "HTTP/1.1", "wsgi.url_scheme": "http",
               "wsgi.input": io.BytesIO()}
        body = b"".join(app(env, lambda status, headers, exc=None: got.update(status=status)))
        assert got["status"].startswith("200"), got
        return json.loads(body)

    study_id = call("/api/studies")["study_summaries"][0]["study_id"]
    return [(t["number"], t["state"]) for t in call(f"/api/studies/{study_id}")["trials"]]


@pytest.mark.slow
def test_two_workers_share_one_study(breast_root: Path, tmp_path: Path) -> None:
    recipe_file, store = _recipe_file(tmp_path), tmp_path / "store"
    storage = str(tmp_path / "shared" / "study.journal")  # a journal file: what a shared filesystem holds
    study = open_study(load_recipe_file(recipe_file), "breast-mlp", storage)
    for lr, epochs in ENQUEUED:
        study.enqueue_trial({"optimizer.lr": lr, "train.epochs": epochs})
    cmd = [sys.executable, "-m", "zoo.cli", "tune", "breast", "mlp", "--recipe", str(recipe_file), "--trials", "2",
           "--study", "breast-mlp", "--storage", storage, "--store", str(store), "--data-root", str(breast_root),
           "--offline", "--json"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    workers = [subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
               for _ in range(2)]
    outs = [w.communicate(timeout=600) for w in workers]
    for w, (_, err) in zip(workers, outs):
        assert w.returncode == 0, err.decode()[-3000:]
    summaries = [json.loads(out.decode().strip().splitlines()[-1]) for out, _ in outs]

    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    loaded = optuna.load_study(study_name="breast-mlp", storage=JournalStorage(JournalFileBackend(storage)))
    trials = loaded.get_trials()
    assert len(trials) == 4
    by_worker: dict[str, list[int]] = {}
    for t in trials:
        by_worker.setdefault(t.user_attrs["worker"], []).append(t.number)
    assert len(by_worker) == 2 and sorted(map(len, by_worker.values())) == [2, 2]  # both workers' trials
    assert sorted(summaries[0]["ran"] + summaries[1]["ran"]) == [0, 1, 2, 3]
    states = {t.params["optimizer.lr"]: t.state for t in trials}
    assert states[50.0] == states[80.0] == optuna.trial.TrialState.PRUNED  # diverged, pruned after epoch 1
    assert states[0.01] == states[0.003] == optuna.trial.TrialState.COMPLETE
    pruned = next(t for t in trials if t.state == optuna.trial.TrialState.PRUNED)
    assert pruned.last_step == 1 and pruned.intermediate_values[1] > 3.0

    best = loaded.best_trial
    kept = list_bundles(store)
    assert len(kept) == 1, "the store keeps the best trial's bundle only"
    path, card = kept[0]
    assert card.tuning is not None
    assert (card.tuning.study, card.tuning.trial, card.tuning.value) == ("breast-mlp", best.number, best.value)
    assert card.tuning.storage == shown_storage(storage) and card.tuning.metric == "val_loss"
    assert card.tuning.params == best.params  # the values chosen, at their recipe paths
    assert card.tuning.trials == {"complete": 2, "pruned": 2}
    assert card.recipe["optimizer"]["lr"] == best.params["optimizer.lr"]
    assert card.metrics.test is not None and card.metrics.val is not None  # evaluated once, selected on val
    bundle = load_bundle(path)
    assert bundle.card.id == card.id and "## Tuning" in (path / "README.md").read_text()
    # each worker reports the study as it stood when it ended: the last one to end, the final best
    assert best.number in [s["best"]["number"] for s in summaries]
    assert all(s["best"]["value"] >= best.value for s in summaries)  # (loss: minimised)
    assert not any((store / "studies" / "breast-mlp" / "trials").iterdir()), "trial folders are removed"
    assert _dashboard_trials(storage) == [(0, "Complete"), (1, "Pruned"), (2, "Complete"), (3, "Pruned")]


def test_sqlite_storage_and_the_python_api(breast_root: Path, tmp_path: Path) -> None:
    recipe = load_recipe_file(_recipe_file(tmp_path))
    url = f"sqlite:///{tmp_path / 'studies.db'}"
    study = open_study(recipe, "rdb", url)
    study.enqueue_trial({"optimizer.lr": 0.01, "train.epochs": 1})
    summary = tune(recipe, 2, study="rdb", storage=url, store=tmp_path / "store", data_root=breast_root,
                   download=False, progress=False)
    assert summary.trials.get("complete", 0) + summary.trials.get("pruned", 0) == 2 and summary.best is not None
    assert summary.best["here"] and read_card(summary.best["bundle"]).tuning.storage == url
    assert len(optuna.load_study(study_name="rdb", storage=url).trials) == 2
    assert len(_dashboard_trials(url)) == 2
    # another worker bringing another search space is refused, not mixed into the study
    other = apply_overrides(recipe, {"train.epochs": 2}, parse_text=False)
    with pytest.raises(RecipeError, match="another base_sha256"):
        open_study(other, "rdb", url)
    assert default_storage("a/b c", tmp_path).endswith("studies/a_b_c.journal")
    assert shown_storage("postgresql://me:secret@db:5432/optuna") == "postgresql://me:***@db:5432/optuna"


def test_a_trial_promoted_by_another_workers_finish_is_kept_once(breast_root: Path, tmp_path: Path) -> None:
    """Worker B ends (finish) between worker A's trial end and A's own promotion of that trial, in the
    same store: B promotes A's best trial; A's promotion then finds it done, and one bundle is kept."""
    recipe = load_recipe_file(_recipe_file(tmp_path))
    url = str(tmp_path / "race.journal")
    study = open_study(recipe, "race", url)
    study.enqueue_trial({"optimizer.lr": 0.01, "train.epochs": 1})
    store = tmp_path / "store"
    a = Tuner(recipe, study, url, store, breast_root, download=False, progress=False)
    study.optimize(a.objective, n_trials=1)  # trial 0 complete; A's callback has not run yet
    (trial,) = study.get_trials()
    b = Tuner(recipe, open_study(recipe, "race", url), url, store, breast_root, download=False, progress=False)
    assert b.finish().best["here"]
    a.after_trial(study, trial)  # the bundle is no longer where A's trial wrote it
    kept = [(p, c) for p, c in list_bundles(store) if c.tuning is not None]
    assert len(kept) == 1 and kept[0][1].tuning.trial == 0
    assert not a.scratch(0).exists()


def test_finish_sweeps_the_trials_of_dead_workers_only(tmp_path: Path) -> None:
    """A completed trial's folder is removed once its worker process is gone (killed before its
    callback ran), and kept while the worker lives (it may be about to promote it)."""
    import socket

    recipe = load_recipe_file(_recipe_file(tmp_path))
    url = str(tmp_path / "sweep.journal")
    study = open_study(recipe, "sweep", url)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    tuner = Tuner(recipe, study, url, tmp_path / "store", progress=False)
    for worker, value in ((os.getpid(), 0.1), (dead.pid, 0.5), (os.getpid(), 0.9)):
        trial = study.ask()
        trial.set_user_attr("worker", f"{socket.gethostname()}:{worker}")
        (tuner.scratch(trial.number) / "bundles").mkdir(parents=True)
        study.tell(trial, value)
    tuner.finish()
    assert [tuner.scratch(n).exists() for n in range(3)] == [True, False, True]


# Two workers started together on a NEW storage (issue 18): one used to die creating it, with
# "table studies already exists" (SQLite) or a UNIQUE constraint on alembic_version.
START_TOGETHER = """
import os, sys, time
import zoo.cli, zoo.tune
ready = sys.argv[1]
# the slow imports first (torch, optuna; SQLAlchemy and Alembic, which opening an RDB imports), so that
# both workers reach the new storage together
zoo.tune.open_storage(f"sqlite:///{ready}-warm-{os.getpid()}.db")
open(os.path.join(ready, str(os.getpid())), "w").close()
while len(os.listdir(ready)) < int(sys.argv[2]):
    time.sleep(0.001)
sys.exit(zoo.cli.main(sys.argv[3:]))
"""


def _open_study_at_once(recipe: Recipe, storage: str, ready: Any, study: str) -> None:
    """A worker's start (:func:`open_study`), released together with the others by ``ready``."""
    ready.wait()
    open_study(recipe, study, storage)


@pytest.mark.parametrize("kind", ["sqlite", "sqlite-retry-only", "journal"])
def test_workers_opening_a_new_storage_at_once_share_one_study(
        tmp_path: Path, kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Three workers released by a barrier open a new storage and the same study, three times over:
    every one succeeds and the storage holds one study. ``sqlite-retry-only`` opens SQLite without
    the lock file, the way a server RDB (PostgreSQL, MySQL) is opened: the retry alone copes."""
    import multiprocessing

    import zoo.tune

    recipe = load_recipe_file(_recipe_file(tmp_path))
    if kind == "sqlite-retry-only":
        monkeypatch.setattr(zoo.tune, "_creation_lock", lambda url: contextlib.ExitStack())
    open_study(recipe, "warm", f"sqlite:///{tmp_path / 'warm.db'}")  # imports SQLAlchemy, Alembic before forking
    ctx = multiprocessing.get_context("fork")  # the children share this process's imports: they start in ms
    for n in range(3):
        storage = str(tmp_path / f"{n}.journal") if kind == "journal" else f"sqlite:///{tmp_path / f'{n}.db'}"
        ready = ctx.Barrier(3)
        workers = [ctx.Process(target=_open_study_at_once, args=(recipe, storage, ready, "s")) for _ in range(3)]
        for w in workers:
            w.start()
        for w in workers:
            w.join(60)
        assert [w.exitcode for w in workers] == [0, 0, 0], f"round {n}: a worker failed (its traceback is above)"
        assert optuna.get_all_study_names(storage=zoo.tune.open_storage(storage)) == ["s"]


def test_a_lost_creation_race_is_retried_then_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker that lost a creation race to another tries again; one that keeps losing gets an
    error that says why; any other database error (a server that does not answer) is not retried."""
    from sqlalchemy.exc import IntegrityError, OperationalError

    import zoo.tune
    from zoo.errors import UserError

    pauses: list[float] = []
    monkeypatch.setattr(zoo.tune.time, "sleep", pauses.append)
    lost = IntegrityError("INSERT INTO alembic_version", {}, Exception("UNIQUE constraint failed"))
    tries = iter([lost, lost])

    def make() -> str:
        e = next(tries, None)
        if e is not None:
            raise e
        return "opened"

    assert zoo.tune._retry_creation("sqlite:///x.db", make) == "opened" and len(pauses) == 2

    def always() -> str:
        raise OperationalError("CREATE TABLE studies", {}, Exception("table studies already exists"))

    with pytest.raises(UserError, match="other workers were creating it.*after 6 tries.*already exists"):
        zoo.tune._retry_creation("sqlite:///x.db", always)

    def unreachable() -> str:  # not a race: raised at once
        raise OperationalError("connect", {}, Exception("could not connect to server"))

    pauses.clear()
    with pytest.raises(OperationalError):
        zoo.tune._retry_creation("postgresql://db/optuna", unreachable)
    assert pauses == []


@pytest.mark.slow
def test_two_zoo_tune_workers_create_a_new_sqlite_storage_together(breast_root: Path, tmp_path: Path) -> None:
    """The README's way: two `zoo tune` processes on one new ``sqlite:///`` storage, released at the
    same moment (a barrier after their imports): both finish, and the storage holds one study with
    the trials of both."""
    raw = json.loads(json.dumps(RECIPE))
    raw["train"]["epochs"] = 1
    raw["tune"]["params"] = {"optimizer.lr": {"type": "float", "low": 1e-3, "high": 0.1, "log": True}}
    recipe_file = tmp_path / "tiny.yaml"
    recipe_file.write_text(yaml.safe_dump(raw, sort_keys=False))
    storage = f"sqlite:///{tmp_path / 'new' / 'studies.db'}"
    (tmp_path / "new").mkdir()
    ready = tmp_path / "ready"
    ready.mkdir()
    cmd = [sys.executable, "-c", START_TOGETHER, str(ready), "2", "tune", "breast", "mlp", "--recipe",
           str(recipe_file), "--trials", "1", "--study", "together", "--storage", storage, "--store",
           str(tmp_path / "store"), "--data-root", str(breast_root), "--offline", "--json"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    workers = [subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
               for _ in range(2)]
    outs = [w.communicate(timeout=300) for w in workers]
    for w, (_, err) in zip(workers, outs):
        assert w.returncode == 0, err.decode()[-3000:]
    ran = sorted(n for out, _ in outs for n in json.loads(out.decode().strip().splitlines()[-1])["ran"])
    assert ran == [0, 1]
    assert optuna.get_all_study_names(storage=storage) == ["together"]
    trials = optuna.load_study(study_name="together", storage=storage).get_trials()
    assert len({t.user_attrs["worker"] for t in trials}) == 2 and len(trials) == 2
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
