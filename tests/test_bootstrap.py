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
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
FLAGS = {"skin": "dermamnist", "organ": "organamnist", "pathology": "pathmnist"}
SIZES = (300, 100, 100)  # train / val / test images per file: 1 epoch of each trains in seconds

pytestmark = pytest.mark.slow  # three trainings, three exports and a server start: about 1-2 minutes


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _png(data: Path, flag: str) -> bytes:
    """A test image of the task's file, as a PNG (grey or RGB, as MedMNIST stores it)."""
    buf = io.BytesIO()
    Image.fromarray(np.load(data / f"{flag}.npz")["test_images"][0]).save(buf, "PNG")
    return buf.getvalue()


def test_zoo_serve_builds_the_default_models_on_an_empty_store(
        tmp_path: Path, wait_ready: Callable[[subprocess.Popen[bytes], str, Callable[[], str]], None]) -> None:
    from zoo.bootstrap import DEFAULT_ARCH
    from zoo.card import read_card
    from zoo.data.synthetic import write_synthetic_medmnist

    home, data = tmp_path / "home", tmp_path / "data"
    for seed, flag in enumerate(FLAGS.values()):
        write_synthetic_medmnist(data, flag, 28, SIZES, seed=seed)
    env = {**os.environ, "MEDZOO_HOME": str(home), "MEDZOO_DATA": str(data), "BENTOML_HOME": str(tmp_path / "bento"),
           "BENTOML_DO_NOT_TRACK": "true"}
    for key in ("MEDZOO_SERVE_CONFIG", "MEDZOO_ENSEMBLE_MEMBERS", "MEDZOO_ENSEMBLE_ARCH"):
        env.pop(key, None)
    port, log = _free_port(), tmp_path / "serve.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "zoo.cli", "serve", "--offline", "--epochs", "1", "--host", "127.0.0.1",
             "--port", str(port)],
            env=env, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(proc, url, log.read_text, 600)  # training comes before readiness: a longer wait
        for task, flag in FLAGS.items():
            r = httpx.post(f"{url}/{task}", files={"images": ("a.png", _png(data, flag), "image/png")}, timeout=60)
            assert r.status_code == 200, (task, r.status_code, r.text[:500])
            result = r.json()["results"][0]
            assert result["status"] == 200 and result["top"], result
            assert isinstance(result.get("in_distribution"), bool), result  # the detector is in the served file
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the group of the `zoo serve` this test started
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
    text = log.read_text()
    assert "Traceback" not in text, text[-4000:]
    bundles = sorted((home / "bundles").iterdir())
    assert len(bundles) == 3, bundles
    for b in bundles:
        card = read_card(b)
        assert card.arch == DEFAULT_ARCH and card.ood is not None
        assert card.exports["onnx"].parity["passed"] and card.exports["onnx"].parity["ood_score"]["passed"]
