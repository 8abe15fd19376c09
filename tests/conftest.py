"""Shared fixtures: the real BreastMNIST, synthetic MedMNIST files, bundles trained once per session, and
one real server of the BreastMNIST bundle (``breast_server``; the servers themselves: tests/servers.py)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from servers import ZooServer, start_zoo_serve

REPO = Path(__file__).resolve().parents[1]
# shared/ beside the checkout, or beside one of its parents (a git worktree under /work/wt/…)
SHARED = next((p / "shared" for p in REPO.parents if (p / "shared" / "data" / "medmnist").is_dir()),
              REPO.parent / "shared")
BREAST_DIR = SHARED / "data" / "medmnist"


@pytest.fixture(scope="session", autouse=True)
def _isolated_home(tmp_path_factory: pytest.TempPathFactory) -> None:
    """No test touches ~/.medzoo or ~/.medmnist, and nothing is downloaded."""
    home = tmp_path_factory.mktemp("medzoo_home")
    os.environ["MEDZOO_HOME"] = str(home)
    os.environ["MEDZOO_DATA"] = str(tmp_path_factory.mktemp("medzoo_data"))
    os.environ.setdefault("TORCH_HOME", str(tmp_path_factory.mktemp("torch_home")))


@pytest.fixture(scope="session")
def breast_root() -> Path:
    """Folder holding the real breastmnist.npz (official splits)."""
    if not (BREAST_DIR / "breastmnist.npz").is_file():
        pytest.skip("the real BreastMNIST file is not available")
    return BREAST_DIR


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Synthetic DermaMNIST (RGB, 7 classes), OrganAMNIST (grey, 11) and PathMNIST (RGB, 9) at 28 px."""
    from zoo.data.synthetic import write_synthetic_medmnist

    root = tmp_path_factory.mktemp("synthetic_medmnist")
    for i, flag in enumerate(("dermamnist", "organamnist", "pathmnist")):
        write_synthetic_medmnist(root, flag, 28, (240, 60, 60), seed=i)
    return root


@pytest.fixture(scope="session")
def small_breast_root(breast_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real BreastMNIST cut to 16 images per split, both classes in each: for tests of a pipeline
    (a CLI command, a report's four models at 224 px) rather than of what a model learns."""
    full = np.load(breast_root / "breastmnist.npz")
    keep: dict[str, np.ndarray] = {}
    for split in ("train", "val", "test"):
        labels = full[f"{split}_labels"][:, 0]
        idx = np.sort(np.concatenate([np.flatnonzero(labels == c)[:8] for c in np.unique(labels)]))
        keep[f"{split}_images"], keep[f"{split}_labels"] = full[f"{split}_images"][idx], full[f"{split}_labels"][idx]
    root = tmp_path_factory.mktemp("small_breast")
    np.savez_compressed(root / "breastmnist.npz", **keep)
    return root


def _train(dataset: str, arch: str, data_root: Path, store: Path, **overrides: object) -> Path:
    from zoo.recipe import apply_overrides, find_recipe
    from zoo.train import train

    recipe = apply_overrides(find_recipe(dataset, arch), dict(overrides))
    return train(recipe, data_root=data_root, store=store, progress=False, download=False).bundle


@pytest.fixture(scope="session")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("store")


@pytest.fixture(scope="session")
def breast_bundle(breast_root: Path, store: Path) -> Path:
    """A small CNN trained on the real BreastMNIST (≈ 20 s on 2 CPU cores)."""
    return _train("breast", "simplecnn", breast_root, store, epochs=8, lr=1e-3, batch_size=32)


@pytest.fixture(scope="session")
def synthetic_bundles(synthetic_root: Path, store: Path) -> dict[str, Path]:
    """One small bundle per service task (skin, organ, pathology) on synthetic data."""
    return {
        task: _train(flag, "simplecnn", synthetic_root, store, epochs=2, batch_size=32)
        for task, flag in (("skin", "derma"), ("organ", "organa"), ("pathology", "path"))
    }


@pytest.fixture()
def bundle_copy(breast_bundle: Path, tmp_path: Path) -> Path:
    """A private copy of the BreastMNIST bundle that a test may alter."""
    dst = tmp_path / breast_bundle.name
    shutil.copytree(breast_bundle, dst)
    return dst


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """One intra-op thread for a module (``pytestmark = pytest.mark.usefixtures("one_torch_thread")``):
    on a small CPU shared with other jobs, two OpenMP threads wait on each other whenever one is
    descheduled (5-10x slower)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def breast_store(breast_bundle: Path, breast_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A store holding a copy of the BreastMNIST bundle, exported to ONNX (parity-checked on the real
    images): what the servers of the BreastMNIST model serve. Read only: a test that alters a bundle
    takes ``bundle_copy``."""
    from export import ensure_exported

    root = tmp_path_factory.mktemp("breast_store")
    dst = root / "bundles" / breast_bundle.name
    shutil.copytree(breast_bundle, dst, ignore=shutil.ignore_patterns("model.onnx", "model.fp16.onnx", "*.pt"))
    ensure_exported(dst, ("onnx",), breast_root)
    return root


BREAST_SERVER_CONFIG = {
    "max_request_mb": 1,  # tests/test_v2.py: a /v2 body above it gets 413 before it is read
    "body_timeout_s": 1,  # tests/test_v2.py: a stalled /v2 body gets 408
}


@pytest.fixture(scope="session")
def breast_server(breast_store: Path, breast_bundle: Path, tmp_path_factory: pytest.TempPathFactory
                  ) -> Iterator[ZooServer]:
    """One ``zoo serve --no-build`` for the session, shared by tests/test_dicom_sr.py, tests/test_ui.py and
    tests/test_v2.py (which must not depend on what the others sent): the ``breast_store`` bundle as the task
    ``breast``, and a copy of it without ``model.safetensors`` as ``noweights`` (predictions work,
    explanations answer 503); skin, organ, pathology and the ensemble have no bundle. Settings:
    ``BREAST_SERVER_CONFIG``, and one API worker (``GET /stats`` counts the requests of the worker that answers
    it; tests/test_metrics.py, which needs two, has a server of its own)."""
    work = tmp_path_factory.mktemp("breast_server")
    bundle = breast_store / "bundles" / breast_bundle.name
    bare = work / "noweights"
    shutil.copytree(bundle, bare, ignore=shutil.ignore_patterns("model.safetensors"))
    config = {"tasks": {"breast": bundle.name, "noweights": str(bare)}, **BREAST_SERVER_CONFIG}
    with start_zoo_serve(work, breast_store, config) as server:
        yield server
