"""The ``zoo`` command as a user meets it: one line per mistake with "did you mean", ``--store``
after the sub-command, ``--json`` output, quiet broken pipes, the Markdown model card."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from zoo.cli import main

REPO = Path(__file__).resolve().parents[1]


def _zoo(*args: str, store: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if store is not None:
        env["MEDZOO_HOME"] = str(store)
    return subprocess.run([sys.executable, "-m", "zoo.cli", *args], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=300)


@pytest.fixture()
def one_bundle_store(breast_bundle: Path, tmp_path: Path) -> Path:
    store = tmp_path / "store"
    shutil.copytree(breast_bundle, store / "bundles" / breast_bundle.name)
    return store


@pytest.mark.parametrize(("argv", "expected"), [
    (["train", "dermamnis", "simplecnn", "--offline"], "unknown dataset 'dermamnis'; did you mean 'dermamnist'?"),
    (["train", "breast", "resnt18", "--offline"], "did you mean 'resnet18'"),
    (["train", "breast", "simplecnn", "--offline", "--set", "train.epoch=3"],
     "train.epoch: unknown field; did you mean 'epochs'?"),
    (["train", "breast", "simplecnn", "--offline", "--set", "optimizer.lr=-1"],
     "optimizer.lr: Input should be greater than 0 (got -1)"),
    (["train", "breast", "simplecnn", "--offline", "--set", "trian.epochs=3"], "did you mean 'train'?"),
])
def test_mistakes_get_one_line_each_with_a_suggestion(argv: list[str], expected: str, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--store", str(tmp_path), *argv]) == 2
    err = capsys.readouterr().err
    assert expected in err, err
    assert "Traceback" not in err and "errors.pydantic.dev" not in err and "validation error" not in err
    assert all(line.startswith("zoo: error: ") for line in err.strip().splitlines())
    assert not (tmp_path / "runs").exists()  # refused before any work


def test_a_mistyped_bundle_id_gets_a_suggestion(one_bundle_store: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (bundle,) = (one_bundle_store / "bundles").iterdir()
    typo = bundle.name[:-1] + ("x" if bundle.name[-1] != "x" else "y")
    assert main(["card", typo, "--store", str(one_bundle_store)]) == 2
    err = capsys.readouterr().err
    assert f"did you mean '{bundle.name}'?" in err and len(err.strip().splitlines()) == 1


def test_store_after_the_sub_command_and_json_listings(one_bundle_store: Path, tmp_path: Path) -> None:
    """`--store` works before or after the sub-command; `--json` on list, models and recipes."""
    before = _zoo("--store", str(one_bundle_store), "list", "--json")
    after = _zoo("list", "--json", "--store", str(one_bundle_store), store=tmp_path / "elsewhere")
    assert before.returncode == after.returncode == 0, before.stderr + after.stderr
    rows = json.loads(after.stdout)
    assert json.loads(before.stdout) == rows and len(rows) == 1
    assert rows[0]["dataset"] == "breastmnist" and 0 <= rows[0]["test_auc"] <= 1
    models = json.loads(_zoo("models", "--json").stdout)
    assert {"name", "sizes", "report", "cam_layer"} <= set(models[0]) and any(m["name"] == "resnet18" for m in models)
    recipes = json.loads(_zoo("recipes", "--json").stdout)
    assert any(r["name"] == "medmnist-v2" for r in recipes) and all(r["citation"] for r in recipes)


def test_train_and_score_summaries_as_json(small_breast_root: Path, tmp_path: Path) -> None:
    r = _zoo("train", "breast", "mlp", "--data-root", str(small_breast_root), "--epochs", "1", "--offline", "--json",
             "--store", str(tmp_path / "store"))
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    assert Path(summary["bundle"], "README.md").is_file() and summary["best_epoch"] == 1
    assert {"acc", "auc", "macro_f1"} <= set(summary["test"])
    images = tmp_path / "images"
    images.mkdir()
    (images / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    s = _zoo("score", str(images), "--model", summary["bundle"], "--out", str(tmp_path / "s.csv"), "--json")
    assert s.returncode == 0, s.stderr
    out = json.loads(s.stdout)
    assert (out["files"], out["scored"], out["errors"]) == (1, 0, 1) and out["provider"] == "CPUExecutionProvider"


def test_eval_into_a_closed_pipe_ends_quietly(one_bundle_store: Path, breast_root: Path) -> None:
    """`zoo eval … | head -1`: no BrokenPipeError traceback."""
    cmd = (f"{sys.executable} -m zoo.cli --store {one_bundle_store} eval breast --data-root {breast_root} "
           "| head -1")
    r = subprocess.run(["bash", "-c", cmd], cwd=REPO, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.stdout.count("\n") == 1 and "on test" in r.stdout
    assert r.stderr == "", r.stderr


def test_zoo_card_writes_the_markdown_model_card(one_bundle_store: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (bundle,) = (one_bundle_store / "bundles").iterdir()
    (bundle / "README.md").unlink()
    assert main(["card", "breast", "--store", str(one_bundle_store)]) == 0
    text = (bundle / "README.md").read_text()
    card = json.loads((bundle / "card.json").read_text())
    for section in ("## Intended use", "## Data", "## Results", "## Training", "## Exports", "## Limitations"):
        assert section in text
    assert "Not a medical device" in text and card["dataset"]["checksum"] in text
    assert card["weights_sha256"] in text
    assert "Published benchmark" in text and "Google AutoML Vision" in text and "0.919" in text  # MedMNIST v2
    assert f"{card['metrics']['test']['auc']:.3f}" in text
    capsys.readouterr()
    assert main(["card", str(bundle), "--print"]) == 0
    assert capsys.readouterr().out == text


def test_only_user_errors_are_one_line_anything_else_is_a_reported_bug(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """A UserError: one line, exit 2. Any other exception (a ValueError included) is a bug: its
    traceback, then one line asking for a report, exit 1."""
    import zoo.cli.commands as commands
    from zoo import __version__
    from zoo.cli import BUG_REPORT
    from zoo.errors import UsageError

    def user_mistake(args: Any) -> int:
        raise UsageError("--flag must be positive")

    def bug(args: Any) -> int:
        raise ValueError("an internal invariant broke")

    monkeypatch.setattr(commands, "cmd_models", user_mistake)
    assert main(["models"]) == 2
    assert capsys.readouterr().err == "zoo: error: --flag must be positive\n"
    monkeypatch.setattr(commands, "cmd_models", bug)
    assert main(["models"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0] == "Traceback (most recent call last):" and "ValueError: an internal invariant broke" in err
    assert err[-1] == BUG_REPORT and __version__ in BUG_REPORT and "report" in BUG_REPORT


def test_train_flags_are_the_recipe_shortcuts() -> None:
    """Every shortcut of zoo.recipe is a `zoo train` flag typed as its recipe field, and nothing else is."""
    from zoo.cli import build_parser
    from zoo.recipe import SHORTCUTS

    train = build_parser()._subparsers._group_actions[0].choices["train"]  # type: ignore[union-attr]
    flags = {a.dest: a for a in train._actions}
    for name in SHORTCUTS:
        assert f"--{name.replace('_', '-')}" in flags[name].option_strings
    assert flags["epochs"].type is int and flags["lr"].type is float and flags["size"].type is int
    assert flags["precision"].type is str and flags["patience"].type is int
    shortcut_like = {d for d, a in flags.items() if a.option_strings and d not in SHORTCUTS}
    assert shortcut_like == {"help", "recipe", "data_root", "device", "resume", "offline", "set", "json", "nproc",
                             "store", "verbose"}
