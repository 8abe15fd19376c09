"""Datasets: MedMNIST (real BreastMNIST + synthetic files), aliases, folders, offline errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from zoo.data import DataUnavailableError, load_dataset, resolve_name, resplit
from zoo.data.synthetic import write_synthetic_medmnist
from zoo.errors import UnknownNameError
from zoo.names import MEDMNIST_2D, medmnist_flag
from zoo.preprocess.adapter import normalisation_stats


def test_real_breastmnist_official_splits(breast_root: Path) -> None:
    d = load_dataset("breast", root=breast_root, download=False)
    assert (len(d.train), len(d.val), len(d.test)) == (546, 78, 156)
    assert d.train.images.dtype == torch.uint8 and d.train.images.shape[1:] == (1, 28, 28)
    assert d.train.labels.shape == (546,) and d.labels == ["malignant", "normal, benign"]
    assert d.task == "binary-class" and len(d.checksum) == 64


@pytest.mark.parametrize(
    "alias,flag",
    [("skin", "dermamnist"), ("derma", "dermamnist"), ("organ", "organamnist"), ("organa", "organamnist"),
     ("pathology", "pathmnist"), ("path", "pathmnist"), ("breast", "breastmnist"), ("BloodMNIST", "bloodmnist")],
)
def test_aliases(alias: str, flag: str) -> None:
    assert medmnist_flag(alias) == flag == resolve_name(alias)


def test_every_2d_flag_known() -> None:
    """zoo.names keeps the 2D flags without importing medmnist: they must be medmnist's own."""
    import medmnist

    flags = {f for f, info in medmnist.INFO.items() if not info["python_class"].endswith("3D")}
    assert set(MEDMNIST_2D) == flags


def test_unknown_dataset_is_clear() -> None:
    with pytest.raises(UnknownNameError, match="unknown dataset"):
        resolve_name("nosuchset")
    with pytest.raises(UnknownNameError, match=r"did you mean 'dermamnist'"):
        resolve_name("dermamnis")


@pytest.mark.parametrize("size", [28, 64])
def test_synthetic_file_sizes_and_label_shapes(tmp_path: Path, size: int) -> None:
    write_synthetic_medmnist(tmp_path, "dermamnist", size, (30, 10, 10))
    raw = np.load(tmp_path / ("dermamnist.npz" if size == 28 else f"dermamnist_{size}.npz"))
    assert raw["train_images"].shape == (30, size, size, 3) and raw["train_labels"].shape == (30, 1)
    d = load_dataset("skin", size=size, root=tmp_path, download=False)
    assert d.train.images.shape == (30, 3, size, size) and d.train.labels.shape == (30,)
    assert len(d.labels) == 7


def test_channel_conversion_matches_pillow(tmp_path: Path) -> None:
    write_synthetic_medmnist(tmp_path, "dermamnist", 28, (12, 4, 4))
    rgb = load_dataset("derma", root=tmp_path, download=False)
    grey = load_dataset("derma", root=tmp_path, download=False, in_channels=1)
    img = Image.fromarray(rgb.train.images[0].permute(1, 2, 0).numpy(), "RGB").convert("L")
    assert np.array_equal(grey.train.images[0, 0].numpy(), np.asarray(img))


def test_normalisation_from_train_split(breast_root: Path) -> None:
    d = load_dataset("breast", root=breast_root, download=False)
    mean, std = normalisation_stats(d.train.images)
    expected = d.train.images.double().div(255)
    assert mean[0] == pytest.approx(expected.mean().item()) and std[0] == pytest.approx(expected.std().item())


def test_resplit_is_deterministic_and_stratified(breast_root: Path) -> None:
    d = load_dataset("breast", root=breast_root, download=False)
    a, b = resplit(d, 0.2, 22), resplit(d, 0.2, 22)
    assert torch.equal(a.val.labels, b.val.labels) and len(a.train) + len(a.val) == 546
    assert abs(a.val.labels.float().mean() - d.train.labels.float().mean()) < 0.05


def test_missing_file_without_download(tmp_path: Path) -> None:
    with pytest.raises(DataUnavailableError, match=r"dermamnist\.npz is not in .*zenodo"):
        load_dataset("derma", root=tmp_path, download=False)


def test_image_folder_split_is_deterministic(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    for cls in ("benign", "malignant"):
        (tmp_path / cls).mkdir()
        for i in range(30):
            Image.fromarray(rng.integers(0, 255, (40, 30, 3), dtype=np.uint8)).save(tmp_path / cls / f"{i}.png")
    (tmp_path / "benign" / "broken.png").write_bytes(b"not an image")
    a = load_dataset(str(tmp_path), size=32)
    b = load_dataset(str(tmp_path), size=32)
    assert a.labels == ["benign", "malignant"] and a.train.images.shape[1:] == (3, 32, 32)
    assert len(a.train) + len(a.val) + len(a.test) == 60  # the broken file is skipped
    assert torch.equal(a.test.images, b.test.images) and a.checksum == b.checksum


def test_offline_cli_error_is_one_line(tmp_path: Path) -> None:
    """`zoo train derma resnet18` with no data and no network: one clear line, exit 2, no traceback."""
    env = {"PATH": "/usr/bin:/bin", "MEDZOO_HOME": str(tmp_path / "home"), "MEDZOO_DATA": str(tmp_path / "data"),
           "HOME": str(tmp_path), "https_proxy": "http://127.0.0.1:9", "http_proxy": "http://127.0.0.1:9"}
    r = subprocess.run([sys.executable, "-m", "zoo.cli", "train", "derma", "resnet18"],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 2
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, r.stderr
    assert "dermamnist.npz" in lines[0] and "zenodo.org" in lines[0] and "Traceback" not in r.stderr
    assert not any((tmp_path / "data").glob("*.npz"))
