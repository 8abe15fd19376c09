"""The codebase's own contracts: layers, torch-free imports, the typed card, files and runs.

Layers and forbidden imports are checked statically by ``lint-imports`` (``make test`` runs it
before pytest); here they are checked at run time, in fresh interpreters, the way a user meets them.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "torchvision", "sklearn", "medmnist", "pytorch_grad_cam", "captum", "cv2")
LEGACY_CARD = REPO / "tests" / "data" / "card_schema1_v0.1.json"


def _run(code: str, tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, "MEDZOO_HOME": str(tmp_path / "home"), "MEDZOO_SERVE_SOURCE": "store",
                "BENTOML_HOME": str(tmp_path / "bentoml"), "BENTOML_DO_NOT_TRACK": "true", **env}
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, env=full_env, capture_output=True, text=True,
                          timeout=180)


@pytest.mark.parametrize("modules", [
    "zoo.runtime", "zoo.score", "serving.service", "zoo", "zoo.cli", "zoo.card, zoo.store, zoo.ensemble",
    "zoo.models, zoo.recipe, zoo.modelcard",
])
def test_onnx_path_and_cli_import_no_torch(modules: str, tmp_path: Path) -> None:
    code = (f"import sys; import {modules}; "
            f"print(','.join(m for m in {HEAVY!r} if m in sys.modules))")
    r = _run(code, tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "", f"importing {modules} loaded {r.stdout.strip()}"


@pytest.mark.parametrize("argv", [["--help"], ["list"], ["models"], ["recipes"], ["list", "--json"]])
def test_light_commands_import_no_torch(argv: list[str], tmp_path: Path) -> None:
    code = ("import sys\nfrom zoo.cli import main\n"
            f"try:\n    main({argv!r})\nexcept SystemExit:\n    pass\n"
            f"sys.stderr.write('LOADED:' + ','.join(m for m in {HEAVY!r} if m in sys.modules))")
    r = _run(code, tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stderr.strip().endswith("LOADED:"), r.stderr[-300:]


def test_import_contracts_are_declared() -> None:
    import tomllib

    cfg = tomllib.loads((REPO / "pyproject.toml").read_text())
    contracts = {c["id"]: c for c in cfg["tool"]["importlinter"]["contracts"]}
    assert contracts["no-training"]["forbidden_modules"] == ["zoo.train"]
    assert {"export", "serving", "zoo.score", "zoo.evaluate"} <= set(contracts["no-training"]["source_modules"])
    assert set(HEAVY) <= set(contracts["torch-free"]["forbidden_modules"])
    assert {"zoo.runtime", "zoo.score", "serving.service"} <= set(contracts["torch-free"]["source_modules"])
    assert contracts["layers"]["type"] == "layers" and "ruff" in cfg["tool"]


# --- the typed card ------------------------------------------------------------------------------


def test_a_card_written_by_the_previous_release_still_loads(tmp_path: Path) -> None:
    """Schema 1 as medzoo 0.1.0 wrote it (before the card was typed) validates and keeps its values."""
    from zoo.card import read_card

    bundle = tmp_path / "legacy"
    bundle.mkdir()
    shutil.copy(LEGACY_CARD, bundle / "card.json")
    raw = json.loads(LEGACY_CARD.read_text())
    card = read_card(bundle)
    assert card.id == raw["id"] and card.labels == raw["labels"] and card.weights_sha256 == raw["weights_sha256"]
    assert card.preprocessing.image_size == raw["preprocessing"]["image_size"]
    assert card.metrics.test.acc == raw["metrics"]["test"]["acc"] and card.training.epochs_run == 1
    assert card.to_json_dict()["schema"] == 1


@pytest.mark.parametrize(("change", "words"), [
    (lambda c: c.pop("labels"), ["labels", "Field required"]),
    (lambda c: c["preprocessing"].update(in_channels=2), ["preprocessing", "in_channels must be 1 or 3"]),
    (lambda c: c["metrics"]["test"].update(acc="high"), ["metrics.test.acc", "valid number"]),
    (lambda c: c.update(schema=7), ["card schema 7, expected 1"]),
])
def test_an_invalid_card_is_refused_in_one_line(change, words: list[str], tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from zoo.card import read_card
    from zoo.errors import BundleError

    raw = json.loads(LEGACY_CARD.read_text())
    change(raw)
    (tmp_path / "card.json").write_text(json.dumps(raw))
    with pytest.raises(BundleError) as info:
        read_card(tmp_path)
    message = str(info.value)
    assert len(message.splitlines()) == 1 and "errors.pydantic.dev" not in message
    for w in words:
        assert w in message, message


def test_unknown_card_keys_survive_an_update(tmp_path: Path) -> None:
    """A card written by a newer medzoo of the same schema keeps its extra keys through update_card."""
    from zoo.card import read_card, update_card

    raw = json.loads(LEGACY_CARD.read_text())
    raw["future_section"] = {"x": 1}
    raw["training"]["future_field"] = "kept"
    (tmp_path / "card.json").write_text(json.dumps(raw))
    update_card(tmp_path, created="2030-01-01T00:00:00+00:00")
    again = json.loads((tmp_path / "card.json").read_text())
    assert again["future_section"] == {"x": 1} and again["training"]["future_field"] == "kept"
    assert read_card(tmp_path).created.startswith("2030")


# --- files follow the umask; concurrent runs -------------------------------------------------------


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def test_written_files_follow_the_umask(breast_bundle: Path, tmp_path: Path) -> None:
    """Bundles, exports and score outputs are readable as the umask says (not mkstemp's 0600)."""
    from export import ensure_exported
    from zoo.modelcard import write_model_card
    from zoo.score import score_folder

    old = os.umask(0o027)
    try:
        bundle = tmp_path / "store" / breast_bundle.name
        bundle.parent.mkdir()
        shutil.copytree(breast_bundle, bundle, ignore=shutil.ignore_patterns("*.onnx", "*.pt"))
        for name in ("card.json", "model.safetensors"):  # rewrite them under this umask
            data = (bundle / name).read_bytes()
            (bundle / name).unlink()
            from zoo.io import atomic_write_bytes

            atomic_write_bytes(bundle / name, data)
        ensure_exported(bundle)
        write_model_card(bundle)
        images = tmp_path / "images"
        images.mkdir()
        shutil.copy(REPO / "tests" / "data" / "card_schema1_v0.1.json", images / "not-an-image.json")
        summary = score_folder(images, [bundle], tmp_path / "out" / "scores.csv", workers=0, progress=False)
    finally:
        os.umask(old)
    for f in (bundle / "card.json", bundle / "model.safetensors", bundle / "model.onnx", bundle / "README.md",
              summary.out, summary.errors_out):
        assert _mode(f) == 0o640, (f.name, oct(_mode(f)))


def test_two_runs_of_one_recipe_at_once_do_not_collide(breast_root: Path, tmp_path: Path) -> None:
    """Two `zoo train` of the same recipe in one store at the same time both finish, each with its
    own run directory and bundle (they used to share runs/<hash>/.state.pt.tmp and one died)."""
    env = {**os.environ, "MEDZOO_HOME": str(tmp_path), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "zoo.cli", "train", "breast", "lenet", "--data-root", str(breast_root),
           "--epochs", "20", "--offline", "--json"]
    procs = [subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (_out, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-2000:]
    bundles = {json.loads(out)["bundle"] for out, _ in outs}
    assert len(bundles) == 2 and all(Path(b, "card.json").is_file() for b in bundles)
    runs = sorted(p.name for p in (tmp_path / "runs").iterdir())
    assert len(runs) == 2 and runs[1] == runs[0] + ".2", runs
    assert all((tmp_path / "runs" / r / "done.json").is_file() for r in runs)


# --- no import circles ---------------------------------------------------------------------------

# (lower, upper): the shared definition moved below both (models, preprocess), or the caller of both
# above them (train); the lower module must not reach the upper one, even through others.
CIRCLES_BROKEN = [("zoo.models.catalog", "zoo.models.registry"), ("zoo.preprocess.dicom", "zoo.preprocess.image"),
                  ("zoo.train.ensemble", "zoo.train.entry"), ("zoo.train.engine", "zoo.train.ensemble")]


def test_no_import_circles() -> None:
    import grimp

    graph = grimp.build_graph("zoo", "export")
    for lower, upper in CIRCLES_BROKEN:
        assert not graph.chain_exists(importer=lower, imported=upper), f"{lower} reaches {upper}"
    # and no module of zoo or export imports something that imports it back
    circles = [(a, b) for a in graph.modules for b in graph.find_modules_directly_imported_by(a)
               if graph.chain_exists(importer=b, imported=a)]
    assert circles == []
    cfg = __import__("tomllib").loads((REPO / "pyproject.toml").read_text())
    ids = {c["id"] for c in cfg["tool"]["importlinter"]["contracts"]}
    assert {"models-acyclic", "preprocess-acyclic", "train-acyclic"} <= ids


def test_runtime_reads_no_environment_variable() -> None:
    """Settings are read once, by zoo.settings.runtime_options, and passed to OnnxModel.open."""
    assert "os.environ" not in (REPO / "zoo" / "runtime.py").read_text()
