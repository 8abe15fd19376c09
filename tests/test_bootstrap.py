"""``zoo serve`` on a fresh machine, end to end: the default bootstrap from an empty store.

An empty ``MEDZOO_HOME``, the three MedMNIST files of the default tasks in ``MEDZOO_DATA``
(synthetic, small: a few hundred images each) and nothing else: ``zoo serve`` must train the
three default models (``zoo.bootstrap``: ``simplecnn_v1`` at 28 px, here ``--epochs 1``), fit
their calibration and out-of-distribution detector, export each to ONNX with its parity check,
start the BentoML server, and answer a real PNG on /skin, /organ and /pathology. What the issue
saw fail (a parity check stopping the bootstrap) is exactly what this runs through.
"""

from __future__ import annotations

import io
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image
from servers import start_zoo_serve

FLAGS = {"skin": "dermamnist", "organ": "organamnist", "pathology": "pathmnist"}
SIZES = (300, 100, 100)  # train / val / test images per file: 1 epoch of each trains in seconds

pytestmark = pytest.mark.slow  # three trainings, three exports and a server start: about 1-2 minutes


def _png(data: Path, flag: str) -> bytes:
    """A test image of the task's file, as a PNG (grey or RGB, as MedMNIST stores it)."""
    buf = io.BytesIO()
    Image.fromarray(np.load(data / f"{flag}.npz")["test_images"][0]).save(buf, "PNG")
    return buf.getvalue()


def test_zoo_serve_builds_the_default_models_on_an_empty_store(tmp_path: Path) -> None:
    from zoo.bootstrap import DEFAULT_ARCH
    from zoo.card import read_card
    from zoo.data.synthetic import write_synthetic_medmnist

    home, data = tmp_path / "home", tmp_path / "data"
    for seed, flag in enumerate(FLAGS.values()):
        write_synthetic_medmnist(data, flag, 28, SIZES, seed=seed)
    # no config file: the defaults; training comes before readiness: a longer wait
    with start_zoo_serve(tmp_path, home, None, {"MEDZOO_DATA": str(data)},
                         args=("serve", "--offline", "--epochs", "1"), ready_s=600, stop_s=60) as server:
        for task, flag in FLAGS.items():
            r = httpx.post(f"{server.url}/{task}", files={"images": ("a.png", _png(data, flag), "image/png")},
                           timeout=60)
            assert r.status_code == 200, (task, r.status_code, r.text[:500])
            result = r.json()["results"][0]
            assert result["status"] == 200 and result["top"], result
            assert isinstance(result.get("in_distribution"), bool), result  # the detector is in the served file
    bundles = sorted((home / "bundles").iterdir())
    assert len(bundles) == 3, bundles
    for b in bundles:
        card = read_card(b)
        assert card.arch == DEFAULT_ARCH and card.ood is not None
        assert card.exports["onnx"].parity["passed"] and card.exports["onnx"].parity["ood_score"]["passed"]
