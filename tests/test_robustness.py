"""Robustness to acquisition artefacts: MedMNIST-C in ``zoo eval --corruptions``, its training
augmentation, ``zoo eval --alpha``, and how medmnistc is installed."""

from __future__ import annotations

import contextlib
import importlib.metadata as md
import io
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from packaging.version import Version

from zoo.cli import main

pytestmark = pytest.mark.usefixtures("one_torch_thread")

BREAST_CORRUPTIONS = ["pixelate", "jpeg_compression", "speckle_noise", "motion_blur", "brightness_up",
                      "brightness_down", "contrast_down"]
IMAGES = 24  # a seeded sample of the 156 test images: MedMNIST-C's motion blur at 224 px takes ~50 ms an image


def _zoo(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(argv))
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def bundle(breast_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the real BreastMNIST bundle that ``--corruptions`` writes into."""
    dst = tmp_path_factory.mktemp("robust") / breast_bundle.name
    shutil.copytree(breast_bundle, dst)
    return dst


@pytest.fixture(scope="module")
def report(bundle: Path, breast_root: Path) -> dict[str, Any]:
    code, out, err = _zoo("eval", str(bundle), "--corruptions", "--images", str(IMAGES), "--json",
                          "--data-root", str(breast_root))
    assert code == 0, err
    return json.loads(out)


def test_every_corruption_of_the_dataset_at_every_severity(report: dict[str, Any]) -> None:
    from medmnistc.corruptions.registry import CORRUPTIONS_DS

    rob = report["robustness"]
    assert list(CORRUPTIONS_DS["breastmnist"]) == BREAST_CORRUPTIONS
    assert [(r["corruption"], r["severity"]) for r in rob["rows"]] == [
        (c, s) for c in BREAST_CORRUPTIONS for s in range(1, 6)]
    assert rob["images"] == IMAGES and "breastmnist" in rob["source"]
    assert sorted(rob["be"]) == sorted(rob["rbe"]) == sorted(BREAST_CORRUPTIONS)
    assert "AlexNet" in rob["baseline"]
    # the card of the real bundle was calibrated: its threshold decides the binary balanced error
    assert rob["threshold"] is not None and "calibration threshold" in rob["threshold_source"]


def test_numbers_are_finite_and_in_range(report: dict[str, Any]) -> None:
    rob = report["robustness"]
    for row in [rob["clean"], *rob["rows"]]:
        for key in ("acc", "auc", "balanced_error", "ood_flagged", "coverage"):
            assert row[key] is not None and 0.0 <= row[key] <= 1.0, (key, row)
        assert 1.0 <= row["mean_set_size"] <= 2.0
    assert rob["alpha"] == pytest.approx(0.1)
    for v in [*rob["be"].values(), *rob["rbe"].values(), rob["summary"]["be"], rob["summary"]["rbe"]]:
        assert math.isfinite(v)
    assert all(v >= 0 for v in rob["be"].values())


def test_card_and_model_card_show_the_table(report: dict[str, Any], bundle: Path) -> None:
    from zoo.card import read_card

    card = read_card(bundle)
    assert card.robustness is not None and len(card.robustness.rows) == 35
    readme = (bundle / "README.md").read_text()
    assert "## Robustness to acquisition artefacts" in readme
    assert "| motion_blur | 5 |" in readme and "| **mean** |" in readme


def test_a_rerun_gives_identical_numbers(report: dict[str, Any], bundle: Path, breast_root: Path) -> None:
    code, out, _ = _zoo("eval", str(bundle), "--corruptions", "--images", str(IMAGES), "--json",
                        "--data-root", str(breast_root))
    assert code == 0 and json.loads(out) == report


def test_corruptions_are_seeded() -> None:
    """The corrupted images themselves (not only the cached ones) are the same on every call."""
    from zoo.trust.robustness import condition_seed, corrupt, corruption_set

    images = np.random.default_rng(3).integers(0, 256, (4, 1, 28, 28), dtype=np.uint8)
    corruptions, _ = corruption_set("breastmnist")
    for name, c in corruptions.items():
        a = corrupt(images, c, 3, condition_seed(name, 3))
        assert a.shape == images.shape and a.dtype == np.uint8
        assert np.array_equal(a, corrupt(images, c, 3, condition_seed(name, 3))), name
    # the caller's random streams are left as they were
    np.random.seed(7)
    expected = np.random.random()
    np.random.seed(7)
    corrupt(images, corruptions["speckle_noise"], 5, 1)
    assert np.random.random() == expected


def test_generic_set_and_severities() -> None:
    from zoo.errors import UsageError
    from zoo.trust.robustness import GENERIC, corruption_set, parse_severities

    corruptions, source = corruption_set("mnist")
    assert list(corruptions) == list(GENERIC) and "not in MedMNIST-C" in source
    assert parse_severities("1-5") == (1, 2, 3, 4, 5) and parse_severities("5,1") == (1, 5)
    for bad in ("0-3", "x", "6"):
        with pytest.raises(UsageError):
            parse_severities(bad)


def test_eval_reports_prediction_sets_at_alpha(bundle: Path, breast_root: Path) -> None:
    sizes = {}
    for alpha in ("0.05", "0.2"):
        code, out, err = _zoo("eval", str(bundle), "--alpha", alpha, "--json", "--data-root", str(breast_root))
        assert code == 0, err
        sets = json.loads(out)["prediction_sets"]
        assert sets["alpha"] == float(alpha) and 0.0 <= sets["coverage"] <= 1.0
        sizes[alpha] = sets["mean_set_size"]
    assert sizes["0.2"] <= sizes["0.05"]  # a larger α never adds a class to a set
    code, out, _ = _zoo("eval", str(bundle), "--data-root", str(breast_root))
    assert code == 0 and "prediction sets at alpha 0.1: coverage" in out


@pytest.mark.parametrize("argv", [["--alpha", "1.5"], ["--alpha", "0"], ["--corruptions", "--severities", "2-7"],
                                  ["--severities", "3"]])
def test_bad_arguments_are_one_line_usage_errors(bundle: Path, argv: list[str]) -> None:
    code, out, err = _zoo("eval", str(bundle), *argv)
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and err.startswith("zoo: error:")


def test_augmentation_is_reproducible_and_changes_images() -> None:
    from zoo.recipe import AugmentCfg
    from zoo.train.augment import augment

    x = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (16, 1, 28, 28), dtype=np.uint8)).float() / 255
    cfg = AugmentCfg(medmnistc=True)
    assert cfg.enabled
    a = augment(x, cfg, torch.Generator().manual_seed(0), "breastmnist")
    b = augment(x, cfg, torch.Generator().manual_seed(0), "breastmnist")
    assert torch.equal(a, b) and a.shape == x.shape and 0 <= float(a.min()) and float(a.max()) <= 1
    assert not torch.equal(a, x)


def test_training_with_medmnistc_augmentation(breast_root: Path, tmp_path: Path) -> None:
    code, out, err = _zoo("--store", str(tmp_path), "train", "breast", "simplecnn", "--data-root", str(breast_root),
                          "--offline", "--epochs", "1", "--set", "train.max_batches=2",
                          "--set", "augment.medmnistc=true", "--json")
    assert code == 0, err
    from zoo.card import read_card

    card = read_card(json.loads(out)["bundle"])
    assert card.recipe["augment"]["medmnistc"] is True


def test_medmnistc_installed_without_downgrades_or_a_second_opencv(capsys: pytest.CaptureFixture[str]) -> None:
    listing = subprocess.run([sys.executable, "-m", "pip", "list"], capture_output=True, text=True, check=True).stdout
    with capsys.disabled():  # the CI log shows what is installed
        print("\n" + listing)
    names = {line.split()[0].lower() for line in listing.splitlines()[2:] if line.strip()}
    assert "medmnistc" in names and "wand" in names
    assert "opencv-python-headless" in names and "opencv-python" not in names
    assert Version(md.version("medmnist")) > Version("3.0.1")  # medmnistc pins 3.0.1
    assert Version(md.version("scikit-image")) > Version("0.23.2")  # medmnistc pins 0.23.2
    import wand.image  # noqa: F401 - loads ImageMagick's MagickWand library (ImportError when missing)
