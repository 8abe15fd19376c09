"""Experiment tracking (``zoo train --track``, :mod:`zoo.train.tracking`) on the real BreastMNIST.

What a user relies on: after ``zoo train breast simplecnn --track mlflow --epochs 2`` MLflow's own
``search_runs`` finds the run with every epoch's metrics, the test AUC and the bundle's files, and
the card names the run; ``--resume`` goes on in the same run; TensorBoard's event files read back
with the epoch metrics; a missing package is one line saying what to install; ``zoo tune`` logs its
trials as child runs of the study's run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from zoo.card import CARD, read_card
from zoo.cli import main
from zoo.recipe import apply_overrides, find_recipe
from zoo.train import train

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = {"card.json", "README.md", "curves.png", "confusion.png", "reliability.png"}
# the in-process runs: a tiny MLP (what is tested is the tracking, not the model)
TINY = {"model.hidden": [32], "model.batchnorm": False, "train.epochs": 2}

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _need(module: str) -> None:
    try:
        __import__(module)
    except ImportError:
        pytest.skip(f"{module} is not installed (pip install 'medzoo[{module}]')")


@pytest.fixture(scope="module")
def mlflow_uri(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One MLflow database for the in-process runs (creating one costs 2 s), given as
    ``$MLFLOW_TRACKING_URI``; its experiment keeps its artifacts beside it (MLflow would put them
    in ``./mlruns`` of the working directory)."""
    _need("mlflow")
    import mlflow

    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    mlflow.MlflowClient(uri).create_experiment("medzoo-breastmnist", artifact_location=(root / "artifacts").as_uri())
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        yield uri


def _tiny(**changes: Any) -> Any:
    return apply_overrides(find_recipe("breast", "mlp"), {**TINY, **changes}, parse_text=False)


