"""The Python API (``zoo.load`` → ``Model`` / ``Ensemble``): the README's example runs as written;
every input kind gives the answer of the one preprocessing and the one postprocessing; ONNX Runtime
and PyTorch agree; ensembles answer as ``zoo score --ensemble`` does; ``import zoo`` stays light."""

from __future__ import annotations

import io
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file

import zoo
from zoo.api import Ensemble, Model, Prediction
from zoo.card import ONNX_FILE, Card, ExportMeta, read_card
from zoo.errors import BundleError, EnsembleError, ImageError, ModelFileError, UsageError
from zoo.postprocess import calibrated_probs, interpret
from zoo.preprocess import load_image
from zoo.runtime import OnnxModel, RuntimeOptions

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def home(synthetic_bundles: dict[str, Path], synthetic_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A private store: the session's skin / organ / pathology bundles, plus a second pathology
    bundle of the same architecture (an ensemble needs two)."""
    from conftest import _train

    root = tmp_path_factory.mktemp("api_home")
    for path in synthetic_bundles.values():
        shutil.copytree(path, root / "bundles" / path.name, ignore=shutil.ignore_patterns("model.*onnx", "*.pt"))
    _train("path", "simplecnn", synthetic_root, root, epochs=2, batch_size=32, seed=1)
    return root


@pytest.fixture()
def in_home(home: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("MEDZOO_HOME", str(home))
    return home


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory, synthetic_root: Path) -> Path:
    """The files the README example names: a skin photo (PNG and DICOM), a CT slice, a tissue patch."""
    d = tmp_path_factory.mktemp("api_files")
    derma = np.load(synthetic_root / "dermamnist.npz")["test_images"]
    Image.fromarray(derma[0]).resize((300, 240)).save(d / "lesion.png")
    shutil.copy(get_testdata_file("SC_rgb_jpeg_dcmtk.dcm"), d / "lesion.dcm")  # YBR JPEG colour DICOM
    shutil.copy(get_testdata_file("CT_small.dcm"), d / "slice.dcm")
    Image.fromarray(np.load(synthetic_root / "pathmnist.npz")["test_images"][0]).save(d / "slide.png")
    return d


def readme_example() -> str:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text[text.index("## Python API"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_example_runs(in_home: Path, files: Path, monkeypatch: pytest.MonkeyPatch,
                             capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(files)
    scope: dict[str, Any] = {}
    exec(compile(readme_example(), "README.md (Python API)", "exec"), scope)  # noqa: S102 - our own README
    model, answers, ensemble = scope["model"], scope["answers"], scope["ensemble"]
    assert isinstance(model, Model) and model.card.dataset.name == "dermamnist"
    assert all(isinstance(a, Prediction) for a in answers)
    assert answers[2].label == answers[0].label and np.allclose(answers[2].probs, answers[0].probs)  # PIL = file
    assert isinstance(ensemble, Ensemble) and len(ensemble.members) == 2
    assert (in_home / "bundles" / model.id / ONNX_FILE).is_file()  # exported on first use
    out = capsys.readouterr().out
    assert "Model('" in out and "resnet18" in out


def _onnx_answer(bundle: Path, images: list[Any]) -> np.ndarray:
    """Probabilities through the pieces the service and `zoo score` use: load_image, ONNX, interpret."""
    onnx = OnnxModel.open(bundle)
    batch = np.stack([load_image(x, onnx.preprocessing) for x in images])
    out = onnx.outputs(batch)
    return interpret(out["logits"], onnx.meta, out.get("ood_score")).probs


def test_every_input_kind(in_home: Path, files: Path) -> None:
    model = zoo.load("skin")
    png = files / "lesion.png"
    photo = Image.open(png)
    hwc = np.asarray(photo.convert("RGB"))
    ds = pydicom.dcmread(files / "lesion.dcm")
    inputs = [png, str(png), png.read_bytes(), io.BytesIO(png.read_bytes()), photo, hwc, hwc.transpose(2, 0, 1),
              np.asarray(photo.convert("L")), files / "lesion.dcm", ds]
    answers = model.predict(inputs, top_k=7)
    expected = _onnx_answer(model.path.parent, inputs)
    assert len(answers) == len(inputs)
    for a, p in zip(answers, expected):
        np.testing.assert_allclose(a.probs, p, atol=1e-6)
        assert a.index == int(p.argmax()) and a.label == model.labels[a.index] and a.prob == pytest.approx(p.max())
        assert [c.index for c in a.top] == list(np.argsort(-p, kind="stable")) and len(a.top) == 7
        assert a.probs.sum() == pytest.approx(1, abs=1e-5)
        assert a.calibrated is (model.card.calibration is not None)
        assert (a.ood_score is None) is (model.card.ood is None)
        json.dumps(a.as_dict())
    for i in range(1, 4):  # the same file however it is given
        np.testing.assert_array_equal(answers[i].probs, answers[0].probs)
    batch = np.stack([hwc, hwc[::-1]])  # a 4-D array is a batch
    assert [a.label for a in model.predict(batch)] == [a.label for a in model.predict([hwc, hwc[::-1]])]
    assert model.predict([]) == [] and len(model.predict(png)) == 1


def test_references_single_models(in_home: Path, tmp_path: Path) -> None:
    best = zoo.load("skin")
    bundle = best.path.parent
    by_id, by_dir = zoo.load(best.id), zoo.load(bundle)
    assert by_id.id == by_dir.id == best.id and isinstance(by_dir.card, Card)
    lone = tmp_path / "skin.onnx"
    shutil.copy(bundle / ONNX_FILE, lone)  # a lone file carries its card subset
    solo = zoo.load(lone)
    assert isinstance(solo.card, ExportMeta) and solo.labels == best.labels and solo.info.id == best.id
    x = np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8)
    np.testing.assert_array_equal(solo.predict(x)[0].probs, best.predict(x)[0].probs)
    with pytest.raises(BundleError, match="no bundle found for 'skinn'.*did you mean"):
        zoo.load("skinn")
    with pytest.raises(ModelFileError, match="backend='torch' needs a bundle"):
        zoo.load(lone, backend="torch")
    with pytest.raises(UsageError, match="backend must be"):
        zoo.load("skin", backend="tensorrt")
    cpu = zoo.load("skin", options=RuntimeOptions(providers=("CPUExecutionProvider",), threads=1))
    assert cpu.provider == "CPUExecutionProvider"


def test_an_ensemble_answer_is_a_predictions() -> None:
    """One answer type for a batch: the ensemble's extends a model's (every front end reads both alike)."""
    from zoo.ensemble import EnsemblePredictions, combine
    from zoo.postprocess import Predictions

    logits = np.array([[[2.0, 0.0], [0.0, 1.0]], [[1.0, 0.0], [2.0, 0.0]]], dtype=np.float32)  # (M, N, K)
    answer = combine(logits)
    assert isinstance(answer, EnsemblePredictions) and isinstance(answer, Predictions) and len(answer) == 2
    np.testing.assert_array_equal(answer.classes, [0, 0])
    np.testing.assert_allclose(answer.agreement, [1.0, 0.5])
    assert answer.member_classes.tolist() == [[0, 0], [1, 0]] and answer.member_probs.shape == (2, 2, 2)
    assert answer.logits.shape == (2, 2) and answer.ood_score is None and answer.calibrated is False


def test_bundle_without_onnx_is_exported_first(in_home: Path, tmp_path: Path) -> None:
    src = zoo.load("organ").path.parent
    copy = tmp_path / src.name
    shutil.copytree(src, copy, ignore=shutil.ignore_patterns("model.*onnx", "*.pt"))
    assert not (copy / ONNX_FILE).exists()
    model = zoo.load(copy)
    assert (copy / ONNX_FILE).is_file() and "onnx" in read_card(copy).exports
    assert model.backend == "onnx" and model.path == copy / ONNX_FILE


def test_torch_backend_gives_the_same_answers(in_home: Path, files: Path) -> None:
    onnx, torch_model = zoo.load("organ"), zoo.load("organ", backend="torch", device="cpu")
    assert torch_model.backend == "torch" and torch_model.provider == "cpu"
    images = [files / "slice.dcm", files / "lesion.png", files / "slide.png"]
    for a, b in zip(onnx.predict(images), torch_model.predict(images)):
        np.testing.assert_allclose(a.probs, b.probs, atol=1e-5)
        assert a.label == b.label


def test_ensembles_answer_as_zoo_score(in_home: Path, files: Path, tmp_path: Path) -> None:
    """``zoo.load("pathology", ensemble=True)`` and a list of members: zoo.ensemble's members and
    combination, the same probabilities as ``zoo score --ensemble`` on the same files."""
    from zoo.score import score_folder

    ens = zoo.load("pathology", ensemble=True)
    assert isinstance(ens, Ensemble) and len(ens.members) == 2
    again = zoo.load([m.path.parent for m in ens.members])
    folder = tmp_path / "imgs"
    folder.mkdir()
    for name in ("slide.png", "lesion.png", "slice.dcm"):
        shutil.copy(files / name, folder / name)
    answers = ens.predict(sorted(folder.iterdir()))
    assert [a.probs.tolist() for a in answers] == [a.probs.tolist() for a in again.predict(sorted(folder.iterdir()))]
    out = tmp_path / "scores.jsonl"
    score_folder(folder, ens.ids, out, ensemble=True, workers=0, progress=False, store=in_home)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["path"] for r in rows] == sorted(p.name for p in folder.iterdir())
    for a, r in zip(answers, rows):
        np.testing.assert_allclose(a.probs, [r[f"prob_{lab}"] for lab in ens.labels], atol=1e-6)
        assert a.agreement == pytest.approx(r["agreement"]) and a.label == r["top_class"]
    with pytest.raises(EnsembleError, match="disagree on labels|different heads"):
        zoo.load(["skin", "organ"])
    with pytest.raises(EnsembleError, match="the same model is given twice"):
        zoo.load(["skin", "skin"])


def test_transforms_are_the_one_preprocessing(in_home: Path, files: Path) -> None:
    model = zoo.load("skin")
    transform = model.transforms()
    png = files / "lesion.png"
    np.testing.assert_array_equal(transform(png), load_image(png, model.preprocessing))
    np.testing.assert_array_equal(model.decode([png]), transform(png)[None])
    logits = model.predict_logits(model.decode(png))
    np.testing.assert_allclose(calibrated_probs(logits, model.card.calibration)[0], model.predict(png)[0].probs,
                               rtol=1e-6)
    with pytest.raises(ValueError, match="takes uint8 batches of shape"):
        model.predict_logits(np.zeros((1, 3, 64, 64), np.uint8))


def test_dicom_window_reaches_the_decoder(in_home: Path, files: Path) -> None:
    plain, windowed = zoo.load("organ"), zoo.load("organ", window=(40, 400))
    ct = files / "slice.dcm"
    expected = _onnx_answer(windowed.path.parent, [load_image(ct, windowed.preprocessing, window=(40, 400))])[0]
    np.testing.assert_allclose(windowed.predict(ct)[0].probs, expected, atol=1e-6)
    assert windowed.transforms().window == (40, 400)
    assert not np.array_equal(windowed.decode(ct), plain.decode(ct))


def test_a_refused_image_is_named_with_its_kind(in_home: Path, files: Path, tmp_path: Path) -> None:
    model = zoo.load("skin")
    bad = tmp_path / "broken.png"
    bad.write_bytes((files / "lesion.png").read_bytes()[:100])
    with pytest.raises(ImageError, match="broken.png: corrupt or truncated") as e:
        model.predict([files / "lesion.png", bad])
    assert e.value.kind == "corrupt"
    with pytest.raises(ImageError, match="image 1: .*multi-frame") as e:
        model.predict([files / "lesion.png", Path(get_testdata_file("SC_rgb_rle_2frame.dcm")).read_bytes()])
    assert e.value.kind == "unsupported"
    with pytest.raises(FileNotFoundError, match="nowhere.png"):
        model.predict(tmp_path / "nowhere.png")


def test_import_zoo_and_help_load_no_torch() -> None:
    code = ("import sys, zoo; zoo.load; zoo.list_models(); zoo.Prediction; "
            "assert 'torch' not in sys.modules, 'torch imported'; print(sorted(zoo.__all__))")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "load" in done.stdout and "create_model" in done.stdout
    code = ("import runpy, sys; sys.argv = ['zoo', '--help']\n"
            "try:\n    runpy.run_module('zoo.cli', run_name='__main__')\nexcept SystemExit:\n    pass\n"
            "assert 'torch' not in sys.modules, 'torch imported'")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "usage: zoo" in done.stdout


def test_timm_style_top_level() -> None:
    assert zoo.list_models() == sorted(zoo.list_models()) and "resnet18" in zoo.list_models()
    assert zoo.list_models("resnet*") == [n for n in zoo.list_models() if n.startswith("resnet")]
    assert set(zoo.list_models(pretrained=True)) < set(zoo.list_models())
    net = zoo.create_model("simplecnn", num_classes=3, in_channels=1, input_size=28)
    import torch

    assert net(torch.zeros(2, 1, 28, 28)).shape == (2, 3)
    with pytest.raises(AttributeError):
        zoo.no_such_thing  # noqa: B018