def _history(client: Any, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def test_zoo_train_track_mlflow(breast_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The issue's acceptance: the run, its per-epoch metrics and test AUC, its id in the card."""
    _need("mlflow")
    import mlflow

    store = tmp_path / "home"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MEDZOO_HOME": str(store)}
    env.pop("MLFLOW_TRACKING_URI", None)
    r = subprocess.run([sys.executable, "-m", "zoo.cli", "train", "breast", "simplecnn", "--track", "mlflow",
                        "--epochs", "2", "--data-root", str(breast_root), "--offline", "--json"],
                       env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    card = read_card(json.loads(r.stdout)["bundle"])
    tracking = card.tracking
    assert tracking is not None and tracking.backend == "mlflow" and tracking.parent_run_id is None
    assert tracking.uri == f"sqlite:///{store.resolve() / 'mlruns' / 'mlflow.db'}"  # the local store of $MEDZOO_HOME
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking.uri)
    runs = mlflow.search_runs(experiment_names=["medzoo-breastmnist"], output_format="list")
    assert [run.info.run_id for run in runs] == [tracking.run_id]
    run = runs[0]
    assert run.info.status == "FINISHED" and run.info.experiment_id == tracking.experiment_id
    assert run.data.metrics["test_auc"] == pytest.approx(card.metrics.test.auc)
    assert run.data.metrics["selected_val_auc"] == pytest.approx(card.metrics.val.auc)
    assert run.data.params["train.epochs"] == "2" and run.data.params["arch"] == "simplecnn"
    assert "train.track" not in run.data.params  # tracking is no part of what the run computes
    client = mlflow.MlflowClient()
    for key in ("val_auc", "val_loss", "train_loss"):
        assert _history(client, tracking.run_id, key) == [
            (row["epoch"], pytest.approx(row[key])) for row in card.metrics.history], key
    assert ARTIFACTS <= {a.path for a in client.list_artifacts(tracking.run_id)}
    logged = json.loads(Path(client.download_artifacts(tracking.run_id, CARD, str(tmp_path))).read_text())
    assert logged["tracking"]["run_id"] == tracking.run_id  # the card logged names the run too


class _Killed(Exception):
    """Stands for a run killed after its first epoch."""


def _kill_after_first(row: dict[str, Any]) -> None:
    raise _Killed(f"killed after epoch {row['epoch']}")


def test_resume_goes_on_in_the_same_mlflow_run(breast_root: Path, tmp_path: Path, mlflow_uri: str) -> None:
    import mlflow

    recipe = _tiny(**{"train.track": "mlflow"})
    with pytest.raises(_Killed):
        train(recipe, data_root=breast_root, store=tmp_path, download=False, progress=False,
              on_epoch=_kill_after_first)
    (state,) = (tmp_path / "runs").glob("*/tracking.json")
    first = json.loads(state.read_text())["run_id"]
    assert json.loads(state.read_text())["uri"] == mlflow_uri  # $MLFLOW_TRACKING_URI
    client = mlflow.MlflowClient(mlflow_uri)
    assert client.get_run(first).info.status == "KILLED"
    result = train(recipe, data_root=breast_root, store=tmp_path, download=False, progress=False, resume=True)
    assert result.card.tracking is not None and result.card.tracking.run_id == first
    assert client.get_run(first).info.status == "FINISHED"
    assert [step for step, _ in _history(client, first, "val_loss")] == [1, 2]  # each epoch once


def test_tensorboard_event_files(breast_root: Path, tmp_path: Path) -> None:
    _need("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    recipe = _tiny(**{"train.track": "tensorboard"})
    card = train(recipe, data_root=breast_root, store=tmp_path, download=False, progress=False).card
    assert card.tracking is not None and card.tracking.backend == "tensorboard"
    logdir = Path(card.tracking.uri)
    assert logdir.parent == (tmp_path / "tensorboard").resolve() and card.tracking.run_id == logdir.name
    events = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    for key in ("val_auc", "val_loss"):
        got = [(e.step, e.value) for e in events.Scalars(f"epoch/{key}")]
        assert got == [(row["epoch"], pytest.approx(row[key], rel=1e-6)) for row in card.metrics.history]
    (final,) = events.Scalars("final/test_auc")
    assert final.value == pytest.approx(card.metrics.test.auc, rel=1e-6)
    assert {"curves", "confusion", "reliability"} <= set(events.Tags()["images"])


@pytest.mark.parametrize("backend, package", [("mlflow", "MLflow"), ("tensorboard", "TensorBoard")])
def test_a_missing_tracker_says_how_to_install_it(backend: str, package: str, breast_root: Path,
                                                  monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setitem(sys.modules, backend, None)  # `import mlflow` now raises ImportError
    code = main(["train", "breast", "simplecnn", "--track", backend, "--epochs", "1", "--offline",
                 "--data-root", str(breast_root)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err == [f"zoo: error: --track {backend} needs {package}, which is not installed: "
                                 f"pip install 'medzoo[{backend}]'"]


def test_medzoo_track_is_the_default_and_checked(breast_root: Path, monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    from zoo.train.tracking import backend_of

    monkeypatch.setenv("MEDZOO_TRACK", "tensorboard")
    assert backend_of(None) == "tensorboard" and backend_of("none") == "none"  # the recipe's field wins
    monkeypatch.setenv("MEDZOO_TRACK", "wandb")
    assert main(["train", "breast", "simplecnn", "--epochs", "1", "--offline", "--data-root", str(breast_root)]) == 2
    assert "MEDZOO_TRACK='wandb' is not a tracker; choose from none, mlflow, tensorboard" in capsys.readouterr().err


def test_tune_logs_trials_as_child_runs_of_the_study(breast_root: Path, tmp_path: Path, mlflow_uri: str) -> None:
    pytest.importorskip("optuna")
    import mlflow

    from zoo.tune import tune

    recipe = _tiny(**{"train.track": "mlflow", "train.epochs": 1,
                      "tune": {"metric": "loss", "sampler": "grid", "pruner": {"name": "none"},
                               "params": {"optimizer.lr": {"type": "categorical", "choices": [0.001, 0.01]}}}})
    summary = tune(recipe, 2, study="tracked", store=tmp_path, data_root=breast_root, download=False, progress=False)
    assert summary.best is not None
    card = read_card(summary.best["bundle"])
    assert card.tracking is not None and card.tracking.parent_run_id is not None
    assert card.tracking.uri == mlflow_uri
    client = mlflow.MlflowClient(mlflow_uri)
    runs = client.search_runs([card.tracking.experiment_id])
    study = [r for r in runs if r.data.tags.get("medzoo.study") == "tracked"]
    assert len(study) == 1 and study[0].info.run_id == card.tracking.parent_run_id
    assert study[0].data.metrics["best_trial"] == summary.best["number"]
    parent = card.tracking.parent_run_id
    children = {r.info.run_name: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent}
    assert set(children) == {"trial-0", "trial-1"}  # MLflow's own nesting tag: the UI shows them under the study
    assert children[f"trial-{summary.best['number']}"].info.run_id == card.tracking.run_id
    assert all(r.data.params["optimizer.lr"] in ("0.001", "0.01") for r in children.values())
